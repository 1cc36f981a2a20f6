#version 450
#extension GL_GOOGLE_include_directive : require
// Variant: the whole-tile kernel in KHR syntax.
#define KHR 1
#define FM 16
#define FN 16
#define FK 16
#define BK 64
#define WHOLE_TILES 1
#include "matmul_coop.glsl"
