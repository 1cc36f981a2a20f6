// 2-D convolution as an implicit GEMM through gemm_tile.cl: M = out channels, N = batch·OH·OW,
// K = C·KH·KW. The im2col matrix is never materialised: B_AT computes the input pixel (or the zero padding).

inline float conv_w(global const uchar *w, uint wdt, const View *wv, uint o, uint k, uint KH, uint KW) {
    uint khw = KH * KW;
    uint c = k / khw, r = k - c * khw;
    uint ky = r / KW, kx = r - ky * KW;
    return ld(w, wdt, wv->off + o * wv->st[0] + c * wv->st[1] + ky * wv->st[2] + kx * wv->st[3]);
}

inline float conv_x(global const uchar *x, uint xdt, const View *xv, uint k, uint n, uint H, uint W, uint KH,
                    uint KW, uint OH, uint OW, uint sy, uint sx, uint py, uint px) {
    uint khw = KH * KW, ohw = OH * OW;
    uint c = k / khw, r = k - c * khw;
    uint ky = r / KW, kx = r - ky * KW;
    uint b = n / ohw, p = n - b * ohw;
    uint oy = p / OW, ox = p - oy * OW;
    int iy = (int)(oy * sy + ky) - (int)py, ix = (int)(ox * sx + kx) - (int)px;
    if (iy < 0 || iy >= (int)H || ix < 0 || ix >= (int)W) return 0.0f;
    return ld(x, xdt, xv->off + b * xv->st[0] + c * xv->st[1] + (ulong)iy * xv->st[2] + (ulong)ix * xv->st[3]);
}

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
#define B_AT(k, n) conv_x(x, xdt, &xv, k, n, H, W, KH, KW, OH, OW, sy, sx, py, px)
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
