// Fused attention on NVIDIA tensor cores (sm_80+), flash style: a work-group of ATT_WARPS warps (4 or 8) owns
// 16 query rows per warp; for each tile of 64 keys a warp computes its 16x64 scores S = Q·Kᵀ with mma.sync, keeps the
// online softmax (running row max and sum) in registers, and accumulates O += P·V with P rounded to the MMA
// operand type (the C fragment of S has the layout of P's A fragment, so P never leaves registers). The score
// matrix is never written. Used for f16/bf16 q, k, v with head dim D = Dh = Dv (build option, a multiple of 16
// up to 64: local memory), without bias, causal mask or qk norm (those run on attention.cl). Helpers: mma.cl.
// ATTN_PREFETCH (build option, 0 or 1): load the next K/V tile into registers during the current one.
// ATT_WARPS (build option): 4, or 8 where D is a multiple of 32 (whole staging chunks per thread).

#define ATT_THREADS (32 * ATT_WARPS)
#define BQ (16 * ATT_WARPS) // query rows per work-group: 16 per warp
#define BKV 64
#define LDQ (D + 8)   // pitch of Qs and Ks rows (16-bit elements)
#define LDV (BKV + 8) // pitch of Vt rows

inline float shfl_xor(float v, uint lane_mask) {
    uint r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=r"(r) : "r"(as_uint(v)), "r"(lane_mask));
    return as_float(r);
}

// Two floats rounded to the MMA operand type and packed (lo in the low half), in one instruction.
inline uint pack2(float lo, float hi) {
    uint r;
#if MMA_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

// Whether a [.., N, D] view's rows are contiguous, 16-byte aligned MMA_DT data (copied 16 bytes at a time).
#define RAW_ROWS(dt, base, row_st, d_st) ((dt) == MMA_DT && (d_st) == 1 && (base) % 8 == 0 && (row_st) % 8 == 0)

// Stage a [64 x D] block (rows r0.., dims 0..D) of a [.., N, D] view into local memory as 16-bit MMA operands,
// zero past N: row-major (dst[r * pitch + d]) or transposed (dst[d * pitch + r]). The general path, for views
// that are not RAW_ROWS; MMA_DT data is copied as bits (a float round trip would cost a conversion each way).
inline void stage_rows(local ushort *dst, uint pitch, uint transpose, global const uchar *p, uint dt, ulong base,
                       ulong row_st, ulong d_st, uint r0, uint N, uint tid) {
    for (uint e = tid; e < 64 * D; e += ATT_THREADS) {
        uint r = e / D, d = e - r * D;
        ushort x = 0;
        if (r0 + r < N) {
            ulong i = base + (r0 + r) * row_st + d * d_st;
            x = dt == MMA_DT ? ((global const ushort *)p)[i] : to_mma_bits(ld(p, dt, i));
        }
        dst[transpose ? d * pitch + r : r * pitch + d] = x;
    }
}

// The RAW_ROWS path, split so that a tile's global loads can be issued before the MMAs on the previous tile:
// fetch_rows loads this thread's D / 16 chunks of 8 values into registers, put_rows stores them.
// Row-major tiles (Q, K) map consecutive threads along a row (coalesced loads, 16-byte local stores); the
// transposed tile (V) maps consecutive threads to consecutive rows, so that each 16-bit local store of a warp
// covers 16 consecutive words (conflict free).
#define CHUNKS (64 * D / 8 / ATT_THREADS)
#if (64 * D / 8) % ATT_THREADS != 0
#error "each thread must stage whole 8-element chunks of a 64-row block"
#endif
inline uint2 chunk_pos(uint c, uint transpose) {
    return transpose ? (uint2)(c % 64, (c / 64) * 8) : (uint2)(c / (D / 8), (c % (D / 8)) * 8);
}

inline void fetch_rows(uint4 *regs, uint transpose, global const ushort *p, ulong base, ulong row_st, uint r0,
                       uint N, uint tid) {
    for (uint i = 0; i < CHUNKS; ++i) {
        uint2 rd = chunk_pos(tid + i * ATT_THREADS, transpose);
        regs[i] = r0 + rd.x < N ? *(global const uint4 *)(p + base + (r0 + rd.x) * row_st + rd.y) : (uint4)(0u);
    }
}

inline void put_rows(local ushort *dst, uint pitch, uint transpose, const uint4 *regs, uint tid) {
    for (uint i = 0; i < CHUNKS; ++i) {
        uint2 rd = chunk_pos(tid + i * ATT_THREADS, transpose);
        if (transpose) {
            uint w[4] = {regs[i].x, regs[i].y, regs[i].z, regs[i].w};
            for (uint q = 0; q < 4; ++q) {
                dst[(rd.y + 2 * q) * pitch + rd.x] = (ushort)(w[q] & 0xffffu);
                dst[(rd.y + 2 * q + 1) * pitch + rd.x] = (ushort)(w[q] >> 16);
            }
        } else {
            *(local uint4 *)&dst[rd.x * pitch + rd.y] = regs[i];
        }
    }
}

kernel __attribute__((reqd_work_group_size(ATT_THREADS, 1, 1)))
void attention_mma(uint H, uint Nq, uint Nk, float scale,
                   global const uchar *q, uint qdt, View qv,
                   global const uchar *k, uint kdt, View kv,
                   global const uchar *v, uint vdt, View vv,
                   global uchar *o, uint odt, View ov) {
    local ushort Qs[BQ * LDQ] __attribute__((aligned(16)));
    local ushort Ks[BKV * LDQ] __attribute__((aligned(16)));
    local ushort Vt[D * LDV] __attribute__((aligned(16)));
    const uint tid = get_local_id(0), lane = tid & 31u, warp = tid >> 5;
    const uint g = lane >> 2, t = lane & 3u;
    const uint q0 = get_group_id(0) * BQ;
    const float scale2 = scale * M_LOG2E_F;
    const uint bh = get_group_id(1), b = bh / H, h = bh - (bh / H) * H;
    const ulong qb = qv.off + b * qv.st[0] + h * qv.st[1];
    const ulong kb = kv.off + b * kv.st[0] + h * kv.st[1];
    const ulong vb = vv.off + b * vv.st[0] + h * vv.st[1];
    const ulong ob = ov.off + b * ov.st[0] + h * ov.st[1];

    for (uint r0 = 0; r0 < BQ; r0 += 64) { // the Q block in blocks of 64 rows
        if (RAW_ROWS(qdt, qb, qv.st[2], qv.st[3])) {
            uint4 rq[CHUNKS];
            fetch_rows(rq, 0, (global const ushort *)q, qb, qv.st[2], q0 + r0, Nq, tid);
            put_rows(Qs + r0 * LDQ, LDQ, 0, rq, tid);
        } else {
            stage_rows(Qs + r0 * LDQ, LDQ, 0, q, qdt, qb, qv.st[2], qv.st[3], q0 + r0, Nq, tid);
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    uint qf[D / 16][4];
    const uint wr = warp * 16;
    for (uint ks = 0; ks < D / 16; ++ks) {
        uint c = ks * 16 + t * 2;
        qf[ks][0] = *(local const uint *)&Qs[(wr + g) * LDQ + c];
        qf[ks][1] = *(local const uint *)&Qs[(wr + g + 8) * LDQ + c];
        qf[ks][2] = *(local const uint *)&Qs[(wr + g) * LDQ + c + 8];
        qf[ks][3] = *(local const uint *)&Qs[(wr + g + 8) * LDQ + c + 8];
    }
    float acc[D / 8][4];
    for (uint j = 0; j < D / 8; ++j)
        for (uint r = 0; r < 4; ++r) acc[j][r] = 0.0f;
    float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f}; // rows g and g + 8 of this warp

    // K and V tiles: raw rows are prefetched into registers one tile ahead (their loads overlap the MMAs and the
    // softmax of the previous tile); other views are staged with conversion after the barrier.
    const bool pf = ATTN_PREFETCH && RAW_ROWS(kdt, kb, kv.st[2], kv.st[3]) && RAW_ROWS(vdt, vb, vv.st[2], vv.st[3]);
    global const ushort *k16 = (global const ushort *)k, *v16 = (global const ushort *)v;
    uint4 rk[CHUNKS], rv[CHUNKS];
    if (pf) {
        fetch_rows(rk, 0, k16, kb, kv.st[2], 0, Nk, tid);
        fetch_rows(rv, 1, v16, vb, vv.st[2], 0, Nk, tid);
    }
    for (uint j0 = 0; j0 < Nk; j0 += BKV) {
        barrier(CLK_LOCAL_MEM_FENCE);
        if (pf) {
            put_rows(Ks, LDQ, 0, rk, tid);
            put_rows(Vt, LDV, 1, rv, tid);
            if (j0 + BKV < Nk) {
                fetch_rows(rk, 0, k16, kb, kv.st[2], j0 + BKV, Nk, tid);
                fetch_rows(rv, 1, v16, vb, vv.st[2], j0 + BKV, Nk, tid);
            }
        } else {
            stage_rows(Ks, LDQ, 0, k, kdt, kb, kv.st[2], kv.st[3], j0, Nk, tid);
            stage_rows(Vt, LDV, 1, v, vdt, vb, vv.st[2], vv.st[3], j0, Nk, tid);
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        float s[BKV / 8][4];
        for (uint jn = 0; jn < BKV / 8; ++jn) {
            for (uint r = 0; r < 4; ++r) s[jn][r] = 0.0f;
            for (uint ks = 0; ks < D / 16; ++ks) {
                uint kf[2];
                uint c = ks * 16 + t * 2;
                kf[0] = *(local const uint *)&Ks[(jn * 8 + g) * LDQ + c];
                kf[1] = *(local const uint *)&Ks[(jn * 8 + g) * LDQ + c + 8];
                mma_16816(s[jn], qf[ks], kf);
            }
        }
        // Scale (to base 2: exp(x) = 2^(x·log2 e), so each exponential is one ex2), mask keys past Nk, and update
        // the running max of each of the two rows.
        float mt[2] = {-INFINITY, -INFINITY};
        for (uint jn = 0; jn < BKV / 8; ++jn) {
            for (uint r = 0; r < 4; ++r) {
                uint key = j0 + jn * 8 + t * 2 + (r & 1u);
                s[jn][r] = key < Nk ? s[jn][r] * scale2 : -INFINITY;
                mt[r >> 1] = fmax(mt[r >> 1], s[jn][r]);
            }
        }
        float corr[2];
        for (uint i = 0; i < 2; ++i) {
            mt[i] = fmax(mt[i], shfl_xor(mt[i], 1));
            mt[i] = fmax(mt[i], shfl_xor(mt[i], 2));
            float mn = fmax(m_row[i], mt[i]);
            corr[i] = mn == -INFINITY ? 1.0f : native_exp2(m_row[i] - mn);
            m_row[i] = mn;
            l_row[i] *= corr[i];
        }
        for (uint j = 0; j < D / 8; ++j)
            for (uint r = 0; r < 4; ++r) acc[j][r] *= corr[r >> 1];
        for (uint jn = 0; jn < BKV / 8; ++jn) {
            for (uint r = 0; r < 4; ++r) {
                float m = m_row[r >> 1];
                float p = m == -INFINITY ? 0.0f : native_exp2(s[jn][r] - m);
                s[jn][r] = p;
                l_row[r >> 1] += p;
            }
        }
        // O += P·V: P's A fragment for keys 16kk..16kk+15 is the C fragments of S tiles 2kk and 2kk+1.
        for (uint kk = 0; kk < BKV / 16; ++kk) {
            uint pf[4];
            pf[0] = pack2(s[2 * kk][0], s[2 * kk][1]);
            pf[1] = pack2(s[2 * kk][2], s[2 * kk][3]);
            pf[2] = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pf[3] = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            for (uint jn = 0; jn < D / 8; ++jn) {
                uint vf[2];
                uint c = kk * 16 + t * 2;
                vf[0] = *(local const uint *)&Vt[(jn * 8 + g) * LDV + c];
                vf[1] = *(local const uint *)&Vt[(jn * 8 + g) * LDV + c + 8];
                mma_16816(acc[jn], pf, vf);
            }
        }
    }
    for (uint i = 0; i < 2; ++i) {
        l_row[i] += shfl_xor(l_row[i], 1);
        l_row[i] += shfl_xor(l_row[i], 2);
    }
    for (uint j = 0; j < D / 8; ++j) {
        for (uint r = 0; r < 4; ++r) {
            uint row = q0 + wr + g + (r >> 1) * 8, c = j * 8 + t * 2 + (r & 1u);
            if (row < Nq) st(o, odt, ob + row * ov.st[2] + c * ov.st[3], acc[j][r] / l_row[r >> 1]);
        }
    }
}
