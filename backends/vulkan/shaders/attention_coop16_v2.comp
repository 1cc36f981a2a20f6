#version 450
// Benchmark variant (SD3_VULKAN_VARIANT=attention_coop16:v2).
#define FM 16
#define FN 16
#define FK 16
#include "attention_coop2.glsl"
