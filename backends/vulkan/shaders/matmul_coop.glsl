// Batched matmul y = a·b (+ bias) on cooperative matrices (VK_NV_cooperative_matrix: tensor cores on NVIDIA):
// f16 a and b, f32 accumulation, any output dtype. A 256-invocation workgroup (8 subgroups of 32) computes a
// 128x128 tile of y, each subgroup a 64x32 block of FM x FN fragments (FM, FN, FK set by the including shader to
// a shape the device lists), stepping K by 32. Operands go through shared memory as 16-byte vectors of 8 halves
// (the fragment loads then read whole vectors; offsets and strides are in vectors): a row-major (As[m][k]), b
// column-major (Bs[n][k]), rows padded to 40 halves (80 bytes: no bank conflicts for the fragment loads). Each
// invocation moves 2 vectors of a and 2 of b per K step, read with one 128-bit load each where the operand is
// contiguous along K and 16-byte aligned (P[45], P[46], set by the host), else gathered half by half. The next K
// tile is read into registers while the current one is multiplied.
//
// Parameters: as matmul.comp, plus [45] a is vector-loadable, [46] b is (the host picks this shader only when a and
// b are f16).
#extension GL_NV_cooperative_matrix : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
#define BM 128
#define BN 128
#define BK 32
#define WM 64
#define WN 32
// Shared row stride in 8-half vectors (40 halves).
#define SV ((BK + 8) / 8)
#define FRAGS_M (WM / FM)
#define FRAGS_N (WN / FN)
layout(local_size_x = 256) in;

// The a and b bindings again, as 16-byte vectors.
layout(std430, set = 0, binding = 2) readonly buffer In2v { uvec4 a_v[]; };
layout(std430, set = 0, binding = 3) readonly buffer In3v { uvec4 b_v[]; };

shared uvec4 As[BM * SV];
shared uvec4 Bs[BN * SV];
shared float Cs[8 * FM * FN];

uint batch_offset(uint bi, uint v) {
    uint off = P[v];
    for (int d = int(P[4]) - 1; d >= 0; --d) {
        uint n = P[5u + uint(d)];
        off += (bi % n) * P[v + 3u + uint(d)];
        bi /= n;
    }
    return off;
}

uint h2(uint e) { return (b2[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }
uint h3(uint e) { return (b3[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }

// Halves c..c+7 of tile row r of an operand whose element (r, c) lies at base + r*sr + c*sc, as one vector (zero
// outside rows x cols). `vec` (uniform): unit sc, base, sr and cols multiples of 8, so one aligned 128-bit load.
#define DEFINE_VEC8(NAME, BUF, BUFV, H)                                                                     \
    uvec4 NAME(bool vec, uint base, uint r, uint c, uint sr, uint sc, uint rows, uint cols) {               \
        if (r >= rows || c >= cols) return uvec4(0u);                                                      \
        uint e = base + r * sr + c * sc;                                                                   \
        if (vec) return BUFV[e >> 3];                                                                      \
        uint w[4];                                                                                         \
        [[unroll]] for (uint j = 0u; j < 4u; ++j) {                                                        \
            uint lo = c + 2u * j < cols ? H(e + 2u * j * sc) : 0u;                                         \
            uint hi = c + 2u * j + 1u < cols ? H(e + (2u * j + 1u) * sc) : 0u;                             \
            w[j] = lo | (hi << 16);                                                                        \
        }                                                                                                  \
        return uvec4(w[0], w[1], w[2], w[3]);                                                              \
    }
DEFINE_VEC8(vec_a, b2, a_v, h2)
DEFINE_VEC8(vec_b, b3, b_v, h3)

void main() {
    uint M = P[0], N = P[1], K = P[2];
    uint dy = P[11], dbias = P[14];
    uint bi = gl_WorkGroupID.z;
    uint oa = batch_offset(bi, 16u), ob = batch_offset(bi, 25u), oy = batch_offset(bi, 34u);
    uint sam = P[17], sak = P[18], sbk = P[26], sbn = P[27], sym = P[35], syn = P[36];
    uint row0 = gl_WorkGroupID.y * BM, col0 = gl_WorkGroupID.x * BN;
    uint t = gl_LocalInvocationID.x;
    uint w = gl_SubgroupID, wm = w / 4u, wn = w % 4u;
    // Vector q = t + 256*i (i < 2) of a tile covers tile row q / 4, columns 8*(q % 4) .. +7 (4 invocations per
    // 64-byte row segment). b's "rows" are its columns n (stored column-major), its "columns" k.
    bool va = P[45] != 0u, vb = P[46] != 0u;
    uvec4 ra[2], rb[2];
    uint am = M - min(M, row0), bn = N - min(N, col0);
    [[unroll]] for (uint i = 0u; i < 2u; ++i) {
        uint q = t + 256u * i, r = q / 4u, c = 8u * (q % 4u);
        ra[i] = vec_a(va, oa + row0 * sam, r, c, sam, sak, am, K);
        rb[i] = vec_b(vb, ob + col0 * sbn, r, c, sbn, sbk, bn, K);
    }
    fcoopmatNV<32, gl_ScopeSubgroup, FM, FN> acc[FRAGS_M][FRAGS_N];
    [[unroll]] for (uint i = 0u; i < FRAGS_M; ++i)
        [[unroll]] for (uint j = 0u; j < FRAGS_N; ++j) acc[i][j] = fcoopmatNV<32, gl_ScopeSubgroup, FM, FN>(0.0);
    for (uint k0 = 0u; k0 < K; k0 += BK) {
        [[unroll]] for (uint i = 0u; i < 2u; ++i) {
            uint q = t + 256u * i;
            As[(q / 4u) * SV + q % 4u] = ra[i];
            Bs[(q / 4u) * SV + q % 4u] = rb[i];
        }
        barrier();
        uint k1 = k0 + BK;
        if (k1 < K) {
            uint kl = K - k1;
            [[unroll]] for (uint i = 0u; i < 2u; ++i) {
                uint q = t + 256u * i, r = q / 4u, c = 8u * (q % 4u);
                ra[i] = vec_a(va, oa + row0 * sam + k1 * sak, r, c, sam, sak, am, kl);
                rb[i] = vec_b(vb, ob + col0 * sbn + k1 * sbk, r, c, sbn, sbk, bn, kl);
            }
        }
        [[unroll]] for (uint kk = 0u; kk < BK; kk += FK) {
            fcoopmatNV<16, gl_ScopeSubgroup, FM, FK> fa[FRAGS_M];
            [[unroll]] for (uint i = 0u; i < FRAGS_M; ++i)
                coopMatLoadNV(fa[i], As, (wm * WM + i * FM) * SV + kk / 8u, SV, false);
            [[unroll]] for (uint j = 0u; j < FRAGS_N; ++j) {
                fcoopmatNV<16, gl_ScopeSubgroup, FK, FN> fb;
                coopMatLoadNV(fb, Bs, (wn * WN + j * FN) * SV + kk / 8u, SV, true);
                [[unroll]] for (uint i = 0u; i < FRAGS_M; ++i) acc[i][j] = coopMatMulAddNV(fa[i], fb, acc[i][j]);
            }
        }
        barrier();
    }
    // Each fragment through this subgroup's slice of Cs, then out with the bias and the output dtype; f16 outputs
    // with unit column stride are written a word (two columns) at a time.
    uint lane = gl_SubgroupInvocationID, cs0 = w * FM * FN;
    bool has_bias = P[15] != 0u;
    [[unroll]] for (uint i = 0u; i < FRAGS_M; ++i) {
        [[unroll]] for (uint j = 0u; j < FRAGS_N; ++j) {
            coopMatStoreNV(acc[i][j], Cs, cs0, FN, false);
            subgroupBarrier();
            for (uint p = lane; p < FM * FN / 2u; p += gl_SubgroupSize) {
                uint fr = p / (FN / 2u), fc = 2u * (p % (FN / 2u));
                uint r = row0 + wm * WM + i * FM + fr, c = col0 + wn * WN + j * FN + fc;
                if (r >= M || c >= N) continue;
                float v0 = Cs[cs0 + fr * FN + fc], v1 = Cs[cs0 + fr * FN + fc + 1u];
                if (has_bias) {
                    v0 += ld4(dbias, P[43] + c * P[44]);
                    if (c + 1u < N) v1 += ld4(dbias, P[43] + (c + 1u) * P[44]);
                }
                uint e = oy + r * sym + c * syn;
                if (dy == 1u && syn == 1u && (e & 1u) == 0u && c + 1u < N) {
                    b1[e >> 1] = f32_to_f16(v0) | (f32_to_f16(v1) << 16);
                } else {
                    st(dy, e, v0);
                    if (c + 1u < N) st(dy, e + syn, v1);
                }
            }
            subgroupBarrier();
        }
    }
}
