#version 450
#extension GL_GOOGLE_include_directive : require
// The whole-tile matmul (matmul_coop_tiles16.comp) in VK_KHR_cooperative_matrix's syntax, compiled by glslang 15:
// on NVIDIA's driver the products alone run at 615 TFLOP/s in this form and 380 in the NV one (docs/performance.md,
// "The ceiling of the products"), and the linears 1.3-1.4x faster ("The KHR form and the attention's tiles").
// The default where the device's KHR extension lists the shape; SD3_VULKAN_KHR=0 selects the NV form
// (coop::KHR_ENV).
#define KHR 1
#define FM 16
#define FN 16
#define FK 16
#define BK 64
#define WHOLE_TILES 1
#include "matmul_coop.glsl"
