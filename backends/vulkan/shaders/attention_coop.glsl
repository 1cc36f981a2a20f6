// Fused attention on cooperative matrices (VK_NV_cooperative_matrix) for f16 q, k, v with head dims <= 64:
// o = softmax(scale·q̃·k̃ᵀ + bias + causal mask)·v, flash-style, the score matrix never written to memory.
// A workgroup takes 64 query rows of one (batch, head): 4 subgroups of 32 invocations, 16 rows each. Keys and
// values stream through shared memory in tiles of 64, as 16-byte vectors of 8 halves (rows padded to 72 halves;
// fragment offsets and strides in vectors). With PREFETCH, the next tile is loaded into registers while this one
// is used. Per tile, each subgroup:
// - computes its 16 x 64 scores on 16 x FN accumulator fragments, which the softmax then works on in place;
// - reduces each row's maximum: a per-element maximum over the fragments, written as one fragment to its f32 slice
//   of shared memory and read back by rows (two invocations per row);
// - turns the scores into probabilities element by element (f32, exp2 with the scale folded into one FMA), and
//   keeps the row sums per element, in a fragment that is reduced by rows only once, at the end;
// - converts the probability fragments to f16 and multiplies them by the value tile into the output rows, which
//   stay on accumulator fragments across tiles. With 16 x 16 fragments a converted score fragment is the A operand
//   as it is; with 16 x 8 ones (two per A operand), P goes through shared memory.
// Bias, the causal mask and a partial last tile go through the slice too, in a loop that is not unrolled, and K
// and V tiles that are not vector-loadable or need the norm are loaded in one: the hot loop keeps only the plain
// case's code (the same design with those branches unrolled inside it took 12.9 ms instead of 3.9,
// docs/performance.md, "Attention, second pass").
//
// The running maximum, its correction and the final 1/l are per row, and are applied to the accumulator elements
// one by one. Which row an element of an accumulator fragment belongs to is implementation-defined, so the shader
// reads it once from a probe: a fragment loaded from a slice whose every element is its own row number. It assumes
// only that each invocation holds 16·FN/32 elements of a 16 x FN f32 fragment (the case on NVIDIA); the row
// reductions go through shared memory, which on the H200 was as fast as shuffles over NVIDIA's known layout.
//
// On the H200 this took the joint attention [2, 24, 4429, 64] from 3.89 ms (the scores and P through the slices)
// to 2.98 ms, 254 registers (docs/performance.md, "Attention, third pass"); 3.44 ms without the prefetch.
//
// Parameters and bindings: as attention.glsl, plus [50], [51], [52]: q, k, v are vector-loadable (contiguous
// along the head dim, rows 16-byte aligned). The host picks this shader only for f16 q, k, v and Dh, Dv <= 64.
#ifndef KHR
#define KHR 0
#endif
#if KHR
// The same shader in VK_KHR_cooperative_matrix's syntax (compiled by glslang 15; see build.rs). Turning a score
// accumulator into an A operand needs VK_NV_cooperative_matrix2's conversions.
#extension GL_KHR_cooperative_matrix : require
#extension GL_NV_cooperative_matrix2 : require
#define ACC_F32(M, N) coopmat<float, gl_ScopeSubgroup, M, N, gl_MatrixUseAccumulator>
#define ACC_F16(M, N) coopmat<float16_t, gl_ScopeSubgroup, M, N, gl_MatrixUseAccumulator>
#define OPD_A(M, K) coopmat<float16_t, gl_ScopeSubgroup, M, K, gl_MatrixUseA>
#define OPD_B(K, N) coopmat<float16_t, gl_ScopeSubgroup, K, N, gl_MatrixUseB>
#define COOP_LOAD(m, buf, off, st, col_major) \
    coopMatLoad(m, buf, off, st, (col_major) ? gl_CooperativeMatrixLayoutColumnMajor : gl_CooperativeMatrixLayoutRowMajor)
#define COOP_STORE(m, buf, off, st, col_major) \
    coopMatStore(m, buf, off, st, (col_major) ? gl_CooperativeMatrixLayoutColumnMajor : gl_CooperativeMatrixLayoutRowMajor)
#define COOP_MMA(a, b, c) coopMatMulAdd(a, b, c)
#else
#extension GL_NV_cooperative_matrix : require
#define ACC_F32(M, N) fcoopmatNV<32, gl_ScopeSubgroup, M, N>
#define ACC_F16(M, N) fcoopmatNV<16, gl_ScopeSubgroup, M, N>
#define OPD_A(M, K) fcoopmatNV<16, gl_ScopeSubgroup, M, K>
#define OPD_B(K, N) fcoopmatNV<16, gl_ScopeSubgroup, K, N>
#define COOP_LOAD(m, buf, off, st, col_major) coopMatLoadNV(m, buf, off, st, col_major)
#define COOP_STORE(m, buf, off, st, col_major) coopMatStoreNV(m, buf, off, st, col_major)
#define COOP_MMA(a, b, c) coopMatMulAddNV(a, b, c)
#endif
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
#include "vec8.glsl"
// Execution barrier of the subgroup that orders its shared-memory accesses only (subgroupBarrier() also orders
// buffer memory, which cost a wait for outstanding memory operations at each hand-off).
#define SUBGROUP_SHARED_BARRIER() \
    controlBarrier(gl_ScopeSubgroup, gl_ScopeSubgroup, gl_StorageSemanticsShared, gl_SemanticsAcquireRelease)
#ifndef PREFETCH
#define PREFETCH 1
#endif
#define BR 64
#define BC 64
#define D 64
// Query rows per subgroup (one fragment high); subgroups and invocations per workgroup; invocations per row and
// columns per invocation where the slice is worked on by rows; 8-half vectors per invocation in a 64-row tile
// load; accumulator elements per invocation; fragments along the head dim (k of q·kᵀ, n of p·v); score fragments
// per tile.
#define RS 16
#define NSG (BR / RS)
#define WG (32 * NSG)
#define LPR (32 / RS)
#define CPL (BC / LPR)
#define NLD (BC * 8 / WG)
#define NE (16 * FN / 32)
#define KD (D / FK)
#define ND (D / FN)
#define NS (BC / FN)
// Shared row stride in 8-half vectors (72 halves), and of the f32 score slices in 4-float vectors (68 floats: a
// vector load by 8 consecutive rows hits every bank once). The slices hold f32 bits as uvec4 (glslang's NV
// fragment loads and stores take uint and uvec4 arrays, not vec4).
#define SV ((D + 8) / 8)
#define SS4 ((BC + 4) / 4)
#define NEG_INF uintBitsToFloat(0xff800000u)
#define LOG2E 1.4426950408889634
layout(local_size_x = WG) in;

layout(std430, set = 0, binding = 2) readonly buffer In2v { uvec4 q_v[]; };
layout(std430, set = 0, binding = 3) readonly buffer In3v { uvec4 k_v[]; };
layout(std430, set = 0, binding = 4) readonly buffer In4v { uvec4 v_v[]; };

shared uvec4 Ks[BC * SV];
shared uvec4 Vs[BC * SV];
#if FN != FK
shared uvec4 Ps[BR * SV];
#endif
shared uvec4 Ss[BR * SS4];

uint head_offset(uint b, uint h, uint v) { return P[v] + b * P[v + 1u] + h * P[v + 2u]; }

DEFINE_HALF(hq, b2)
DEFINE_HALF(hk, b3)
DEFINE_HALF(hv, b4)
DEFINE_VEC8(vec_q, q_v, hq, 0)
DEFINE_VEC8(vec_k, k_v, hk, 0)
DEFINE_VEC8(vec_v, v_v, hv, 0)

// A vector's 8 halves times `s`, RMS-normed over the row (8 consecutive invocations hold one row's 64 columns)
// and scaled by the 8 weights `w`.
uvec4 rms_norm8(uvec4 x, float eps, float dh, vec4 w0, vec4 w1) {
    vec2 a = unpackHalf2x16(x.x), b = unpackHalf2x16(x.y), c = unpackHalf2x16(x.z), d = unpackHalf2x16(x.w);
    float ss = dot(a, a) + dot(b, b) + dot(c, c) + dot(d, d);
    ss += subgroupShuffleXor(ss, 1u);
    ss += subgroupShuffleXor(ss, 2u);
    ss += subgroupShuffleXor(ss, 4u);
    float inv = 1.0 / sqrt(ss / dh + eps);
    return uvec4(packHalf2x16(a * inv * w0.xy), packHalf2x16(b * inv * w0.zw), packHalf2x16(c * inv * w1.xy),
                 packHalf2x16(d * inv * w1.zw));
}

void main() {
    uint H = P[1], Nq = P[2], Nk = P[3], Dh = P[4], Dv = P[5];
    bool causal = P[6] != 0u, has_bias = P[7] != 0u, qk_norm = P[8] != 0u;
    float scale = pf(9) * LOG2E, eps = pf(10);
    uint d_o = P[11], dbias = P[15], dqn = P[16], dkn = P[17];
    bool vq = P[50] != 0u, vk = P[51] != 0u, vv = P[52] != 0u;
    uint bh = gl_WorkGroupID.y, b = bh / H, h = bh % H;
    uint i0 = gl_WorkGroupID.x * BR;
    uint t = gl_LocalInvocationID.x;
    uint w = gl_SubgroupID, lane = gl_SubgroupInvocationID;
    // Tile loads: vector t + WG*i (i < NLD) covers row (t + WG i) / 8, columns c8 .. c8+7 (the same columns for
    // every i, so the norm weights are read once).
    uint c8 = 8u * (t % 8u);
    vec4 wq0 = vec4(0.0), wq1 = vec4(0.0), wk0 = vec4(0.0), wk1 = vec4(0.0);
    if (qk_norm) {
        float wq[8], wk[8];
        [[unroll]] for (uint j = 0u; j < 8u; ++j) {
            wq[j] = c8 + j < Dh ? ld6(dqn, P[45] + (c8 + j) * P[46]) : 0.0;
            wk[j] = c8 + j < Dh ? ld7(dkn, P[47] + (c8 + j) * P[48]) : 0.0;
        }
        wq0 = vec4(wq[0], wq[1], wq[2], wq[3]);
        wq1 = vec4(wq[4], wq[5], wq[6], wq[7]);
        wk0 = vec4(wk[0], wk[1], wk[2], wk[3]);
        wk1 = vec4(wk[4], wk[5], wk[6], wk[7]);
    }
    // Where the slice is worked on by rows: this invocation's row and where its columns start.
    uint r = lane % RS, c0 = (lane / RS) * CPL;
    uint row = i0 + w * RS + r;
    uint ss0 = w * RS * SS4;
#if FN != FK
    uint ps0 = w * RS * SV;
#endif

    // The row of each accumulator element held by this invocation (see the top).
    uint erow[NE];
    {
        for (uint p = lane; p < 16u * (FN / 4u); p += 32u) Ss[ss0 + (p / (FN / 4u)) * SS4 + p % (FN / 4u)] =
            uvec4(floatBitsToUint(float(p / (FN / 4u))));
        SUBGROUP_SHARED_BARRIER();
        ACC_F32(16, FN) probe;
        COOP_LOAD(probe, Ss, ss0, SS4, false);
        [[unroll]] for (uint i = 0u; i < NE; ++i) erow[i] = uint(probe[i]);
    }

    // The query block (normed) through Ks into this subgroup's A fragments.
    uint oq = head_offset(b, h, 25u) + i0 * P[28];
    [[unroll]] for (uint i = 0u; i < NLD; ++i) {
        uint qi = t + WG * i;
        uvec4 x = vec_q(vq, oq, qi / 8u, c8, P[28], P[29], Nq - min(Nq, i0), Dh);
        Ks[(qi / 8u) * SV + qi % 8u] = qk_norm ? rms_norm8(x, eps, float(Dh), wq0, wq1) : x;
    }
    barrier();
    OPD_A(16, FK) qf[KD];
    [[unroll]] for (uint k = 0u; k < KD; ++k) COOP_LOAD(qf[k], Ks, w * RS * SV + k * (FK / 8u), SV, false);
    barrier();

    ACC_F32(16, FN) o[ND];
    [[unroll]] for (uint n = 0u; n < ND; ++n) o[n] = ACC_F32(16, FN)(0.0);
    // The running maximum of each accumulator element's row (scaled, log2 units), and the partial row sums.
    float me[NE];
    [[unroll]] for (uint i = 0u; i < NE; ++i) me[i] = NEG_INF;
    ACC_F32(16, FN) lf = ACC_F32(16, FN)(0.0);
    uint ok = head_offset(b, h, 30u), ov = head_offset(b, h, 35u);
    uint obias = head_offset(b, h, 40u) + row * P[43];

    // K and V tiles: where both are vector-loadable and K is not normed (SD3's joint attention), 128-bit loads
    // into registers (with PREFETCH, of the next tile while this one is used); otherwise the general loads in a
    // loop that is not unrolled, so that its code stays out of the hot path.
    bool fastkv = vk && vv && !qk_norm;
    uvec4 kx[NLD], vx[NLD];
#define LOAD_TILE(J0)                                                                                      \
    {                                                                                                      \
        uint nt_ = min(uint(BC), Nk - (J0));                                                               \
        [[unroll]] for (uint i = 0u; i < NLD; ++i) {                                                       \
            uint kr = (t + WG * i) / 8u;                                                                   \
            kx[i] = vec_k(true, ok + (J0) * P[33], kr, c8, P[33], 1u, nt_, Dh);                            \
            vx[i] = vec_v(true, ov + (J0) * P[38], kr, c8, P[38], 1u, nt_, Dv);                            \
        }                                                                                                  \
    }
#define STORE_TILE()                                                                                       \
    [[unroll]] for (uint i = 0u; i < NLD; ++i) {                                                           \
        uint qi = t + WG * i;                                                                              \
        Ks[(qi / 8u) * SV + qi % 8u] = kx[i];                                                              \
        Vs[(qi / 8u) * SV + qi % 8u] = vx[i];                                                              \
    }
#if PREFETCH
    if (fastkv) LOAD_TILE(0u)
#endif
    for (uint j0 = 0u; j0 < Nk; j0 += BC) {
        uint nt = min(uint(BC), Nk - j0);
        if (fastkv) {
#if !PREFETCH
            LOAD_TILE(j0)
#endif
            STORE_TILE()
        } else {
            [[dont_unroll]] for (uint i = 0u; i < NLD; ++i) {
                uint qi = t + WG * i, kr = qi / 8u;
                uvec4 x = vec_k(vk, ok + j0 * P[33], kr, c8, P[33], P[34], nt, Dh);
                Ks[kr * SV + qi % 8u] = qk_norm ? rms_norm8(x, eps, float(Dh), wk0, wk1) : x;
                Vs[kr * SV + qi % 8u] = vec_v(vv, ov + j0 * P[38], kr, c8, P[38], P[39], nt, Dv);
            }
        }
        barrier();
#if PREFETCH
        if (fastkv && j0 + BC < Nk) LOAD_TILE(j0 + BC)
#endif
        // Scores: 16 x 64 per subgroup, NS fragments.
        ACC_F32(16, FN) s[NS];
        [[unroll]] for (uint j = 0u; j < NS; ++j) {
            s[j] = ACC_F32(16, FN)(0.0);
            [[unroll]] for (uint k = 0u; k < KD; ++k) {
                OPD_B(FK, FN) kf;
                COOP_LOAD(kf, Ks, j * FN * SV + k * (FK / 8u), SV, true);
                s[j] = COOP_MMA(qf[k], kf, s[j]);
            }
        }
        // Bias, causal mask or missing keys: the scores through the slice, where a loop that is not unrolled turns
        // them into final logits (scaled, in log2 units), and back.
        float mul = scale;
        if (has_bias || causal || nt < BC) {
            mul = 1.0;
            [[unroll]] for (uint j = 0u; j < NS; ++j) COOP_STORE(s[j], Ss, ss0 + j * (FN / 4u), SS4, false);
            SUBGROUP_SHARED_BARRIER();
            uint sr = ss0 + r * SS4 + c0 / 4u;
            [[dont_unroll]] for (uint c = 0u; c < CPL; ++c) {
                uint j = j0 + c0 + c;
                float x = uintBitsToFloat(Ss[sr + c / 4u][c % 4u]) * scale;
                if (has_bias && j < Nk && row < Nq) x += ld5(dbias, obias + j * P[44]) * LOG2E;
                if (c0 + c >= nt || (causal && j > row)) x = NEG_INF;
                Ss[sr + c / 4u][c % 4u] = floatBitsToUint(x);
            }
            SUBGROUP_SHARED_BARRIER();
            [[unroll]] for (uint j = 0u; j < NS; ++j) COOP_LOAD(s[j], Ss, ss0 + j * (FN / 4u), SS4, false);
            SUBGROUP_SHARED_BARRIER();
        }
        // Each element's row maximum over the tile (unscaled): the maximum over the fragments, element by element,
        // as one fragment through the slice, where invocations r and r + 16 take half of row r each.
        ACC_F32(16, FN) mf = s[0];
        [[unroll]] for (uint i = 0u; i < NE; ++i) {
            [[unroll]] for (uint j = 1u; j < NS; ++j) mf[i] = max(mf[i], s[j][i]);
        }
        COOP_STORE(mf, Ss, ss0, SS4, false);
        SUBGROUP_SHARED_BARRIER();
        float tmax = NEG_INF;
        [[unroll]] for (uint v = 0u; v < FN / 8u; ++v) {
            vec4 x = uintBitsToFloat(Ss[ss0 + (lane % 16u) * SS4 + (lane / 16u) * (FN / 8u) + v]);
            tmax = max(tmax, max(max(x.x, x.y), max(x.z, x.w)));
        }
        tmax = max(tmax, subgroupShuffleXor(tmax, 16u));
        SUBGROUP_SHARED_BARRIER();
        // The online softmax, element by element (the elements of a row all see the same values); the row sums are
        // kept per element in lf.
        [[unroll]] for (uint i = 0u; i < NE; ++i) {
            float m_new = max(me[i], subgroupShuffle(tmax, erow[i]) * mul);
            float corr = m_new == NEG_INF ? 1.0 : exp2(me[i] - m_new);
            // A row with no key yet: every logit is -inf, and exp2(-inf - 0) = 0.
            float mz = m_new == NEG_INF ? 0.0 : m_new;
            float ps = 0.0;
            [[unroll]] for (uint j = 0u; j < NS; ++j) {
                float p = exp2(fma(s[j][i], mul, -mz));
                s[j][i] = p;
                ps += p;
            }
            lf[i] = lf[i] * corr + ps;
            me[i] = m_new;
            [[unroll]] for (uint n = 0u; n < ND; ++n) o[n][i] *= corr;
        }
        // O += P·V: 16 x 64 per subgroup.
#if FN == FK
        [[unroll]] for (uint k = 0u; k < BC / FK; ++k) {
            OPD_A(16, FK) pa = OPD_A(16, FK)(s[k]);
            [[unroll]] for (uint n = 0u; n < ND; ++n) {
                OPD_B(FK, FN) vf;
                COOP_LOAD(vf, Vs, k * FK * SV + n * (FN / 8u), SV, false);
                o[n] = COOP_MMA(pa, vf, o[n]);
            }
        }
#else
        [[unroll]] for (uint j = 0u; j < NS; ++j) {
            ACC_F16(16, FN) ph = ACC_F16(16, FN)(s[j]);
            COOP_STORE(ph, Ps, ps0 + j * (FN / 8u), SV, false);
        }
        SUBGROUP_SHARED_BARRIER();
        [[unroll]] for (uint k = 0u; k < BC / FK; ++k) {
            OPD_A(16, FK) pa;
            COOP_LOAD(pa, Ps, ps0 + k * (FK / 8u), SV, false);
            [[unroll]] for (uint n = 0u; n < ND; ++n) {
                OPD_B(FK, FN) vf;
                COOP_LOAD(vf, Vs, k * FK * SV + n * (FN / 8u), SV, false);
                o[n] = COOP_MMA(pa, vf, o[n]);
            }
        }
#endif
        barrier();
    }
    // Row sums: the partial sums' fragment through the slice, half a row per invocation.
    float l = 0.0;
    COOP_STORE(lf, Ss, ss0, SS4, false);
    SUBGROUP_SHARED_BARRIER();
    [[unroll]] for (uint v = 0u; v < FN / 8u; ++v) {
        vec4 x = uintBitsToFloat(Ss[ss0 + (lane % 16u) * SS4 + (lane / 16u) * (FN / 8u) + v]);
        l += (x.x + x.y) + (x.z + x.w);
    }
    l += subgroupShuffleXor(l, 16u);
    SUBGROUP_SHARED_BARRIER();
    // Normalised rows back through this subgroup's slice, then out two columns per invocation.
    float inv = l > 0.0 ? 1.0 / l : 0.0;
    [[unroll]] for (uint i = 0u; i < NE; ++i) {
        float iv = subgroupShuffle(inv, erow[i]);
        [[unroll]] for (uint n = 0u; n < ND; ++n) o[n][i] *= iv;
    }
    [[unroll]] for (uint n = 0u; n < ND; ++n) COOP_STORE(o[n], Ss, ss0 + n * (FN / 4u), SS4, false);
    SUBGROUP_SHARED_BARRIER();
    uint sd = P[24];
    for (uint p = lane; p < RS * 32u; p += 32u) {
        uint rr = p / 32u, d = 2u * (p % 32u), orow = i0 + w * RS + rr;
        if (orow >= Nq || d >= Dv) continue;
        vec4 x = uintBitsToFloat(Ss[ss0 + rr * SS4 + d / 4u]);
        float v0 = x[d % 4u], v1 = x[d % 4u + 1u];
        uint e = head_offset(b, h, 20u) + orow * P[23] + d * sd;
        if (d_o == 1u && sd == 1u && (e & 1u) == 0u && d + 1u < Dv) {
            b1[e >> 1] = f32_to_f16(v0) | (f32_to_f16(v1) << 16);
        } else {
            st(d_o, e, v0);
            if (d + 1u < Dv) st(d_o, e + sd, v1);
        }
    }
}
