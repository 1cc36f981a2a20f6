#version 450
#extension GL_GOOGLE_include_directive : require
#extension GL_KHR_cooperative_matrix : require
#define SG 8
#define FI 4
#define FJ 4
#define A_T coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseA>
#define B_T coopmat<float16_t, gl_ScopeSubgroup, 16, 8, gl_MatrixUseB>
#define ACC_T coopmat<float, gl_ScopeSubgroup, 16, 8, gl_MatrixUseAccumulator>
#define LOAD_A(m, buf, off, st) coopMatLoad(m, buf, off, st, gl_CooperativeMatrixLayoutRowMajor)
#define LOAD_B(m, buf, off, st) coopMatLoad(m, buf, off, st, gl_CooperativeMatrixLayoutColumnMajor)
#define MMA(a, b, c) coopMatMulAdd(a, b, c)
#define STORE(m, buf, off, st) coopMatStore(m, buf, off, st, gl_CooperativeMatrixLayoutRowMajor)
#include "peak_body.glsl"
