#version 450
// Cooperative-matrix matmul on 16x8x16 fragments (body: matmul_coop.glsl).
#define FM 16
#define FN 8
#define FK 16
#include "matmul_coop.glsl"
