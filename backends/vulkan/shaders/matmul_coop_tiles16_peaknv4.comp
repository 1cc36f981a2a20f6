#version 450
#extension GL_NV_cooperative_matrix : require
#define SG 4
#define FI 4
#define FJ 4
#define A_T fcoopmatNV<16, gl_ScopeSubgroup, 16, 16>
#define B_T fcoopmatNV<16, gl_ScopeSubgroup, 16, 16>
#define ACC_T fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>
#define LOAD_A(m, buf, off, st) coopMatLoadNV(m, buf, off, st, false)
#define LOAD_B(m, buf, off, st) coopMatLoadNV(m, buf, off, st, true)
#define MMA(a, b, c) coopMatMulAddNV(a, b, c)
#define STORE(m, buf, off, st) coopMatStoreNV(m, buf, off, st, false)
#include "peak_body.glsl"
