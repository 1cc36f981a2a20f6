#version 450
// Cooperative-matrix attention on 16x16x16 fragments (body: attention_coop.glsl).
#define FM 16
#define FN 16
#define FK 16
#include "attention_coop.glsl"
