// Tensor-core GEMM body for NVIDIA (sm_80+), through inline PTX `mma.sync.m16n8k16` with f32 accumulation.
// Built only where the device says it has tensor cores; instantiated like gemm_tile.cl (same macros, same
// kernel arguments), plus A_RAW_OK / A_RAW_ROW(m) and B_RAW_OK / B_RAW_COL(n): when an operand is already 16-bit
// MMA data, contiguous and 16-byte aligned along k, a pointer to its row (column) for 8-wide copies.
// Operands are staged in local memory as 16-bit MMA_BF16 ? bf16 : f16 bits, so the kernel is exact for f16
// (resp. bf16) inputs; the host only picks it for those. Helpers and tile sizes are in mma.cl: a work-group of
// MMA_WM x MMA_WN warps computes a BM x BN tile, each warp MMA_MI x MMA_NJ MMA tiles of 16x8.

kernel __attribute__((reqd_work_group_size(MMA_THREADS, 1, 1)))
void GEMM_NAME(GEMM_ARGS) {
    local ushort As[BM * LDS] __attribute__((aligned(16))); // [m][k]
    local ushort Bs[BN * LDS] __attribute__((aligned(16))); // [n][k]: a B fragment's two k values are one 32-bit word
    const uint tid = get_local_id(0), lane = tid & 31u, warp = tid >> 5;
    const uint g = lane >> 2, t = lane & 3u;
    const uint wm = (warp / MMA_WN) * (16 * MMA_MI), wn = (warp % MMA_WN) * (8 * MMA_NJ);
    const uint m0 = get_group_id(1) * BM, n0 = get_group_id(0) * BN;
    GEMM_PROLOGUE
    const bool a_raw = A_RAW_OK, b_raw = B_RAW_OK;
#ifdef B_COLUMN // see gemm_tile.cl
#if MMA_THREADS % BN != 0
#error "B_COLUMN needs whole columns per thread"
#endif
    const uint bnn = tid % BN, bkk0 = tid / BN, bn = n0 + bnn;
    B_COLUMN(bn)
#endif
    float acc[MMA_MI][MMA_NJ][4];
    for (uint i = 0; i < MMA_MI; ++i)
        for (uint j = 0; j < MMA_NJ; ++j)
            for (uint r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    if (a_raw && b_raw) {
        // Both operands are raw 16-bit rows: the next k-slice's global loads are issued before the MMAs on the
        // current one (held in registers), so memory latency overlaps compute.
        uint4 ra[BM * BK / 8 / MMA_THREADS], rb[BN * BK / 8 / MMA_THREADS];
#define GEMM_FETCH(kb)                                                                                          \
    for (uint c = 0; c < BM * BK / 8 / MMA_THREADS; ++c) {                                                              \
        uint i = tid + c * MMA_THREADS, mm = i / (BK / 8), kc = (i - mm * (BK / 8)) * 8;                                \
        ra[c] = fetch8(A_RAW_ROW(m0 + mm), (kb) + kc, K, m0 + mm < M);                                          \
    }                                                                                                           \
    for (uint c = 0; c < BN * BK / 8 / MMA_THREADS; ++c) {                                                              \
        uint i = tid + c * MMA_THREADS, nn = i / (BK / 8), kc = (i - nn * (BK / 8)) * 8;                                \
        rb[c] = fetch8(B_RAW_COL(n0 + nn), (kb) + kc, K, n0 + nn < N);                                          \
    }
        GEMM_FETCH(0)
        for (uint k0 = 0; k0 < K; k0 += BK) {
            for (uint c = 0; c < BM * BK / 8 / MMA_THREADS; ++c) {
                uint i = tid + c * MMA_THREADS, mm = i / (BK / 8), kc = (i - mm * (BK / 8)) * 8;
                *(local uint4 *)&As[mm * LDS + kc] = ra[c];
            }
            for (uint c = 0; c < BN * BK / 8 / MMA_THREADS; ++c) {
                uint i = tid + c * MMA_THREADS, nn = i / (BK / 8), kc = (i - nn * (BK / 8)) * 8;
                *(local uint4 *)&Bs[nn * LDS + kc] = rb[c];
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            if (k0 + BK < K) {
                GEMM_FETCH(k0 + BK)
            }
            mma_block(As, Bs, acc, wm, wn, g, t);
            barrier(CLK_LOCAL_MEM_FENCE);
        }
#undef GEMM_FETCH
    } else {
        for (uint k0 = 0; k0 < K; k0 += BK) {
            if (a_raw) {
                // Rows of A already hold 16-bit MMA operands contiguous in k: copy 8 at a time, no conversion.
                for (uint c = tid; c < BM * BK / 8; c += MMA_THREADS) {
                    uint mm = c / (BK / 8), kc = (c - mm * (BK / 8)) * 8;
                    uint m = m0 + mm, k = k0 + kc;
                    local ushort *dst = &As[mm * LDS + kc];
                    if (m < M && k + 8 <= K) {
                        *(local uint4 *)dst = *(global const uint4 *)(A_RAW_ROW(m) + k);
                    } else {
                        for (uint q = 0; q < 8; ++q) dst[q] = (m < M && k + q < K) ? A_RAW_ROW(m)[k + q] : (ushort)0;
                    }
                }
            } else {
                for (uint e = tid; e < BM * BK; e += MMA_THREADS) {
                    uint mm, kk;
                    if (A_KFAST) {
                        mm = e / BK;
                        kk = e - mm * BK;
                    } else {
                        kk = e / BM;
                        mm = e - kk * BM;
                    }
                    uint m = m0 + mm, k = k0 + kk;
                    As[mm * LDS + kk] = to_mma_bits((m < M && k < K) ? A_AT(m, k) : 0.0f);
                }
            }
            if (b_raw) {
                for (uint c = tid; c < BN * BK / 8; c += MMA_THREADS) {
                    uint nn = c / (BK / 8), kc = (c - nn * (BK / 8)) * 8;
                    uint n = n0 + nn, k = k0 + kc;
                    local ushort *dst = &Bs[nn * LDS + kc];
                    if (n < N && k + 8 <= K) {
                        *(local uint4 *)dst = *(global const uint4 *)(B_RAW_COL(n) + k);
                    } else {
                        for (uint q = 0; q < 8; ++q) dst[q] = (n < N && k + q < K) ? B_RAW_COL(n)[k + q] : (ushort)0;
                    }
                }
            } else {
#ifdef B_COLUMN
                for (uint kk = bkk0; kk < BK; kk += MMA_THREADS / BN) {
                    uint k = k0 + kk;
                    Bs[bnn * LDS + kk] = (k < K && bn < N) ? B_COLUMN_BITS(k) : (ushort)0;
                }
#else
                for (uint e = tid; e < BK * BN; e += MMA_THREADS) {
                    uint kk, nn;
                    if (B_NFAST) {
                        kk = e / BN;
                        nn = e - kk * BN;
                    } else {
                        nn = e / BK;
                        kk = e - nn * BK;
                    }
                    uint k = k0 + kk, n = n0 + nn;
                    Bs[nn * LDS + kk] = to_mma_bits((k < K && n < N) ? B_AT(k, n) : 0.0f);
                }
#endif
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            mma_block(As, Bs, acc, wm, wn, g, t);
            barrier(CLK_LOCAL_MEM_FENCE);
        }
    }

    for (uint i = 0; i < MMA_MI; ++i) {
        for (uint j = 0; j < MMA_NJ; ++j) {
            for (uint r = 0; r < 4; ++r) {
                uint m = m0 + wm + i * 16 + g + (r >> 1) * 8;
                uint n = n0 + wn + j * 8 + t * 2 + (r & 1u);
                if (m < M && n < N) GEMM_STORE(m, n, acc[i][j][r]);
            }
        }
    }
}

#undef GEMM_NAME
#undef GEMM_ARGS
#undef GEMM_PROLOGUE
#undef A_AT
#undef B_AT
#undef A_KFAST
#undef B_NFAST
#undef GEMM_STORE
#undef A_RAW_OK
#undef A_RAW_ROW
#undef B_RAW_OK
#undef B_RAW_COL
#undef B_COLUMN
#undef B_COLUMN_INDEX
#undef B_COLUMN_AT
#undef B_COLUMN_BITS
