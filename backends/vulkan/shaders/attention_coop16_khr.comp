#version 450
#extension GL_GOOGLE_include_directive : require
// The subgroup-scope attention (attention_coop16.comp) in VK_KHR_cooperative_matrix's syntax, compiled by glslang 15:
// a candidate against attention_cm2.comp on NVIDIA (docs/performance.md, "The ceiling of the products"). Timed as
// SD3_VULKAN_VARIANT=attention_coop16:khr with SD3_VULKAN_CM2=0.
#define KHR 1
#define FM 16
#define FN 16
#define FK 16
#include "attention_coop.glsl"
