#version 450
// Fused attention for head dims up to 64 (the body, with its parameter layout, is attention.glsl).
#define MAXD 64
#define TK 16
#define WG 64
#include "attention.glsl"
