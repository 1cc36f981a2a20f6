// Tiled GEMM body, instantiated once per user (matmul.cl, conv2d.cl), which defines before including:
//   GEMM_NAME, GEMM_ARGS, GEMM_PROLOGUE (per-group setup), A_AT(m, k), B_AT(k, n) (in-bounds loads as float),
//   A_KFAST / B_NFAST (which index is unit-stride, so tile loads are coalesced), GEMM_STORE(m, n, acc).
// Instead of B_AT, a user may define B_COLUMN(n) (per-thread set-up for output column n: each thread stages a
// fixed column of B) and B_COLUMN_AT(k) (element k of that column).
// A 16x16 work-group computes a TM x TN tile (RM x RN outputs per work-item, strided by 16 so that stores
// and local reads are conflict free), stepping through K in TK slices staged in local memory.
// TM = 16 * RM and TN = 16 * RN; RM, RN, TK come from the build options.

#define TM (16 * RM)
#define TN (16 * RN)

kernel __attribute__((reqd_work_group_size(16, 16, 1)))
void GEMM_NAME(GEMM_ARGS) {
    local float As[TK][TM + 1];
    local float Bs[TK][TN + 1];
    const uint tx = get_local_id(0), ty = get_local_id(1), tid = ty * 16 + tx;
    const uint m0 = get_group_id(1) * TM, n0 = get_group_id(0) * TN;
    GEMM_PROLOGUE
#ifdef B_COLUMN
#if 256 % TN != 0
#error "B_COLUMN needs whole columns per thread"
#endif
    const uint bnn = tid % TN, bkk0 = tid / TN, bn = n0 + bnn;
    B_COLUMN(bn)
#endif
    float acc[RM][RN];
    for (uint i = 0; i < RM; ++i)
        for (uint j = 0; j < RN; ++j) acc[i][j] = 0.0f;

    for (uint k0 = 0; k0 < K; k0 += TK) {
        for (uint e = tid; e < TM * TK; e += 256) {
            uint mm, kk;
            if (A_KFAST) {
                mm = e / TK;
                kk = e - mm * TK;
            } else {
                kk = e / TM;
                mm = e - kk * TM;
            }
            uint m = m0 + mm, k = k0 + kk;
            As[kk][mm] = (m < M && k < K) ? A_AT(m, k) : 0.0f;
        }
#ifdef B_COLUMN
        for (uint kk = bkk0; kk < TK; kk += 256 / TN) {
            uint k = k0 + kk;
            Bs[kk][bnn] = (k < K && bn < N) ? B_COLUMN_AT(k) : 0.0f;
        }
#else
        for (uint e = tid; e < TK * TN; e += 256) {
            uint kk, nn;
            if (B_NFAST) {
                kk = e / TN;
                nn = e - kk * TN;
            } else {
                nn = e / TK;
                kk = e - nn * TK;
            }
            uint k = k0 + kk, n = n0 + nn;
            Bs[kk][nn] = (k < K && n < N) ? B_AT(k, n) : 0.0f;
        }
#endif
        barrier(CLK_LOCAL_MEM_FENCE);
        for (uint kk = 0; kk < TK; ++kk) {
            float ar[RM], br[RN];
            for (uint i = 0; i < RM; ++i) ar[i] = As[kk][ty + 16 * i];
            for (uint j = 0; j < RN; ++j) br[j] = Bs[kk][tx + 16 * j];
            for (uint i = 0; i < RM; ++i)
                for (uint j = 0; j < RN; ++j) acc[i][j] = mad(ar[i], br[j], acc[i][j]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    for (uint i = 0; i < RM; ++i) {
        uint m = m0 + ty + 16 * i;
        if (m >= M) continue;
        for (uint j = 0; j < RN; ++j) {
            uint n = n0 + tx + 16 * j;
            if (n < N) GEMM_STORE(m, n, acc[i][j]);
        }
    }
}

#undef TM
#undef TN
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
