// 2-D convolution as an implicit GEMM through gemm_tile.cl: M = out channels, N = batch·OH·OW,
// K = C·KH·KW. The im2col matrix is never materialised: B_COLUMN_* compute the input pixel (or the zero padding).

inline float conv_w(global const uchar *w, uint wdt, const View *wv, uint o, uint k, uint KH, uint KW) {
    uint khw = KH * KW;
    uint c = k / khw, r = k - c * khw;
    uint ky = r / KW, kx = r - ky * KW;
    return ld(w, wdt, wv->off + o * wv->st[0] + c * wv->st[1] + ky * wv->st[2] + kx * wv->st[3]);
}

// The input element of im2col row k (c, ky, kx) for the output pixel whose batch base is `base` and whose
// window starts at input (iy0, ix0); -1 inside the zero padding. 3x3 and 1x1 kernels (all of SD3's VAE) get
// divisions by constants; the branch is uniform.
inline long conv_x_index(const View *xv, uint k, ulong base, int iy0, int ix0, uint H, uint W, uint KH, uint KW) {
    uint c, ky, kx;
    if (KH == 3 && KW == 3) {
        c = k / 9u;
        uint r = k - c * 9u;
        ky = r / 3u;
        kx = r - ky * 3u;
    } else if (KH == 1 && KW == 1) {
        c = k;
        ky = kx = 0;
    } else {
        uint khw = KH * KW;
        c = k / khw;
        uint r = k - c * khw;
        ky = r / KW;
        kx = r - ky * KW;
    }
    int iy = iy0 + (int)ky, ix = ix0 + (int)kx;
    if (iy < 0 || iy >= (int)H || ix < 0 || ix >= (int)W) return -1;
    return (long)(base + c * xv->st[1] + (ulong)iy * xv->st[2] + (ulong)ix * xv->st[3]);
}

inline float conv_x_f(global const uchar *x, uint xdt, long i) { return i < 0 ? 0.0f : ld(x, xdt, (ulong)i); }

#ifdef MMA_DT // the tensor-core program: MMA operand bits, copied without conversion when x already has them
inline ushort conv_x_bits(global const uchar *x, uint xdt, long i) {
    if (i < 0) return 0;
    return xdt == MMA_DT ? ((global const ushort *)x)[i] : to_mma_bits(ld(x, xdt, (ulong)i));
}
#endif

#define GEMM_NAME conv2d
#define GEMM_ARGS                                                                                               \
    uint M, uint N, uint K, uint has_bias, uint H, uint W, uint KH, uint KW, uint OH, uint OW,                  \
    uint sy, uint sx, uint py, uint px,                                                                         \
    global const uchar *x, uint xdt, View xv, global const uchar *w, uint wdt, View wv,                         \
    global const uchar *bias, uint biasdt, ulong bias_off, ulong bias_st,                                       \
    global uchar *y, uint ydt, View yv
#define GEMM_PROLOGUE const uint ohw = OH * OW;
#define A_KFAST 1
#define B_NFAST 1
#define A_AT(m, k) conv_w(w, wdt, &wv, m, k, KH, KW)
// Columns of B (output pixels) are fixed per thread in the GEMM bodies (B_COLUMN): the pixel's batch base and
// window origin are computed once, and each element of the column costs only the k decomposition.
#define B_COLUMN(n)                                                                                             \
    const uint cb_ = (n) / ohw, cp_ = (n) - cb_ * ohw, coy_ = cp_ / OW, cox_ = cp_ - coy_ * OW;                \
    const ulong col_base = xv.off + cb_ * xv.st[0];                                                             \
    const int col_iy = (int)(coy_ * sy) - (int)py, col_ix = (int)(cox_ * sx) - (int)px;
#define B_COLUMN_INDEX(k) conv_x_index(&xv, k, col_base, col_iy, col_ix, H, W, KH, KW)
#define B_COLUMN_AT(k) conv_x_f(x, xdt, B_COLUMN_INDEX(k))
// The tensor-core body copies MMA_DT inputs as bits.
#define B_COLUMN_BITS(k) conv_x_bits(x, xdt, B_COLUMN_INDEX(k))
#define GEMM_STORE(m, n, v)                                                                                     \
    {                                                                                                           \
        uint b_ = (n) / ohw, p_ = (n) - b_ * ohw;                                                               \
        uint oy_ = p_ / OW, ox_ = p_ - oy_ * OW;                                                                \
        st(y, ydt, yv.off + b_ * yv.st[0] + (m) * yv.st[1] + oy_ * yv.st[2] + ox_ * yv.st[3],                   \
           (v) + (has_bias ? ld(bias, biasdt, bias_off + (ulong)(m) * bias_st) : 0.0f));                        \
    }
// The weights [O, C, KH, KW] are rows of A contiguous in k = (c, ky, kx) when stored densely; the im2col B
// matrix never is.
#define A_RAW_OK                                                                                                \
    (wdt == MMA_DT && wv.st[3] == 1 && wv.st[2] == KW && wv.st[1] == KH * KW && wv.off % 8 == 0 && wv.st[0] % 8 == 0)
#define A_RAW_ROW(m) ((global const ushort *)w + wv.off + (ulong)(m) * wv.st[0])
#define B_RAW_OK 0
#define B_RAW_COL(n) ((global const ushort *)x)
