#version 450
#extension GL_GOOGLE_include_directive : require
// TIMING ONLY (wrong results): workgroup-scope (VK_NV_cooperative_matrix2) products of a 128 x 128 tile with no
// loads in the K loop: the driver's ceiling for the products themselves (see peak_body.glsl).
#extension GL_KHR_cooperative_matrix : require
#extension GL_NV_cooperative_matrix2 : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
layout(std430, set = 0, binding = 0) restrict readonly buffer Params { uint P[]; };
layout(std430, set = 0, binding = 1) writeonly buffer OutF { float yf[]; };
layout(local_size_x = 256) in;
shared uvec4 Zs[1024];
void main() {
    uint K = P[2];
    for (uint i = gl_LocalInvocationID.x; i < 1024u; i += 256u)
        Zs[i] = uvec4(i * 2654435761u, i, i ^ 77u, i * 3u) & uvec4(0x3bff3bffu);
    barrier();
    coopmat<float16_t, gl_ScopeWorkgroup, 128, 16, gl_MatrixUseA> fa;
    coopmat<float16_t, gl_ScopeWorkgroup, 16, 128, gl_MatrixUseB> fb;
    coopMatLoad(fa, Zs, 0, 3, gl_CooperativeMatrixLayoutRowMajor);
    coopMatLoad(fb, Zs, 512, 3, gl_CooperativeMatrixLayoutColumnMajor);
    coopmat<float, gl_ScopeWorkgroup, 128, 128, gl_MatrixUseAccumulator> acc =
        coopmat<float, gl_ScopeWorkgroup, 128, 128, gl_MatrixUseAccumulator>(0.0);
    for (uint k0 = 0u; k0 < K; k0 += 16u) acc = coopMatMulAdd(fa, fb, acc);
    if (P[0] == 0xdeadbeefu) coopMatStore(acc, yf, 0, 128, gl_CooperativeMatrixLayoutRowMajor);
}
