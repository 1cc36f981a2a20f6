// Linear layers with a handful of rows (the MM-DiT's adaLN modulation: [B, D] x [6D, D]ᵀ with B = 2): cuBLAS
// picks tiles for large M and reads the weight at a fraction of the memory bandwidth here. One warp per output
// feature streams that feature's weight row once with 16-byte loads and dots it with every input row (which stay
// in L1/L2), then reduces across the warp. f32 accumulation; the bias is added before the one rounding.

#define GEMV_MAX_ROWS 8

struct GemvParams {
    u64 x, w, bias, out;
    i64 x_off, w_off, b_off, o_off;
    i64 x_rs, w_rs, o_rs;  // row strides: x rows, weight rows (one per output feature), output rows
    int m, n, k, dtype, has_bias;
};

extern "C" __global__ void __launch_bounds__(256) gemv_rows(GemvParams p) {
    const int lane = threadIdx.x & 31;
    const int feature = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (feature >= p.n) return;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.f;
    const i64 wrow = p.w_off + (i64)feature * p.w_rs;
    // Four 16-byte weight loads in flight per lane before any arithmetic: one at a time leaves each warp waiting
    // on DRAM latency and the kernel far below the memory bandwidth.
    for (int c0 = lane * 8; c0 < p.k; c0 += 4 * 256) {
        float w8[4][8];
#pragma unroll
        for (int u = 0; u < 4; ++u)
            if (c0 + u * 256 < p.k) load8(p.dtype, p.w, wrow + c0 + u * 256, w8[u]);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int c = c0 + u * 256;
            if (c >= p.k) break;
#pragma unroll
            for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
                if (r < p.m) {
                    float x8[8];
                    load8(p.dtype, p.x, p.x_off + r * p.x_rs + c, x8);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[r] = fmaf(x8[j], w8[u][j], acc[r]);
                }
            }
        }
    }
    const float b = p.has_bias ? ldf(p.dtype, p.bias, p.b_off + feature) : 0.f;
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        if (r < p.m) {
            const float v = warp_sum(acc[r]);
            if (lane == 0) stf(p.dtype, p.out, p.o_off + r * p.o_rs + feature, v + b);
        }
    }
}
