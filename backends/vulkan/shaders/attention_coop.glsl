// Fused attention on cooperative matrices (VK_NV_cooperative_matrix) for f16 q, k, v with head dims <= 64:
// o = softmax(scale·q̃·k̃ᵀ + bias + causal mask)·v, flash-style, the score matrix never written to memory.
// A 128-invocation workgroup (4 subgroups of 32) takes 64 query rows of one (batch, head), each subgroup 16 of
// them; keys and values stream through shared memory in tiles of 64 (f16, rows padded to 72 halves). Per tile, each
// subgroup computes its 16x64 scores with FM x FN x FK fragments into its slice of shared memory, then runs the
// online softmax there in plain code (two invocations per row, alternate columns; f32, exp2), writes the
// probabilities as f16, multiplies them by the value tile on fragments again, and folds the product into the
// rows it keeps in registers (32 f32 per invocation), rescaled by the running maximum's correction.
//
// Parameters and bindings: as attention.glsl (the host picks this shader only for f16 q, k, v and Dh, Dv <= 64).
#extension GL_NV_cooperative_matrix : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
#define BR 64
#define BC 64
#define D 64
#define SK (D + 8)
// Row stride of the f32 score slices: a multiple of 4 floats (fragment stores) that spreads the rows over banks.
#define SS (BC + 4)
#define NEG_INF uintBitsToFloat(0xff800000u)
#define LOG2E 1.4426950408889634
layout(local_size_x = 128) in;

shared float16_t Ks[BC * SK];
shared float16_t Vs[BC * SK];
shared float16_t Ps[4 * 16 * SK];
shared float Ss[4 * 16 * SS];

uint head_offset(uint b, uint h, uint v) { return P[v] + b * P[v + 1u] + h * P[v + 2u]; }

uint hq(uint e) { return (b2[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }
uint hk(uint e) { return (b3[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }
uint hv(uint e) { return (b4[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }

// Elements (r, c) and (r, c+1) of a [rows x cols] f16 block at base + r*sr + c*sc as two floats (zero outside).
#define DEFINE_PAIR(NAME, BUF, H)                                                                           \
    vec2 NAME(uint base, uint r, uint c, uint sr, uint sc, uint rows, uint cols) {                          \
        if (r >= rows || c >= cols) return vec2(0.0);                                                      \
        uint e = base + r * sr + c * sc;                                                                   \
        if (sc == 1u && (e & 1u) == 0u && c + 1u < cols) return unpackHalf2x16(BUF[e >> 1]);                \
        uint lo = H(e);                                                                                    \
        uint hi = c + 1u < cols ? H(e + sc) : 0u;                                                          \
        return unpackHalf2x16(lo | (hi << 16));                                                            \
    }
DEFINE_PAIR(pair_q, b2, hq)
DEFINE_PAIR(pair_k, b3, hk)
DEFINE_PAIR(pair_v, b4, hv)

// A 64x64 block into `Ks` (q or k, RMS-normed with weights from binding `wb` when qk_norm) or `Vs`: pair
// p = t + 128*i covers row p / 32, columns 2*(p % 32) and +1, so each row is one subgroup (the norm's sum is a
// subgroupAdd).
#define DEFINE_FILL(NAME, PAIR, DST, LDW)                                                                   \
    void NAME(uint base, uint sr, uint sc, uint rows, uint cols, bool norm, uint dw, uint ow, uint sw, float eps) { \
        uint t = gl_LocalInvocationID.x;                                                                   \
        [[unroll]] for (uint i = 0u; i < 16u; ++i) {                                                       \
            uint p = t + 128u * i, r = p / 32u, c = 2u * (p % 32u);                                       \
            vec2 v = PAIR(base, r, c, sr, sc, rows, cols);                                                 \
            if (norm) {                                                                                    \
                float ss = subgroupAdd(dot(v, v));                                                         \
                float inv = 1.0 / sqrt(ss / float(cols) + eps);                                            \
                v *= inv * vec2(c < cols ? LDW(dw, ow + c * sw) : 0.0, c + 1u < cols ? LDW(dw, ow + (c + 1u) * sw) : 0.0); \
            }                                                                                              \
            DST[r * SK + c] = float16_t(v.x);                                                              \
            DST[r * SK + c + 1u] = float16_t(v.y);                                                         \
        }                                                                                                  \
    }
DEFINE_FILL(fill_q, pair_q, Ks, ld6)
DEFINE_FILL(fill_k, pair_k, Ks, ld7)
DEFINE_FILL(fill_v, pair_v, Vs, ld7)

void main() {
    uint H = P[1], Nq = P[2], Nk = P[3], Dh = P[4], Dv = P[5];
    bool causal = P[6] != 0u, has_bias = P[7] != 0u, qk_norm = P[8] != 0u;
    float scale = pf(9) * LOG2E, eps = pf(10);
    uint d_o = P[11], dbias = P[15], dqn = P[16], dkn = P[17];
    uint bh = gl_WorkGroupID.y, b = bh / H, h = bh % H;
    uint i0 = gl_WorkGroupID.x * BR;
    uint w = gl_SubgroupID, lane = gl_SubgroupInvocationID;
    // This invocation's row of the subgroup's 16, and which of the alternate columns (2c + hh) it takes; the
    // row's other invocation is lane ^ 16.
    uint r = lane % 16u, hh = lane / 16u;
    uint row = i0 + w * 16u + r;

    // The query block (normed) through Ks into this subgroup's A fragments.
    uint oq = head_offset(b, h, 25u) + i0 * P[28];
    fill_q(oq, P[28], P[29], Nq - min(Nq, i0), Dh, qk_norm, dqn, P[45], P[46], eps);
    barrier();
    fcoopmatNV<16, gl_ScopeSubgroup, FM, FK> qf[D / FK];
    [[unroll]] for (uint k = 0u; k < D / FK; ++k) coopMatLoadNV(qf[k], Ks, w * 16u * SK + k * FK, SK, false);
    barrier();

    float o[32];
    [[unroll]] for (uint c = 0u; c < 32u; ++c) o[c] = 0.0;
    float m = NEG_INF, l = 0.0;
    uint ok = head_offset(b, h, 30u), ov = head_offset(b, h, 35u);
    uint obias = head_offset(b, h, 40u) + row * P[43];
    uint ss0 = w * 16u * SS, ps0 = w * 16u * SK;

    for (uint j0 = 0u; j0 < Nk; j0 += BC) {
        uint nt = min(uint(BC), Nk - j0);
        fill_k(ok + j0 * P[33], P[33], P[34], nt, Dh, qk_norm, dkn, P[47], P[48], eps);
        fill_v(ov + j0 * P[38], P[38], P[39], nt, Dv, false, 0u, 0u, 0u, 0.0);
        barrier();
        // Scores: 16 x 64 per subgroup.
        [[unroll]] for (uint j = 0u; j < BC / FN; ++j) {
            fcoopmatNV<32, gl_ScopeSubgroup, FM, FN> s = fcoopmatNV<32, gl_ScopeSubgroup, FM, FN>(0.0);
            [[unroll]] for (uint k = 0u; k < D / FK; ++k) {
                fcoopmatNV<16, gl_ScopeSubgroup, FK, FN> kf;
                coopMatLoadNV(kf, Ks, j * FN * SK + k * FK, SK, true);
                s = coopMatMulAddNV(qf[k], kf, s);
            }
            coopMatStoreNV(s, Ss, ss0 + j * FN, SS, false);
        }
        subgroupBarrier();
        // Online softmax over this row's 32 columns, with the partner invocation holding the other 32.
        float sc[32];
        float tmax = NEG_INF;
        [[unroll]] for (uint c = 0u; c < 32u; ++c) {
            uint col = 2u * c + hh, j = j0 + col;
            float s = Ss[ss0 + r * SS + col] * scale;
            if (has_bias && j < Nk && row < Nq) s += ld5(dbias, obias + j * P[44]) * LOG2E;
            if (col >= nt || (causal && j > row)) s = NEG_INF;
            sc[c] = s;
            tmax = max(tmax, s);
        }
        tmax = max(tmax, subgroupShuffleXor(tmax, 16u));
        float m_new = max(m, tmax);
        float corr = m_new == NEG_INF ? 1.0 : exp2(m - m_new);
        float psum = 0.0;
        [[unroll]] for (uint c = 0u; c < 32u; ++c) {
            float p = m_new == NEG_INF ? 0.0 : exp2(sc[c] - m_new);
            psum += p;
            Ps[ps0 + r * SK + 2u * c + hh] = float16_t(p);
        }
        l = l * corr + psum + subgroupShuffleXor(psum, 16u);
        m = m_new;
        subgroupBarrier();
        // P·V: 16 x 64 per subgroup, into the same slice of Ss, then folded into the registers.
        fcoopmatNV<16, gl_ScopeSubgroup, FM, FK> pf_[BC / FK];
        [[unroll]] for (uint k = 0u; k < BC / FK; ++k) coopMatLoadNV(pf_[k], Ps, ps0 + k * FK, SK, false);
        [[unroll]] for (uint j = 0u; j < D / FN; ++j) {
            fcoopmatNV<32, gl_ScopeSubgroup, FM, FN> pv = fcoopmatNV<32, gl_ScopeSubgroup, FM, FN>(0.0);
            [[unroll]] for (uint k = 0u; k < BC / FK; ++k) {
                fcoopmatNV<16, gl_ScopeSubgroup, FK, FN> vf;
                coopMatLoadNV(vf, Vs, k * FK * SK + j * FN, SK, false);
                pv = coopMatMulAddNV(pf_[k], vf, pv);
            }
            coopMatStoreNV(pv, Ss, ss0 + j * FN, SS, false);
        }
        subgroupBarrier();
        [[unroll]] for (uint c = 0u; c < 32u; ++c) o[c] = o[c] * corr + Ss[ss0 + r * SS + 2u * c + hh];
        barrier();
    }
    // Normalised rows back through this subgroup's slice, then out two columns per invocation.
    float inv = l > 0.0 ? 1.0 / l : 0.0;
    [[unroll]] for (uint c = 0u; c < 32u; ++c) Ss[ss0 + r * SS + 2u * c + hh] = o[c] * inv;
    subgroupBarrier();
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
