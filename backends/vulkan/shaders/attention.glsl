// Fused attention o = softmax(scale·q̃·k̃ᵀ + bias + causal mask)·v with an online softmax: keys and values stream
// through shared memory in tiles of TK and the score matrix is never written. One invocation per query row,
// WG rows per workgroup; workgroup (x, y) = (query block, batch·head). q̃, k̃ are RMS-normed per head when qk_norm.
// Head dims up to MAXD, set by the including shader (attention.comp: 64, attention128.comp: 128); rows are
// zero-padded to MAXD and held as vec4s.
//
// Loops over the head dim have constant trip counts and are unrolled, and the query block goes through shared
// memory on its way in and out: besides speed, lavapipe (Mesa < 23) ends a shader invocation after 65535 loop
// iterations in total, which per-key loops over the head dim exceeded at about a thousand keys. (The per-key
// loops stay loops: unrolling them too made lavapipe's pipeline build take half a minute.)
//
// P: [0] B, [1] H, [2] Nq, [3] Nk, [4] Dh, [5] Dv, [6] causal, [7] has bias, [8] qk_norm, [9] scale, [10] eps,
// [11..18) dtypes o, q, k, v, bias, q_norm, k_norm, views (offset + 4 strides): o@20, q@25, k@30, v@35,
// bias@40; q_norm@45, k_norm@47 (offset, stride). Bindings: 1 o, 2 q, 3 k, 4 v, 5 bias, 6 q_norm, 7 k_norm.
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
#define D4 (MAXD / 4)
#define NEG_INF uintBitsToFloat(0xff800000u)
layout(local_size_x = WG) in;

shared vec4 Qs[WG][D4];
shared vec4 Ks[TK][D4];
shared vec4 Vs[TK][D4];
shared vec4 Wq[D4];
shared vec4 Wk[D4];

uint head_offset(uint b, uint h, uint v) { return P[v] + b * P[v + 1u] + h * P[v + 2u]; }

void main() {
    uint H = P[1], Nq = P[2], Nk = P[3], Dh = P[4], Dv = P[5];
    bool causal = P[6] != 0u, has_bias = P[7] != 0u, qk_norm = P[8] != 0u;
    float scale = pf(9), eps = pf(10);
    uint d_o = P[11], dq = P[12], dk = P[13], dv = P[14], dbias = P[15], dqn = P[16], dkn = P[17];
    uint bh = gl_WorkGroupID.y, b = bh / H, h = bh % H;
    uint t = gl_LocalInvocationID.x;
    uint i0 = gl_WorkGroupID.x * WG;
    uint i = i0 + t;
    bool live = i < Nq;

    // The query block, zero-padded, into shared memory; each invocation then takes its row (RMS-normed).
    uint oq = head_offset(b, h, 25u);
    for (uint e = t; e < WG * MAXD; e += WG) {
        uint r = e / MAXD, d = e % MAXD;
        Qs[r][d / 4u][d % 4u] = (i0 + r < Nq && d < Dh) ? ld2(dq, oq + (i0 + r) * P[28] + d * P[29]) : 0.0;
    }
    if (qk_norm) {
        for (uint d = t; d < MAXD; d += WG) {
            Wq[d / 4u][d % 4u] = d < Dh ? ld6(dqn, P[45] + d * P[46]) : 0.0;
            Wk[d / 4u][d % 4u] = d < Dh ? ld7(dkn, P[47] + d * P[48]) : 0.0;
        }
    }
    barrier();
    vec4 q[D4];
    [[unroll]] for (uint d = 0u; d < D4; ++d) q[d] = Qs[t][d];
    if (qk_norm) {
        float s = 0.0;
        [[unroll]] for (uint d = 0u; d < D4; ++d) s += dot(q[d], q[d]);
        float inv = 1.0 / sqrt(s / float(Dh) + eps);
        [[unroll]] for (uint d = 0u; d < D4; ++d) q[d] *= inv * Wq[d];
    }
    vec4 acc[D4];
    [[unroll]] for (uint d = 0u; d < D4; ++d) acc[d] = vec4(0.0);
    float m = NEG_INF, l = 0.0;
    uint ok = head_offset(b, h, 30u), ov = head_offset(b, h, 35u);
    uint obias = head_offset(b, h, 40u) + i * P[43];

    for (uint j0 = 0u; j0 < Nk; j0 += TK) {
        uint nt = min(uint(TK), Nk - j0);
        for (uint e = t; e < TK * MAXD; e += WG) {
            uint jj = e / MAXD, d = e % MAXD;
            Ks[jj][d / 4u][d % 4u] = (jj < nt && d < Dh) ? ld3(dk, ok + (j0 + jj) * P[33] + d * P[34]) : 0.0;
            Vs[jj][d / 4u][d % 4u] = (jj < nt && d < Dv) ? ld4(dv, ov + (j0 + jj) * P[38] + d * P[39]) : 0.0;
        }
        barrier();
        if (qk_norm && t < nt) {
            float s = 0.0;
            [[unroll]] for (uint d = 0u; d < D4; ++d) s += dot(Ks[t][d], Ks[t][d]);
            float inv = 1.0 / sqrt(s / float(Dh) + eps);
            [[unroll]] for (uint d = 0u; d < D4; ++d) Ks[t][d] *= inv * Wk[d];
        }
        barrier();
        if (live) {
            float sc[TK];
            float tmax = NEG_INF;
            for (uint jj = 0u; jj < TK; ++jj) {
                float s = NEG_INF;
                if (jj < nt) {
                    s = 0.0;
                    [[unroll]] for (uint d = 0u; d < D4; ++d) s += dot(q[d], Ks[jj][d]);
                    s *= scale;
                    if (has_bias) s += ld5(dbias, obias + (j0 + jj) * P[44]);
                    if (causal && j0 + jj > i) s = NEG_INF;
                }
                sc[jj] = s;
                tmax = max(tmax, s);
            }
            float m_new = max(m, tmax);
            if (m_new > NEG_INF) {
                float corr = exp(m - m_new);
                l *= corr;
                [[unroll]] for (uint d = 0u; d < D4; ++d) acc[d] *= corr;
                for (uint jj = 0u; jj < TK; ++jj) {
                    float p = jj < nt ? exp(sc[jj] - m_new) : 0.0;
                    l += p;
                    [[unroll]] for (uint d = 0u; d < D4; ++d) acc[d] += p * Vs[jj][d];
                }
                m = m_new;
            }
        }
        barrier();
    }
    // Normalised rows back through shared memory, stored by the whole workgroup.
    [[unroll]] for (uint d = 0u; d < D4; ++d) Qs[t][d] = live ? acc[d] / l : vec4(0.0);
    barrier();
    uint oo = head_offset(b, h, 20u);
    for (uint e = t; e < WG * MAXD; e += WG) {
        uint r = e / MAXD, d = e % MAXD;
        if (i0 + r < Nq && d < Dv) st(d_o, oo + (i0 + r) * P[23] + d * P[24], Qs[r][d / 4u][d % 4u]);
    }
}
