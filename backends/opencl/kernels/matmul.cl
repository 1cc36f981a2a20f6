// Batched matmul y[.., M, N] = act(a[.., M, K] · b[.., K, N] (+ bias[N])), through gemm_tile.cl.
// Group dim 2 is the batch; the batch dims' strides of a, b and y come as Views over `bsh`.

#define GEMM_NAME matmul
#define GEMM_ARGS                                                                                               \
    uint M, uint N, uint K, Shape bsh, uint has_bias, uint act,                                                 \
    global const uchar *a, uint adt, View av, ulong a_sm, ulong a_sk,                                           \
    global const uchar *b, uint bdt, View bv, ulong b_sk, ulong b_sn,                                           \
    global const uchar *bias, uint biasdt, ulong bias_off, ulong bias_st,                                       \
    global uchar *y, uint ydt, View yv, ulong y_sm, ulong y_sn
#define GEMM_PROLOGUE                                                                                           \
    const uint batch = get_group_id(2);                                                                         \
    const ulong ao = voff(&bsh, &av, batch), bo = voff(&bsh, &bv, batch), yo = voff(&bsh, &yv, batch);
#define A_KFAST (a_sk == 1)
#define B_NFAST (b_sn == 1)
#define A_AT(m, k) ld(a, adt, ao + (ulong)(m) * a_sm + (ulong)(k) * a_sk)
#define B_AT(k, n) ld(b, bdt, bo + (ulong)(k) * b_sk + (ulong)(n) * b_sn)
// act: 0 = none, else 1 + a UnaryOp id, applied to the f32 result before rounding.
#define GEMM_STORE(m, n, v)                                                                                     \
    {                                                                                                           \
        float r_ = (v) + (has_bias ? ld(bias, biasdt, bias_off + (ulong)(n) * bias_st) : 0.0f);                 \
        st(y, ydt, yo + (ulong)(m) * y_sm + (ulong)(n) * y_sn, act ? unary_f(act - 1u, r_) : r_);               \
    }
// Raw 16-bit staging for the tensor-core body (gemm_mma.cl): k contiguous, rows 16-byte aligned.
#define A_RAW_OK (adt == MMA_DT && a_sk == 1 && ao % 8 == 0 && a_sm % 8 == 0)
#define A_RAW_ROW(m) ((global const ushort *)a + ao + (ulong)(m) * a_sm)
#define B_RAW_OK (bdt == MMA_DT && b_sk == 1 && bo % 8 == 0 && b_sn % 8 == 0)
#define B_RAW_COL(n) ((global const ushort *)b + bo + (ulong)(n) * b_sn)
