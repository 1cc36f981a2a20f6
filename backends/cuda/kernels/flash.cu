// Fused attention on tensor cores (FlashAttention-2 style): each warp owns 16 query rows, keys stream through
// shared memory 64 at a time, scores live only in registers, softmax is online (running max and sum), and
// P·V reuses the score fragments as the A operand. f16/bf16 inputs, f32 accumulation, head dims 64 and 128,
// no mask or bias (the callers needing those take the chunked cuBLAS path).
//
// Fragment layouts are those of PTX `mma.sync.aligned.m16n8k16` (g = lane/4, t = lane%4):
//   A 16x16: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 : b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C 16x8 : c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)

struct FlashParams {
    u64 q, k, v, o;
    i64 q_s[3], k_s[3], v_s[3], o_s[3];  // element strides over (batch, head, token); the feature stride is 1
    i64 q_off, k_off, v_off, o_off;
    int heads, nq, nk;
    float scale_log2;  // softmax scale · log2(e): scores go through exp2
};

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

// Two floats into one 16x2 register, `lo` in the low half.
template <bool BF16>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <bool BF16>
__device__ __forceinline__ float half_to_float(unsigned short h) { return BF16 ? bf2f(h) : h2f(h); }

#define FLASH_BQ 128  // 8 warps of 16 query rows
#define FLASH_BK 64

template <int DH, bool BF16>
__device__ void flash_fwd(const FlashParams& p) {
    // Row-major tiles, rows padded by 16 bytes so fragment loads and ldmatrix hit distinct banks.
    __shared__ __align__(16) unsigned short ks[FLASH_BK][DH + 8];
    __shared__ __align__(16) unsigned short vs[FLASH_BK][DH + 8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const int q0 = blockIdx.x * FLASH_BQ + warp * 16;
    const unsigned short* qb = (const unsigned short*)p.q + p.q_off + b * p.q_s[0] + h * p.q_s[1];
    const unsigned short* kb = (const unsigned short*)p.k + p.k_off + b * p.k_s[0] + h * p.k_s[1];
    const unsigned short* vb = (const unsigned short*)p.v + p.v_off + b * p.v_s[0] + h * p.v_s[1];

    // This warp's 16 query rows as A fragments, one per 16-wide slice of the head dim.
    unsigned qf[DH / 16][4];
    #pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            int row = q0 + g + (r & 1) * 8, col = kk * 16 + t * 2 + (r >> 1) * 8;
            qf[kk][r] = row < p.nq ? *(const unsigned*)(qb + row * p.q_s[2] + col) : 0u;
        }
    }
    float o[DH / 8][4];
    #pragma unroll
    for (int n = 0; n < DH / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;  // rows g and g+8: running max (log2 units), partial sums

    for (int k0 = 0; k0 < p.nk; k0 += FLASH_BK) {
        __syncthreads();
        // 16-byte vector loads (the host guarantees 8-element alignment of rows).
        for (int idx = threadIdx.x; idx < FLASH_BK * DH / 8; idx += blockDim.x) {
            int key = idx / (DH / 8), c8 = (idx % (DH / 8)) * 8;
            bool in = k0 + key < p.nk;
            U4 zero = {0u, 0u, 0u, 0u};
            U4 kv = in ? *(const U4*)(kb + (i64)(k0 + key) * p.k_s[2] + c8) : zero;
            U4 vv = in ? *(const U4*)(vb + (i64)(k0 + key) * p.v_s[2] + c8) : zero;
            *(U4*)&ks[key][c8] = kv;
            *(U4*)&vs[key][c8] = vv;
        }
        __syncthreads();
        float s[FLASH_BK / 8][4];
        #pragma unroll
        for (int j = 0; j < FLASH_BK / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            #pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                unsigned b0 = *(const unsigned*)&ks[j * 8 + g][kk * 16 + t * 2];
                unsigned b1 = *(const unsigned*)&ks[j * 8 + g][kk * 16 + t * 2 + 8];
                mma16816<BF16>(s[j], qf[kk], b0, b1);
            }
        }
        // Scale into log2 units, mask keys past the end, find the new row maxima.
        float mx0 = m0, mx1 = m1;
        #pragma unroll
        for (int j = 0; j < FLASH_BK / 8; ++j) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                int key = k0 + j * 8 + t * 2 + (e & 1);
                s[j][e] = key < p.nk ? s[j][e] * p.scale_log2 : NEG_INF;
            }
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
        float alpha0 = exp2f(m0 - mx0), alpha1 = exp2f(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        l0 *= alpha0;
        l1 *= alpha1;
        #pragma unroll
        for (int n = 0; n < DH / 8; ++n) {
            o[n][0] *= alpha0;
            o[n][1] *= alpha0;
            o[n][2] *= alpha1;
            o[n][3] *= alpha1;
        }
        unsigned pf[FLASH_BK / 16][4];
        #pragma unroll
        for (int j = 0; j < FLASH_BK / 8; ++j) {
            float p0 = exp2f(s[j][0] - m0), p1 = exp2f(s[j][1] - m0);
            float p2 = exp2f(s[j][2] - m1), p3 = exp2f(s[j][3] - m1);
            l0 += p0 + p1;
            l1 += p2 + p3;
            pf[j / 2][(j & 1) * 2 + 0] = pack2<BF16>(p0, p1);
            pf[j / 2][(j & 1) * 2 + 1] = pack2<BF16>(p2, p3);
        }
        #pragma unroll
        for (int n = 0; n < DH / 8; ++n) {
            #pragma unroll
            for (int kt = 0; kt < FLASH_BK / 16; ++kt) {
                // B = V[16 keys][8 dims]: two 8x8 blocks of the row-major tile, transposed by ldmatrix.
                unsigned b0, b1;
                unsigned addr = (unsigned)__cvta_generic_to_shared(&vs[kt * 16 + (lane & 15)][n * 8]);
                asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                             : "=r"(b0), "=r"(b1)
                             : "r"(addr));
                mma16816<BF16>(o[n], pf[kt], b0, b1);
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    float inv0 = 1.f / l0, inv1 = 1.f / l1;
    unsigned short* ob = (unsigned short*)p.o + p.o_off + b * p.o_s[0] + h * p.o_s[1];
    int r0 = q0 + g, r1 = q0 + g + 8;
    #pragma unroll
    for (int n = 0; n < DH / 8; ++n) {
        int col = n * 8 + t * 2;
        if (r0 < p.nq) *(unsigned*)(ob + r0 * p.o_s[2] + col) = pack2<BF16>(o[n][0] * inv0, o[n][1] * inv0);
        if (r1 < p.nq) *(unsigned*)(ob + r1 * p.o_s[2] + col) = pack2<BF16>(o[n][2] * inv1, o[n][3] * inv1);
    }
}

extern "C" __global__ void __launch_bounds__(256) flash_f16_64(FlashParams p) { flash_fwd<64, false>(p); }
extern "C" __global__ void __launch_bounds__(256) flash_bf16_64(FlashParams p) { flash_fwd<64, true>(p); }
extern "C" __global__ void __launch_bounds__(256) flash_f16_128(FlashParams p) { flash_fwd<128, false>(p); }
extern "C" __global__ void __launch_bounds__(256) flash_bf16_128(FlashParams p) { flash_fwd<128, true>(p); }
