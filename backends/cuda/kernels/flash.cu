// Fused attention on tensor cores (FlashAttention-2 style): each warp owns MT·16 query rows held as A fragments
// in registers; key and value tiles of BK rows stream through double-buffered shared memory with cp.async
// (the next tile loads while this one is used); scores live only in registers; softmax is online (running max
// and sum, in log2 units); P·V reuses the score fragments as the A operand. f16/bf16 inputs, f32 accumulation,
// head dims 64 and 128, no mask or bias (the callers needing those take the chunked cuBLAS path). Needs sm_80.
//
// Why MT = 2 for head dim 64: every warp reads the whole K and V tile from shared memory per step; with 16 rows
// per warp those reads, not the tensor cores, bound the kernel. Two 16-row tiles per warp halve the bytes read per
// multiply-add. Head dim 128 keeps MT = 1 (its accumulators would not fit in registers).
//
// Fragment layouts are those of PTX `mma.sync.aligned.m16n8k16` (g = lane/4, t = lane%4):
//   A 16x16: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 : b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C 16x8 : c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)

#if __CUDA_ARCH__ >= 800

template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    if (BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// Queue one ROWS x DH tile (rows k0.., zero past nk) into `tile` (row pitch DH + 8 halves).
template <int DH, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(unsigned short* tile, const unsigned short* base, i64 row_stride, int k0,
                                          int nk) {
    #pragma unroll
    for (int i = 0; i < ROWS * DH / 8 / THREADS; ++i) {
        int idx = threadIdx.x + i * THREADS;
        int row = idx / (DH / 8), c8 = (idx % (DH / 8)) * 8;
        bool in = k0 + row < nk;
        const unsigned short* src = base + (i64)(in ? k0 + row : 0) * row_stride + c8;
        cp_async16(tile + row * (DH + 8) + c8, src, in ? 16 : 0);
    }
}

// One barrier per key tile: at the top of step `it` every thread waits for its own copies of tile `it` and the
// barrier publishes them; it also proves every warp finished step it-1, so the other buffer is free and tile
// it+1 is queued into it at once, loading during the whole of step `it`. Warps of a block then drift apart
// (one in softmax while another is on the tensor cores) instead of meeting at a second barrier.
//
// Measured on an H200 and rejected (each slower than this kernel at 2x24 heads x 4429 tokens x 64): query
// fragments re-read from shared memory per key tile as FlashAttention-2 does (-2%), skipping the accumulator
// rescale when no row maximum moved (-8%), three blocks per SM at 168 registers (-17%), a quarter of the
// exponentials as a polynomial on the FMA pipe (-5%), key tiles of 128 (-9%, spills), key tiles of 128 with the
// queries in shared memory, FlashAttention-2's shape for head dim 64 (-14%, spills), 2 warps per block for a
// shorter last wave (-24%).
template <int DH, int BK, int MT, int NW, bool BF16>
__device__ void flash_fwd(const FlashParams& p) {
    constexpr int THREADS = NW * 32, BQ = NW * MT * 16, PITCH = DH + 8, TILE = BK * PITCH;
    // [K buffer 0, K buffer 1, V buffer 0, V buffer 1]; rows padded by 16 bytes so ldmatrix hits distinct banks.
    extern __shared__ __align__(16) unsigned short smem[];
    unsigned short* ks = smem;
    unsigned short* vs = smem + 2 * TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const int qw = blockIdx.x * BQ + warp * MT * 16;  // this warp's first query row
    const unsigned short* qb = (const unsigned short*)p.q + p.q_off + b * p.q_s[0] + h * p.q_s[1];
    const unsigned short* kb = (const unsigned short*)p.k + p.k_off + b * p.k_s[0] + h * p.k_s[1];
    const unsigned short* vb = (const unsigned short*)p.v + p.v_off + b * p.v_s[0] + h * p.v_s[1];
    const int tiles = (p.nk + BK - 1) / BK;

    load_tile<DH, BK, THREADS>(ks, kb, p.k_s[2], 0, p.nk);
    load_tile<DH, BK, THREADS>(vs, vb, p.v_s[2], 0, p.nk);
    cp_async_commit();

    // This warp's query rows as A fragments, one per 16-wide slice of the head dim.
    unsigned qf[MT][DH / 16][4];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        #pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
            #pragma unroll
            for (int r = 0; r < 4; ++r) {
                int row = qw + mt * 16 + g + (r & 1) * 8, col = kk * 16 + t * 2 + (r >> 1) * 8;
                qf[mt][kk][r] = row < p.nq ? *(const unsigned*)(qb + (i64)row * p.q_s[2] + col) : 0u;
            }
        }
    }
    float o[MT][DH / 8][4];
    float m[MT][2], l[MT][2];  // rows g and g+8 of each tile: running max (raw scores), partial sums
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        #pragma unroll
        for (int n = 0; n < DH / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
        m[mt][0] = m[mt][1] = NEG_INF;
        l[mt][0] = l[mt][1] = 0.f;
    }

    for (int it = 0; it < tiles; ++it) {
        const int buf = it & 1, k0 = it * BK;
        const unsigned short* kt_s = ks + buf * TILE;
        const unsigned short* vt_s = vs + buf * TILE;
        cp_async_wait<0>();
        __syncthreads();
        if (it + 1 < tiles) {
            load_tile<DH, BK, THREADS>(ks + (buf ^ 1) * TILE, kb, p.k_s[2], k0 + BK, p.nk);
            load_tile<DH, BK, THREADS>(vs + (buf ^ 1) * TILE, vb, p.v_s[2], k0 + BK, p.nk);
            cp_async_commit();
        }

        // S = Q·Kᵀ. One ldmatrix.x4 gives B fragments for 8 keys over 32 dims, shared by the MT row tiles.
        float s[MT][BK / 8][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            #pragma unroll
            for (int j = 0; j < BK / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
        #pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
            #pragma unroll
            for (int kk2 = 0; kk2 < DH / 32; ++kk2) {
                unsigned bk[4];
                ldmatrix_x4(bk, kt_s + (j * 8 + (lane & 7)) * PITCH + kk2 * 32 + (lane >> 3) * 8);
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<BF16>(s[mt][j], qf[mt][kk2 * 2], bk[0], bk[1]);
                    mma16816<BF16>(s[mt][j], qf[mt][kk2 * 2 + 1], bk[2], bk[3]);
                }
            }
        }

        // Online softmax; keys past the end only exist in the last tile.
        if (k0 + BK > p.nk) {
            #pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                #pragma unroll
                for (int j = 0; j < BK / 8; ++j)
                    #pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (k0 + j * 8 + t * 2 + (e & 1) >= p.nk) s[mt][j][e] = NEG_INF;
        }
        unsigned pf[MT][BK / 16][4];
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mx0 = m[mt][0], mx1 = m[mt][1];
            #pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
                mx0 = fmaxf(mx0, fmaxf(s[mt][j][0], s[mt][j][1]));
                mx1 = fmaxf(mx1, fmaxf(s[mt][j][2], s[mt][j][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
            const float alpha0 = fast_exp2((m[mt][0] - mx0) * p.scale_log2);
            const float alpha1 = fast_exp2((m[mt][1] - mx1) * p.scale_log2);
            m[mt][0] = mx0;
            m[mt][1] = mx1;
            const float base0 = mx0 * p.scale_log2, base1 = mx1 * p.scale_log2;
            float sum0 = 0.f, sum1 = 0.f;
            #pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
                float p0 = fast_exp2(fmaf(s[mt][j][0], p.scale_log2, -base0));
                float p1 = fast_exp2(fmaf(s[mt][j][1], p.scale_log2, -base0));
                float p2 = fast_exp2(fmaf(s[mt][j][2], p.scale_log2, -base1));
                float p3 = fast_exp2(fmaf(s[mt][j][3], p.scale_log2, -base1));
                sum0 += p0 + p1;
                sum1 += p2 + p3;
                pf[mt][j / 2][(j & 1) * 2 + 0] = pack2<BF16>(p0, p1);
                pf[mt][j / 2][(j & 1) * 2 + 1] = pack2<BF16>(p2, p3);
            }
            l[mt][0] = l[mt][0] * alpha0 + sum0;
            l[mt][1] = l[mt][1] * alpha1 + sum1;
            #pragma unroll
            for (int n = 0; n < DH / 8; ++n) {
                o[mt][n][0] *= alpha0;
                o[mt][n][1] *= alpha0;
                o[mt][n][2] *= alpha1;
                o[mt][n][3] *= alpha1;
            }
        }

        // O += P·V. One ldmatrix.x4.trans gives B fragments for 16 keys over 16 dims.
        #pragma unroll
        for (int kt = 0; kt < BK / 16; ++kt) {
            #pragma unroll
            for (int n2 = 0; n2 < DH / 16; ++n2) {
                unsigned bv[4];
                ldmatrix_x4_trans(bv, vt_s + (kt * 16 + (lane & 15)) * PITCH + n2 * 16 + (lane >> 4) * 8);
                #pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<BF16>(o[mt][n2 * 2], pf[mt][kt], bv[0], bv[1]);
                    mma16816<BF16>(o[mt][n2 * 2 + 1], pf[mt][kt], bv[2], bv[3]);
                }
            }
        }
    }

    unsigned short* ob = (unsigned short*)p.o + p.o_off + b * p.o_s[0] + h * p.o_s[1];
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float l0 = l[mt][0], l1 = l[mt][1];
        l0 += __shfl_xor_sync(0xffffffff, l0, 1);
        l0 += __shfl_xor_sync(0xffffffff, l0, 2);
        l1 += __shfl_xor_sync(0xffffffff, l1, 1);
        l1 += __shfl_xor_sync(0xffffffff, l1, 2);
        const float inv0 = 1.f / l0, inv1 = 1.f / l1;
        const int r0 = qw + mt * 16 + g, r1 = r0 + 8;
        #pragma unroll
        for (int n = 0; n < DH / 8; ++n) {
            int col = n * 8 + t * 2;
            if (r0 < p.nq)
                *(unsigned*)(ob + (i64)r0 * p.o_s[2] + col) = pack2<BF16>(o[mt][n][0] * inv0, o[mt][n][1] * inv0);
            if (r1 < p.nq)
                *(unsigned*)(ob + (i64)r1 * p.o_s[2] + col) = pack2<BF16>(o[mt][n][2] * inv1, o[mt][n][3] * inv1);
        }
    }
}

#define FLASH_BODY(DH, BK, MT, NW, BF16) flash_fwd<DH, BK, MT, NW, BF16>(p)
#else
#define FLASH_BODY(DH, BK, MT, NW, BF16) __trap()  // the host only launches these on sm_80 and newer
#endif

// Launch shapes (the host mirrors them in attention.rs and kernels.rs): head dim 64: 4 warps x 32 rows; head dim
// 128: 8 warps x 16 rows; key tiles of 64. Both cover 128 query rows per block.
extern "C" __global__ void __launch_bounds__(128) flash_f16_64(FlashParams p) { FLASH_BODY(64, 64, 2, 4, false); }
extern "C" __global__ void __launch_bounds__(128) flash_bf16_64(FlashParams p) { FLASH_BODY(64, 64, 2, 4, true); }
extern "C" __global__ void __launch_bounds__(256) flash_f16_128(FlashParams p) { FLASH_BODY(128, 64, 1, 8, false); }
extern "C" __global__ void __launch_bounds__(256) flash_bf16_128(FlashParams p) { FLASH_BODY(128, 64, 1, 8, true); }
