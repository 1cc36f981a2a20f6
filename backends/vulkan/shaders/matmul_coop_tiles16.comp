#version 450
// Cooperative-matrix matmul on 16x16x16 fragments without per-element bounds checks, K in steps of 64 (body:
// matmul_coop.glsl; the host checks the conditions).
#define FM 16
#define FN 16
#define FK 16
#define BK 64
#define WHOLE_TILES 1
#include "matmul_coop.glsl"
