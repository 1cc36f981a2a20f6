#version 450
// Fused attention for head dims 65..128 (the body, with its parameter layout, is attention.glsl): fewer rows per
// workgroup and a shorter key tile keep shared memory within 32 KiB.
#define MAXD 128
#define TK 8
#define WG 32
#include "attention.glsl"
