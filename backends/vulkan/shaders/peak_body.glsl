// TIMING ONLY (wrong results): the products of a matmul tile with no loads in the K loop, to find the ceiling of the
// driver's cooperative-matrix code. Fragments are loaded once from shared memory (every subgroup the same ones);
// SG subgroups each keep FI x FJ accumulators of 16 x FN; the grid and FLOP count are the 128 x 128-tile matmul's
// (SG * FI * FJ * 16 * FN = 128 * 128). Run as a variant of matmul_coop_tiles16 (SD3_VULKAN_VARIANT) under
// `vulkan_kernels --ops linear`; figures in docs/performance.md ("The ceiling of the products").
#extension GL_KHR_memory_scope_semantics : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_EXT_control_flow_attributes : require
layout(std430, set = 0, binding = 0) restrict readonly buffer Params { uint P[]; };
layout(std430, set = 0, binding = 1) writeonly buffer OutF { float yf[]; };
layout(local_size_x = SG * 32) in;
shared uvec4 Zs[1280];
void main() {
    uint K = P[2];
    for (uint i = gl_LocalInvocationID.x; i < 1280u; i += SG * 32u)
        Zs[i] = uvec4(i * 2654435761u, i, i ^ 77u, i * 3u) & uvec4(0x3bff3bffu);
    barrier();
    uint w = gl_SubgroupID;
    A_T fa[FI];
    B_T fb[FJ];
    ACC_T acc[FI][FJ];
    [[unroll]] for (uint i = 0u; i < FI; ++i) LOAD_A(fa[i], Zs, i * 48u, 3u);
    [[unroll]] for (uint j = 0u; j < FJ; ++j) LOAD_B(fb[j], Zs, 1024u + j * 48u, 3u);
    [[unroll]] for (uint i = 0u; i < FI; ++i) [[unroll]] for (uint j = 0u; j < FJ; ++j) acc[i][j] = ACC_T(0.0);
    for (uint k0 = 0u; k0 < K; k0 += 16u) {
        [[unroll]] for (uint i = 0u; i < FI; ++i) [[unroll]] for (uint j = 0u; j < FJ; ++j)
            acc[i][j] = MMA(fa[i], fb[j], acc[i][j]);
    }
    // Never true: keeps the products live without storing them.
    if (P[0] == 0xdeadbeefu) {
        [[unroll]] for (uint i = 0u; i < FI; ++i) [[unroll]] for (uint j = 0u; j < FJ; ++j)
            STORE(acc[i][j], yf, (w * FI + i) * 1024u + j * 16u, 64u);
    }
}
