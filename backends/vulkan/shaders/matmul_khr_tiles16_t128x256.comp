#version 450
#extension GL_GOOGLE_include_directive : require
// Timing variant of matmul_khr_tiles16.comp (with SD3_VULKAN_TILES set to its tile): WGM=2 WGN=4 WM=64 WN=64 BK=32
#define KHR 1
#define FM 16
#define FN 16
#define FK 16
#define WHOLE_TILES 1
#define WGM 2
#define WGN 4
#define WM 64
#define WN 64
#define BK 32
#include "matmul_coop.glsl"
