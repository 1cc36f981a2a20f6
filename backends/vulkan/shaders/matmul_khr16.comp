#version 450
#extension GL_GOOGLE_include_directive : require
// The general cooperative matmul (matmul_coop16.comp) in VK_KHR_cooperative_matrix's syntax, compiled by glslang 15;
// selected with the KHR form of the whole-tile one (coop::KHR_ENV).
#define KHR 1
#define FM 16
#define FN 16
#define FK 16
#include "matmul_coop.glsl"
