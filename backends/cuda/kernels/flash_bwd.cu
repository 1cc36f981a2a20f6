// The backward of the fused attention (`Op::AttentionBackward`, FlashAttention-2's algorithm): scores and
// probabilities are recomputed tile by tile on tensor cores and never written to memory. Two kernels:
//   flash_bwd_dq:   per block 64 query rows (4 warps x 16). Pass 1 streams the key tiles for each row's
//                   log-sum-exp; then D = rowsum(dO ∘ O), and pass 2 streams key and value tiles for
//                   dQ = scale · Σ_j dS_j·K_j with dS = P ∘ (dO·Vᵀ − D). It writes LSE and D for the other kernel.
//   flash_bwd_dkdv: per block 64 keys (4 warps x 16), streaming query and dO tiles: Pᵀ = exp(K·Qᵀ − LSE),
//                   dV = Σ Pᵀ·dO, dSᵀ = Pᵀ ∘ (V·dOᵀ − D), dK = scale · Σ dSᵀ·Q.
// Each block owns its output rows, so no atomics; the price is recomputing the scores in both kernels (and once
// more for the LSE), eight tile products where FlashAttention-2 with atomics has five.
// f16/bf16, head dim 64, self-attention shapes (one N), no mask. Fragment layouts and helpers: flash.cu.

struct FlashBwdParams {
    u64 ptr[8];   // q, k, v, o, do, dq, dk, dv
    i64 s[8][3];  // element strides over (batch, head, token); the feature stride is 1
    i64 off[8];
    u64 lse, delta;  // f32 scratch [B*H][n]: log2-sum-exp of the scaled scores, rowsum(dO ∘ O)
    int heads, n;
    float scale, scale_log2;
};

#if __CUDA_ARCH__ >= 800

#define BWD_DH 64
#define BWD_BK 64
#define BWD_PITCH (BWD_DH + 8)
#define BWD_TILE (BWD_BK * BWD_PITCH)

// Operand `i` of (b, h) as 16-bit elements.
__device__ __forceinline__ const unsigned short* bwd_base(const FlashBwdParams& p, int i, int b, int h) {
    return (const unsigned short*)p.ptr[i] + p.off[i] + b * p.s[i][0] + h * p.s[i][1];
}

// A warp's 16 rows (from `row0`) of a [n, 64] operand as A fragments, zero past n.
__device__ __forceinline__ void bwd_a_frags(unsigned (&f)[4][4], const unsigned short* base, i64 stride, int row0,
                                            int n, int g, int t) {
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk)
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            int row = row0 + g + (r & 1) * 8, col = kk * 16 + t * 2 + (r >> 1) * 8;
            f[kk][r] = row < n ? *(const unsigned*)(base + (i64)row * stride + col) : 0u;
        }
}

// c[j] (16 x 8 blocks over the tile's 64 columns) = A (16 x 64, fragments) · Bᵀ, B the tile's rows.
template <bool BF16>
__device__ __forceinline__ void bwd_abt(float (&c)[8][4], const unsigned (&a)[4][4], const unsigned short* tile,
                                        int lane) {
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
        c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
        #pragma unroll
        for (int kk2 = 0; kk2 < 2; ++kk2) {
            unsigned bk[4];
            ldmatrix_x4(bk, tile + (j * 8 + (lane & 7)) * BWD_PITCH + kk2 * 32 + (lane >> 3) * 8);
            mma16816<BF16>(c[j], a[kk2 * 2], bk[0], bk[1]);
            mma16816<BF16>(c[j], a[kk2 * 2 + 1], bk[2], bk[3]);
        }
    }
}

// acc (16 x 64) += X · tile, X (16 x 64 over the tile's rows) given as C blocks x[j], rounded to A fragments.
template <bool BF16>
__device__ __forceinline__ void bwd_acc_xb(float (&acc)[8][4], const float (&x)[8][4], const unsigned short* tile,
                                           int lane) {
    unsigned xf[4][4];
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
        xf[j / 2][(j & 1) * 2 + 0] = pack2<BF16>(x[j][0], x[j][1]);
        xf[j / 2][(j & 1) * 2 + 1] = pack2<BF16>(x[j][2], x[j][3]);
    }
    #pragma unroll
    for (int kt = 0; kt < 4; ++kt)
        #pragma unroll
        for (int n2 = 0; n2 < 4; ++n2) {
            unsigned bv[4];
            ldmatrix_x4_trans(bv, tile + (kt * 16 + (lane & 15)) * BWD_PITCH + n2 * 16 + (lane >> 4) * 8);
            mma16816<BF16>(acc[n2 * 2], xf[kt], bv[0], bv[1]);
            mma16816<BF16>(acc[n2 * 2 + 1], xf[kt], bv[2], bv[3]);
        }
}

// Rows g and g+8 of a warp's 16 x 64 accumulator, times `mul`, into operand `i` (rows from row0, below n).
template <bool BF16>
__device__ __forceinline__ void bwd_store(const FlashBwdParams& p, int i, int b, int h, int row0,
                                          const float (&acc)[8][4], float mul, int g, int t) {
    unsigned short* base = (unsigned short*)bwd_base(p, i, b, h);
    const int r0 = row0 + g, r1 = r0 + 8;
    #pragma unroll
    for (int n = 0; n < 8; ++n) {
        int col = n * 8 + t * 2;
        if (r0 < p.n) *(unsigned*)(base + (i64)r0 * p.s[i][2] + col) = pack2<BF16>(acc[n][0] * mul, acc[n][1] * mul);
        if (r1 < p.n) *(unsigned*)(base + (i64)r1 * p.s[i][2] + col) = pack2<BF16>(acc[n][2] * mul, acc[n][3] * mul);
    }
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

template <bool BF16>
__device__ void flash_bwd_dq(const FlashBwdParams& p) {
    extern __shared__ __align__(16) unsigned short smem[];
    unsigned short* ks = smem;                 // two K tiles
    unsigned short* vs = smem + 2 * BWD_TILE;  // two V tiles
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const int qw = blockIdx.x * 64 + warp * 16;
    const unsigned short* kb = bwd_base(p, 1, b, h);
    const unsigned short* vb = bwd_base(p, 2, b, h);
    const int tiles = (p.n + BWD_BK - 1) / BWD_BK;

    load_tile<BWD_DH, BWD_BK, 128>(ks, kb, p.s[1][2], 0, p.n);
    cp_async_commit();
    unsigned qf[4][4], dof[4][4];
    bwd_a_frags(qf, bwd_base(p, 0, b, h), p.s[0][2], qw, p.n, g, t);
    bwd_a_frags(dof, bwd_base(p, 4, b, h), p.s[4][2], qw, p.n, g, t);

    // Pass 1: each row's running maximum (raw scores) and sum of exponentials.
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    for (int it = 0; it < tiles; ++it) {
        const int buf = it & 1, k0 = it * BWD_BK;
        cp_async_wait<0>();
        __syncthreads();
        if (it + 1 < tiles) {
            load_tile<BWD_DH, BWD_BK, 128>(ks + (buf ^ 1) * BWD_TILE, kb, p.s[1][2], k0 + BWD_BK, p.n);
            cp_async_commit();
        }
        float s[8][4];
        bwd_abt<BF16>(s, qf, ks + buf * BWD_TILE, lane);
        float mx0 = m0, mx1 = m1;
        #pragma unroll
        for (int j = 0; j < 8; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (k0 + j * 8 + t * 2 + (e & 1) >= p.n) s[j][e] = NEG_INF;
                if (e < 2) mx0 = fmaxf(mx0, s[j][e]);
                else mx1 = fmaxf(mx1, s[j][e]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
        l0 *= fast_exp2((m0 - mx0) * p.scale_log2);
        l1 *= fast_exp2((m1 - mx1) * p.scale_log2);
        m0 = mx0;
        m1 = mx1;
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            l0 += fast_exp2(fmaf(s[j][0], p.scale_log2, -mx0 * p.scale_log2)) +
                  fast_exp2(fmaf(s[j][1], p.scale_log2, -mx0 * p.scale_log2));
            l1 += fast_exp2(fmaf(s[j][2], p.scale_log2, -mx1 * p.scale_log2)) +
                  fast_exp2(fmaf(s[j][3], p.scale_log2, -mx1 * p.scale_log2));
        }
    }
    const float lse0 = m0 * p.scale_log2 + __log2f(quad_sum(l0));
    const float lse1 = m1 * p.scale_log2 + __log2f(quad_sum(l1));

    // D for rows g and g+8: each lane of a quad sums 16 of the 64 features.
    float d0 = 0.f, d1 = 0.f;
    {
        const unsigned short* ob = bwd_base(p, 3, b, h);
        const unsigned short* db = bwd_base(p, 4, b, h);
        const int r0 = qw + g, r1 = r0 + 8;
        #pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            const int col = kk * 8 + t * 2;
            #pragma unroll
            for (int c = 0; c < 2; ++c) {
                if (r0 < p.n) {
                    unsigned short o = ob[(i64)r0 * p.s[3][2] + col + c], d = db[(i64)r0 * p.s[4][2] + col + c];
                    d0 += BF16 ? bf2f(o) * bf2f(d) : h2f(o) * h2f(d);
                }
                if (r1 < p.n) {
                    unsigned short o = ob[(i64)r1 * p.s[3][2] + col + c], d = db[(i64)r1 * p.s[4][2] + col + c];
                    d1 += BF16 ? bf2f(o) * bf2f(d) : h2f(o) * h2f(d);
                }
            }
        }
        d0 = quad_sum(d0);
        d1 = quad_sum(d1);
        if (t == 0) {
            float* lse = (float*)p.lse + (i64)bh * p.n;
            float* delta = (float*)p.delta + (i64)bh * p.n;
            if (r0 < p.n) lse[r0] = lse0, delta[r0] = d0;
            if (r1 < p.n) lse[r1] = lse1, delta[r1] = d1;
        }
    }

    // Pass 2: dQ.
    __syncthreads();  // every warp is done with pass 1's last tile
    load_tile<BWD_DH, BWD_BK, 128>(ks, kb, p.s[1][2], 0, p.n);
    load_tile<BWD_DH, BWD_BK, 128>(vs, vb, p.s[2][2], 0, p.n);
    cp_async_commit();
    float dq[8][4];
    #pragma unroll
    for (int n = 0; n < 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
    for (int it = 0; it < tiles; ++it) {
        const int buf = it & 1, k0 = it * BWD_BK;
        cp_async_wait<0>();
        __syncthreads();
        if (it + 1 < tiles) {
            load_tile<BWD_DH, BWD_BK, 128>(ks + (buf ^ 1) * BWD_TILE, kb, p.s[1][2], k0 + BWD_BK, p.n);
            load_tile<BWD_DH, BWD_BK, 128>(vs + (buf ^ 1) * BWD_TILE, vb, p.s[2][2], k0 + BWD_BK, p.n);
            cp_async_commit();
        }
        float s[8][4], dp[8][4];
        bwd_abt<BF16>(s, qf, ks + buf * BWD_TILE, lane);
        bwd_abt<BF16>(dp, dof, vs + buf * BWD_TILE, lane);
        #pragma unroll
        for (int j = 0; j < 8; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool in = k0 + j * 8 + t * 2 + (e & 1) < p.n;
                const float pr = in ? fast_exp2(fmaf(s[j][e], p.scale_log2, e < 2 ? -lse0 : -lse1)) : 0.f;
                s[j][e] = pr * (dp[j][e] - (e < 2 ? d0 : d1));  // dS
            }
        bwd_acc_xb<BF16>(dq, s, ks + buf * BWD_TILE, lane);
    }
    bwd_store<BF16>(p, 5, b, h, qw, dq, p.scale, g, t);
}

template <bool BF16>
__device__ void flash_bwd_dkdv(const FlashBwdParams& p) {
    extern __shared__ __align__(16) unsigned short smem[];
    unsigned short* qs = smem;                  // two Q tiles
    unsigned short* dos = smem + 2 * BWD_TILE;  // two dO tiles
    __shared__ float lse_s[2][BWD_BK], delta_s[2][BWD_BK];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const int kw = blockIdx.x * 64 + warp * 16;  // this warp's first key
    const unsigned short* qb = bwd_base(p, 0, b, h);
    const unsigned short* db = bwd_base(p, 4, b, h);
    const float* lse = (const float*)p.lse + (i64)bh * p.n;
    const float* delta = (const float*)p.delta + (i64)bh * p.n;
    const int tiles = (p.n + BWD_BK - 1) / BWD_BK;

    // Rows past n load as zeros with LSE and D zero: their P is 1 but dO is 0, so they add nothing to dV, and
    // dSᵀ = Pᵀ ∘ (V·dOᵀ − D) is 0, so nothing to dK.
    auto stage = [&](int buf, int q0) {
        load_tile<BWD_DH, BWD_BK, 128>(qs + buf * BWD_TILE, qb, p.s[0][2], q0, p.n);
        load_tile<BWD_DH, BWD_BK, 128>(dos + buf * BWD_TILE, db, p.s[4][2], q0, p.n);
        cp_async_commit();
        const int i = threadIdx.x & 63, row = q0 + i;
        if (threadIdx.x < 64) lse_s[buf][i] = row < p.n ? lse[row] : 0.f;
        else delta_s[buf][i] = row < p.n ? delta[row] : 0.f;
    };
    stage(0, 0);
    unsigned kf[4][4], vf[4][4];
    bwd_a_frags(kf, bwd_base(p, 1, b, h), p.s[1][2], kw, p.n, g, t);
    bwd_a_frags(vf, bwd_base(p, 2, b, h), p.s[2][2], kw, p.n, g, t);
    float dk[8][4], dv[8][4];
    #pragma unroll
    for (int n = 0; n < 8; ++n)
        #pragma unroll
        for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

    for (int it = 0; it < tiles; ++it) {
        const int buf = it & 1, q0 = it * BWD_BK;
        cp_async_wait<0>();
        __syncthreads();
        if (it + 1 < tiles) stage(buf ^ 1, q0 + BWD_BK);
        float st[8][4], dpt[8][4];
        bwd_abt<BF16>(st, kf, qs + buf * BWD_TILE, lane);    // Sᵀ: keys x queries
        bwd_abt<BF16>(dpt, vf, dos + buf * BWD_TILE, lane);  // dPᵀ
        #pragma unroll
        for (int j = 0; j < 8; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = j * 8 + t * 2 + (e & 1);
                st[j][e] = fast_exp2(fmaf(st[j][e], p.scale_log2, -lse_s[buf][col]));  // Pᵀ
                dpt[j][e] = st[j][e] * (dpt[j][e] - delta_s[buf][col]);              // dSᵀ
            }
        bwd_acc_xb<BF16>(dv, st, dos + buf * BWD_TILE, lane);
        bwd_acc_xb<BF16>(dk, dpt, qs + buf * BWD_TILE, lane);
    }
    bwd_store<BF16>(p, 6, b, h, kw, dk, p.scale, g, t);
    bwd_store<BF16>(p, 7, b, h, kw, dv, 1.f, g, t);
}

#define FLASH_BWD_BODY(KERNEL, BF16) KERNEL<BF16>(p)
#else
#define FLASH_BWD_BODY(KERNEL, BF16) __trap()  // the host only launches these on sm_80 and newer
#endif

// 128 threads, 64 rows per block, 36 KiB of dynamic shared memory (two double-buffered 64 x 64 tiles, rows
// padded by 8 halves); the host mirrors this in attention.rs.
extern "C" __global__ void __launch_bounds__(128) flash_bwd_dq_f16(FlashBwdParams p) {
    FLASH_BWD_BODY(flash_bwd_dq, false);
}
extern "C" __global__ void __launch_bounds__(128) flash_bwd_dq_bf16(FlashBwdParams p) {
    FLASH_BWD_BODY(flash_bwd_dq, true);
}
extern "C" __global__ void __launch_bounds__(128) flash_bwd_dkdv_f16(FlashBwdParams p) {
    FLASH_BWD_BODY(flash_bwd_dkdv, false);
}
extern "C" __global__ void __launch_bounds__(128) flash_bwd_dkdv_bf16(FlashBwdParams p) {
    FLASH_BWD_BODY(flash_bwd_dkdv, true);
}
