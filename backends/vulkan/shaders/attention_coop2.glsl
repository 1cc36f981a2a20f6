// Fused attention on cooperative matrices (VK_NV_cooperative_matrix) for f16 q, k, v with head dims <= 64:
// o = softmax(scale·q̃·k̃ᵀ + bias + causal mask)·v, flash-style, the score matrix never written to memory.
// A 128-invocation workgroup (4 subgroups of 32) takes 64 query rows of one (batch, head), each subgroup 16 of
// them; keys and values stream through shared memory in tiles of 64, as 16-byte vectors of 8 halves (rows padded
// to 72 halves; fragment offsets and strides in vectors). Per tile, each subgroup computes its 16x64 scores with
// FM x FN x FK fragments into its f32 slice of shared memory and runs the online softmax there in plain code (two
// invocations per row, 32 columns each; f32, exp2; a pass for the maximum, a pass for the probabilities, which go
// out as f16 vectors). The output rows stay on accumulator fragments: each tile rescales them by the running
// maximum's correction, then adds the probabilities times the value tile on fragments.
//
// The per-row correction reaches the fragments' elements through a matrix: the subgroup writes it as a 16 x 16
// (16 x FN) block whose row r holds row r's factor, loads that as a fragment of the accumulators' type, and
// multiplies element by element (`length()` and `[]`): fragments of one type share one element-to-position
// mapping, whatever it is.
//
// Parameters and bindings: as attention.glsl, plus [50], [51], [52]: q, k, v are vector-loadable (contiguous
// along the head dim, rows 16-byte aligned). The host picks this shader only for f16 q, k, v and Dh, Dv <= 64.
#extension GL_NV_cooperative_matrix : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
// Execution barrier of the subgroup that orders its shared-memory accesses only (subgroupBarrier() also orders
// buffer memory, which cost a wait for outstanding memory operations at each of the three hand-offs per tile).
#define SUBGROUP_SHARED_BARRIER() \
    controlBarrier(gl_ScopeSubgroup, gl_ScopeSubgroup, gl_StorageSemanticsShared, gl_SemanticsAcquireRelease)
#define BR 64
#define BC 64
#define D 64
// Shared row stride in 8-half vectors (72 halves).
#define SV ((D + 8) / 8)
// Row stride of the f32 score slices: a multiple of 4 floats (fragment stores) that spreads rows over banks.
#define SS (BC + 4)
#define NEG_INF uintBitsToFloat(0xff800000u)
#define LOG2E 1.4426950408889634
layout(local_size_x = 128) in;

layout(std430, set = 0, binding = 2) readonly buffer In2v { uvec4 q_v[]; };
layout(std430, set = 0, binding = 3) readonly buffer In3v { uvec4 k_v[]; };
layout(std430, set = 0, binding = 4) readonly buffer In4v { uvec4 v_v[]; };

shared uvec4 Ks[BC * SV];
shared uvec4 Vs[BC * SV];
shared uvec4 Ps[4 * 16 * SV];
shared float Ss[4 * 16 * SS];

uint head_offset(uint b, uint h, uint v) { return P[v] + b * P[v + 1u] + h * P[v + 2u]; }

uint hq(uint e) { return (b2[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }
uint hk(uint e) { return (b3[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }
uint hv(uint e) { return (b4[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }

// Halves c..c+7 of row r of a [rows x cols] f16 block at base + r*sr + c*sc as a vector (zero outside); `vec`:
// one aligned 128-bit load.
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
DEFINE_VEC8(vec_q, b2, q_v, hq)
DEFINE_VEC8(vec_k, b3, k_v, hk)
DEFINE_VEC8(vec_v, b4, v_v, hv)

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
    // Tile loads: vector t + 128*i (i < 4) covers row (t + 128 i) / 8, columns c8 .. c8+7 (the same columns for
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
    // This invocation's row of its subgroup's 16 and which half of the 64 columns it takes (the row's other
    // invocation is lane ^ 16).
    uint r = lane % 16u, hh = lane / 16u;
    uint row = i0 + w * 16u + r;

    // The query block (normed) through Ks into this subgroup's A fragments.
    uint oq = head_offset(b, h, 25u) + i0 * P[28];
    [[unroll]] for (uint i = 0u; i < 4u; ++i) {
        uint qi = t + 128u * i;
        uvec4 x = vec_q(vq, oq, qi / 8u, c8, P[28], P[29], Nq - min(Nq, i0), Dh);
        Ks[(qi / 8u) * SV + qi % 8u] = qk_norm ? rms_norm8(x, eps, float(Dh), wq0, wq1) : x;
    }
    barrier();
    // Fragments are separate variables, not arrays (NVIDIA's compiler may put arrays of them in local memory).
    fcoopmatNV<16, gl_ScopeSubgroup, FM, FK> qf0, qf1, qf2, qf3, pf0, pf1, pf2, pf3;
    coopMatLoadNV(qf0, Ks, w * 16u * SV, SV, false);
    coopMatLoadNV(qf1, Ks, w * 16u * SV + 2u, SV, false);
    coopMatLoadNV(qf2, Ks, w * 16u * SV + 4u, SV, false);
    coopMatLoadNV(qf3, Ks, w * 16u * SV + 6u, SV, false);
    barrier();

    fcoopmatNV<32, gl_ScopeSubgroup, FM, FN> o0, o1, o2, o3, o4, o5, o6, o7, cm;
#define ACC0 fcoopmatNV<32, gl_ScopeSubgroup, FM, FN>(0.0)
    o0 = ACC0; o1 = ACC0; o2 = ACC0; o3 = ACC0; o4 = ACC0; o5 = ACC0; o6 = ACC0; o7 = ACC0;
    float m = NEG_INF, l = 0.0;
    uint ok = head_offset(b, h, 30u), ov = head_offset(b, h, 35u);
    uint obias = head_offset(b, h, 40u) + row * P[43];
    uint ss0 = w * 16u * SS, ps0 = w * 16u * SV, c0 = hh * 32u;

    for (uint j0 = 0u; j0 < Nk; j0 += BC) {
        uint nt = min(uint(BC), Nk - j0);
        [[unroll]] for (uint i = 0u; i < 4u; ++i) {
            uint qi = t + 128u * i, kr = qi / 8u;
            uvec4 x = vec_k(vk, ok + j0 * P[33], kr, c8, P[33], P[34], nt, Dh);
            Ks[kr * SV + qi % 8u] = qk_norm ? rms_norm8(x, eps, float(Dh), wk0, wk1) : x;
            Vs[kr * SV + qi % 8u] = vec_v(vv, ov + j0 * P[38], kr, c8, P[38], P[39], nt, Dv);
        }
        barrier();
        // Scores: 16 x 64 per subgroup.
        [[unroll]] for (uint j = 0u; j < BC / FN; ++j) {
            fcoopmatNV<32, gl_ScopeSubgroup, FM, FN> s = fcoopmatNV<32, gl_ScopeSubgroup, FM, FN>(0.0);
#define QK(k, QF)                                                     \
    {                                                                 \
        fcoopmatNV<16, gl_ScopeSubgroup, FK, FN> kf;                  \
        coopMatLoadNV(kf, Ks, j * FN * SV + (k) * 2u, SV, true);      \
        s = coopMatMulAddNV(QF, kf, s);                               \
    }
            QK(0u, qf0) QK(1u, qf1) QK(2u, qf2) QK(3u, qf3)
            coopMatStoreNV(s, Ss, ss0 + j * FN, SS, false);
        }
        SUBGROUP_SHARED_BARRIER();
        // Online softmax over this row's 32 columns, with the partner invocation holding the other 32: the
        // maximum, then the probabilities.
        float tmax = NEG_INF;
        [[unroll]] for (uint c = 0u; c < 32u; ++c) {
            uint j = j0 + c0 + c;
            float s = Ss[ss0 + r * SS + c0 + c] * scale;
            if (has_bias && j < Nk && row < Nq) s += ld5(dbias, obias + j * P[44]) * LOG2E;
            if (c0 + c >= nt || (causal && j > row)) s = NEG_INF;
            tmax = max(tmax, s);
        }
        tmax = max(tmax, subgroupShuffleXor(tmax, 16u));
        float m_new = max(m, tmax);
        float corr = m_new == NEG_INF ? 1.0 : exp2(m - m_new);
        float psum = 0.0;
        [[unroll]] for (uint v = 0u; v < 4u; ++v) {
            float pr[8];
            [[unroll]] for (uint e = 0u; e < 8u; ++e) {
                uint c = 8u * v + e, j = j0 + c0 + c;
                float s = Ss[ss0 + r * SS + c0 + c] * scale;
                if (has_bias && j < Nk && row < Nq) s += ld5(dbias, obias + j * P[44]) * LOG2E;
                if (c0 + c >= nt || (causal && j > row)) s = NEG_INF;
                pr[e] = m_new == NEG_INF ? 0.0 : exp2(s - m_new);
                psum += pr[e];
            }
            Ps[ps0 + r * SV + hh * 4u + v] =
                uvec4(packHalf2x16(vec2(pr[0], pr[1])), packHalf2x16(vec2(pr[2], pr[3])),
                      packHalf2x16(vec2(pr[4], pr[5])), packHalf2x16(vec2(pr[6], pr[7])));
        }
        l = l * corr + psum + subgroupShuffleXor(psum, 16u);
        m = m_new;
        SUBGROUP_SHARED_BARRIER();
        // The corrections as a matrix (row r: row r's factor) over the first FN columns of the slice.
        [[unroll]] for (uint e = 0u; e < FN / 2u; ++e) Ss[ss0 + r * SS + hh * (FN / 2u) + e] = corr;
        SUBGROUP_SHARED_BARRIER();
        coopMatLoadNV(cm, Ss, ss0, SS, false);
        [[unroll]] for (uint e = 0u; e < cm.length(); ++e) {
            o0[e] *= cm[e]; o1[e] *= cm[e]; o2[e] *= cm[e]; o3[e] *= cm[e];
#if FN == 8
            o4[e] *= cm[e]; o5[e] *= cm[e]; o6[e] *= cm[e]; o7[e] *= cm[e];
#endif
        }
        // P·V onto the output fragments.
        coopMatLoadNV(pf0, Ps, ps0, SV, false);
        coopMatLoadNV(pf1, Ps, ps0 + 2u, SV, false);
        coopMatLoadNV(pf2, Ps, ps0 + 4u, SV, false);
        coopMatLoadNV(pf3, Ps, ps0 + 6u, SV, false);
#define PV(k, PF, j, OJ)                                                                  \
    {                                                                                     \
        fcoopmatNV<16, gl_ScopeSubgroup, FK, FN> vf;                                      \
        coopMatLoadNV(vf, Vs, (k) * 16u * SV + (j) * (FN / 8u), SV, false);                \
        OJ = coopMatMulAddNV(PF, vf, OJ);                                                 \
    }
#if FN == 8
#define PV_K(k, PF) PV(k, PF, 0u, o0) PV(k, PF, 1u, o1) PV(k, PF, 2u, o2) PV(k, PF, 3u, o3) \
                    PV(k, PF, 4u, o4) PV(k, PF, 5u, o5) PV(k, PF, 6u, o6) PV(k, PF, 7u, o7)
#else
#define PV_K(k, PF) PV(k, PF, 0u, o0) PV(k, PF, 1u, o1) PV(k, PF, 2u, o2) PV(k, PF, 3u, o3)
#endif
        PV_K(0u, pf0) PV_K(1u, pf1) PV_K(2u, pf2) PV_K(3u, pf3)
        barrier();
    }
    // Normalised rows (1/l as a matrix, like the corrections) back through this subgroup's slice, then out two
    // columns per invocation.
    float inv = l > 0.0 ? 1.0 / l : 0.0;
    [[unroll]] for (uint e = 0u; e < FN / 2u; ++e) Ss[ss0 + r * SS + hh * (FN / 2u) + e] = inv;
    SUBGROUP_SHARED_BARRIER();
    coopMatLoadNV(cm, Ss, ss0, SS, false);
    SUBGROUP_SHARED_BARRIER();
    [[unroll]] for (uint e = 0u; e < cm.length(); ++e) {
        o0[e] *= cm[e]; o1[e] *= cm[e]; o2[e] *= cm[e]; o3[e] *= cm[e];
#if FN == 8
        o4[e] *= cm[e]; o5[e] *= cm[e]; o6[e] *= cm[e]; o7[e] *= cm[e];
#endif
    }
    coopMatStoreNV(o0, Ss, ss0, SS, false);
    coopMatStoreNV(o1, Ss, ss0 + FN, SS, false);
    coopMatStoreNV(o2, Ss, ss0 + 2u * FN, SS, false);
    coopMatStoreNV(o3, Ss, ss0 + 3u * FN, SS, false);
#if FN == 8
    coopMatStoreNV(o4, Ss, ss0 + 4u * FN, SS, false);
    coopMatStoreNV(o5, Ss, ss0 + 5u * FN, SS, false);
    coopMatStoreNV(o6, Ss, ss0 + 6u * FN, SS, false);
    coopMatStoreNV(o7, Ss, ss0 + 7u * FN, SS, false);
#endif
    SUBGROUP_SHARED_BARRIER();
    uint sd = P[24];
    for (uint p = lane; p < 16u * 32u; p += gl_SubgroupSize) {
        uint rr = p / 32u, d = 2u * (p % 32u), orow = i0 + w * 16u + rr;
        if (orow >= Nq || d >= Dv) continue;
        float v0 = Ss[ss0 + rr * SS + d], v1 = Ss[ss0 + rr * SS + d + 1u];
        uint e = head_offset(b, h, 20u) + orow * P[23] + d * sd;
        if (d_o == 1u && sd == 1u && (e & 1u) == 0u && d + 1u < Dv) {
            b1[e >> 1] = f32_to_f16(v0) | (f32_to_f16(v1) << 16);
        } else {
            st(d_o, e, v0);
            if (d + 1u < Dv) st(d_o, e + sd, v1);
        }
    }
}
