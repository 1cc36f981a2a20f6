// Tensor-core GEMM body for NVIDIA (sm_80+), through inline PTX `mma.sync.m16n8k16` with f32 accumulation.
// Built only where the device says it has tensor cores; instantiated like gemm_tile.cl (same macros, same
// kernel arguments, plus A_RAW_OK / A_RAW_ROW(m) and B_RAW_OK / B_RAW_COL(n): when an operand is already
// 16-bit MMA data contiguous and 16-byte aligned along k, a pointer to its row (column) for 8-wide copies). Operands are staged in local memory as 16-bit MMA_BF16 ? bf16 : f16 bits, so the kernel is
// exact for f16 (resp. bf16) inputs; the host only picks it for those.
// Helpers are in mma.cl. A 128-thread work-group (4 warps in 2x2) computes a 64x64 tile; each warp a 32x32 block of 2x4 MMA tiles.

#define BM 64
#define BN 64
#define BK 32
#define LDS (BK + 8) // row pitch in 16-bit elements (padding spreads the fragment reads over banks)

kernel __attribute__((reqd_work_group_size(128, 1, 1)))
void GEMM_NAME(GEMM_ARGS) {
    local ushort As[BM * LDS] __attribute__((aligned(16))); // [m][k]
    local ushort Bs[BN * LDS] __attribute__((aligned(16))); // [n][k]: a B fragment's two k values are one 32-bit word
    const uint tid = get_local_id(0), lane = tid & 31u, warp = tid >> 5;
    const uint g = lane >> 2, t = lane & 3u;
    const uint wm = (warp >> 1) * 32, wn = (warp & 1u) * 32;
    const uint m0 = get_group_id(1) * BM, n0 = get_group_id(0) * BN;
    GEMM_PROLOGUE
    const bool a_raw = A_RAW_OK, b_raw = B_RAW_OK;
    float acc[2][4][4];
    for (uint i = 0; i < 2; ++i)
        for (uint j = 0; j < 4; ++j)
            for (uint r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

    for (uint k0 = 0; k0 < K; k0 += BK) {
        if (a_raw) {
            // Rows of A already hold 16-bit MMA operands contiguous in k: copy 8 at a time, no conversion.
            for (uint c = tid; c < BM * BK / 8; c += 128) {
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
            for (uint e = tid; e < BM * BK; e += 128) {
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
            for (uint c = tid; c < BN * BK / 8; c += 128) {
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
            for (uint e = tid; e < BK * BN; e += 128) {
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
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (uint ks = 0; ks < BK; ks += 16) {
            uint af[2][4], bf[4][2];
            for (uint i = 0; i < 2; ++i) {
                uint r = wm + i * 16 + g, c = ks + t * 2;
                af[i][0] = *(local const uint *)&As[r * LDS + c];
                af[i][1] = *(local const uint *)&As[(r + 8) * LDS + c];
                af[i][2] = *(local const uint *)&As[r * LDS + c + 8];
                af[i][3] = *(local const uint *)&As[(r + 8) * LDS + c + 8];
            }
            for (uint j = 0; j < 4; ++j) {
                uint n = wn + j * 8 + g, c = ks + t * 2;
                bf[j][0] = *(local const uint *)&Bs[n * LDS + c];
                bf[j][1] = *(local const uint *)&Bs[n * LDS + c + 8];
            }
            for (uint i = 0; i < 2; ++i)
                for (uint j = 0; j < 4; ++j) mma_16816(acc[i][j], af[i], bf[j]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    for (uint i = 0; i < 2; ++i) {
        for (uint j = 0; j < 4; ++j) {
            for (uint r = 0; r < 4; ++r) {
                uint m = m0 + wm + i * 16 + g + (r >> 1) * 8;
                uint n = n0 + wn + j * 8 + t * 2 + (r & 1u);
                if (m < M && n < N) GEMM_STORE(m, n, acc[i][j][r]);
            }
        }
    }
}

#undef BM
#undef BN
#undef BK
#undef LDS
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
