// Fused attention for Hopper (sm_90a): FlashAttention-2's algorithm on the warpgroup tensor-core instruction
// `wgmma`, which reads its B operand straight from shared memory and runs asynchronously, instead of `mma.sync`
// with every fragment staged through registers by ldmatrix (`flash.cu`; the two share FlashParams and their PTX
// helpers through `flash_common.cuh`). Head dim 64, f16/bf16, no mask or bias: the MM-DiT's joint attention.
//
// A block of two warpgroups (128 threads each) owns 128 query rows, 64 per warpgroup, held as wgmma A fragments in
// registers for the whole pass. Key and value tiles of 64 rows stream through double-buffered shared memory with
// cp.async, one barrier per tile (as in flash.cu). Per tile, each warpgroup computes S = Q·Kᵀ (wgmma, B = the K
// tile, K-major), the online softmax on the accumulators in registers, then O += P·V (wgmma, A = P converted in
// registers, B = the V tile read N-major through the descriptor's transpose). Two blocks fit on an SM (120
// registers), so four warpgroups interleave their tensor-core and exponential phases.
//
// Measured on an H200 at 2x24 heads x 4429 tokens and rejected (this kernel: 0.602 ms, 400 TFLOP/s, against
// PyTorch SDPA's 0.585 ms): key tiles of 128 (0.753 ms), three warpgroups per block (0.838 ms), one warpgroup per
// block with four blocks per SM (0.639 ms); FlashAttention-3's intra-warpgroup pipelining, the next tile's scores
// issued before this tile's softmax with three K/V stages (two score tiles in registers, 150-155 registers, so one
// block per SM): 0.715-0.873 ms; exponentials as ex2.approx.f16x2 (ptxas splits it into one MUFU op per half).
//
// Shared tiles use wgmma's 128-byte swizzle: a row of 64 halves is 128 bytes, and its 16-byte chunk c is stored at
// chunk c ^ (row % 8), so the eight rows of a 1024-byte atom spread over all banks. Tiles start on 1024 bytes.
// Register fragment layouts (per warp of the warpgroup, g = lane/4, t = lane%4) equal mma.sync's m16n8k16 ones
// (see flash.cu): warp w owns rows 16w..16w+15 of the 64.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// D[64x64] (+)= A[64x16] (registers) * B[16x64] (shared memory, descriptor); TB = 1: B is N-major. scale_d = 0
// overwrites D. The 32 accumulators of this thread are operands %0..%31.
#define WGMMA_D32 \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28," \
    "%29,%30,%31}"
#define WGMMA_OUTS(d)                                                                                          \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),   \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),  \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
template <bool BF16, int TB>
__device__ __forceinline__ void wgmma_n64(float* d, const unsigned* a, u64 desc, int scale_d) {
    if (BF16) {
        asm volatile("{.reg .pred p; setp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_D32
                     ", {%32,%33,%34,%35}, %36, p, 1, 1, %38;}"
                     : WGMMA_OUTS(d)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d), "n"(TB));
    } else {
        asm volatile("{.reg .pred p; setp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " WGMMA_D32
                     ", {%32,%33,%34,%35}, %36, p, 1, 1, %38;}"
                     : WGMMA_OUTS(d)
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d), "n"(TB));
    }
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

// Pins accumulator registers at this point of the program: the compiler must not move their reads or writes
// across the asynchronous wgmma that owns them (it sees registers, not the tensor cores' use of them).
template <int N>
__device__ __forceinline__ void pin(float* r) {
    #pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// cp.async writes through the generic proxy; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Shared-memory matrix descriptor for a 128-byte-swizzled tile with 128-byte rows: 8-row groups 1024 bytes apart
// (the stride byte offset); the leading byte offset is unused by these layouts (1 by convention).
__device__ __forceinline__ u64 smem_desc(const void* p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    return (u64)((a & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

// Queue a 64 x 64 tile (rows k0.., zeros past nk) into `tile` with the 128-byte swizzle: 512 chunks of 16 bytes,
// two per thread.
__device__ __forceinline__ void load_tile_sw(unsigned short* tile, const unsigned short* base, i64 row_stride, int k0,
                                             int nk) {
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        int idx = threadIdx.x + i * 256;
        int row = idx >> 3, c = idx & 7;
        bool in = k0 + row < nk;
        const unsigned short* src = base + (i64)(in ? k0 + row : 0) * row_stride + c * 8;
        cp_async16(tile + row * 64 + ((c ^ (row & 7)) << 3), src, in ? 16 : 0);
    }
}

// Online softmax of one score tile `s` (rows g and g+8 of this warp, keys k0..k0+64): masks keys past nk, updates
// the running maxima m and sums l (in raw score units; exponentials in log2 units), rescales the output rows o,
// and leaves the probabilities in `pf` as wgmma A fragments, one per 16 keys.
template <bool BF16>
__device__ __forceinline__ void softmax_tile(float* s, unsigned (*pf)[4], float* o, float& m0, float& m1, float& l0,
                                             float& l1, int k0, int nk, int t, float scale_log2) {
    if (k0 + 64 > nk) {
        #pragma unroll
        for (int j = 0; j < 8; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e)
                if (k0 + j * 8 + t * 2 + (e & 1) >= nk) s[4 * j + e] = NEG_INF;
    }
    float mx0 = m0, mx1 = m1;
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
        mx0 = fmaxf(mx0, fmaxf(s[4 * j], s[4 * j + 1]));
        mx1 = fmaxf(mx1, fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
    const float alpha0 = fast_exp2((m0 - mx0) * scale_log2), alpha1 = fast_exp2((m1 - mx1) * scale_log2);
    m0 = mx0;
    m1 = mx1;
    const float base0 = mx0 * scale_log2, base1 = mx1 * scale_log2;
    float sum0 = 0.f, sum1 = 0.f;
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
        float p0 = fast_exp2(fmaf(s[4 * j], scale_log2, -base0));
        float p1 = fast_exp2(fmaf(s[4 * j + 1], scale_log2, -base0));
        float p2 = fast_exp2(fmaf(s[4 * j + 2], scale_log2, -base1));
        float p3 = fast_exp2(fmaf(s[4 * j + 3], scale_log2, -base1));
        sum0 += p0 + p1;
        sum1 += p2 + p3;
        pf[j / 2][(j & 1) * 2] = pack2<BF16>(p0, p1);
        pf[j / 2][(j & 1) * 2 + 1] = pack2<BF16>(p2, p3);
    }
    l0 = l0 * alpha0 + sum0;
    l1 = l1 * alpha1 + sum1;
    #pragma unroll
    for (int n = 0; n < 8; ++n) {
        o[4 * n] *= alpha0;
        o[4 * n + 1] *= alpha0;
        o[4 * n + 2] *= alpha1;
        o[4 * n + 3] *= alpha1;
    }
}

// S = Q·Kᵀ for one key tile, issued asynchronously: the head dim in steps of 16 (32 bytes into each swizzled row).
template <bool BF16>
__device__ __forceinline__ void issue_scores(float* s, const unsigned (*qf)[4], const unsigned short* kt_s) {
    wgmma_fence();
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_n64<BF16, 0>(s, qf[kk], smem_desc(kt_s + kk * 16), kk);
    wgmma_commit();
}

// O += P·V for one key tile, issued asynchronously: the tile's keys in steps of 16 (16 rows, 2048 bytes, of V).
template <bool BF16>
__device__ __forceinline__ void issue_pv(float* o, const unsigned (*pf)[4], const unsigned short* vt_s) {
    wgmma_fence();
    pin<32>(o);
    #pragma unroll
    for (int kt = 0; kt < 4; ++kt) wgmma_n64<BF16, 1>(o, pf[kt], smem_desc(vt_s + kt * 16 * 64), 1);
    wgmma_commit();
}

template <bool BF16>
__device__ void flash90(const FlashParams& p) {
    constexpr int TILE = 64 * 64;  // halves per K or V tile
    // [K buffer 0, K buffer 1, V buffer 0, V buffer 1], from the first 1024-byte boundary (the host adds 1 KiB).
    extern __shared__ __align__(16) unsigned short smem_raw[];
    unsigned short* smem =
        smem_raw + ((1024 - ((unsigned)__cvta_generic_to_shared(smem_raw) & 1023)) & 1023) / 2;
    unsigned short* ks = smem;
    unsigned short* vs = smem + 2 * TILE;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2,
              t = lane & 3;
    const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const int q0 = blockIdx.x * 128 + wg * 64 + warp * 16;  // this warp's first query row
    const unsigned short* qb = (const unsigned short*)p.q + p.q_off + b * p.q_s[0] + h * p.q_s[1];
    const unsigned short* kb = (const unsigned short*)p.k + p.k_off + b * p.k_s[0] + h * p.k_s[1];
    const unsigned short* vb = (const unsigned short*)p.v + p.v_off + b * p.v_s[0] + h * p.v_s[1];
    const int tiles = (p.nk + 63) / 64;
    auto load = [&](int tile) {
        const int buf = tile & 1;
        load_tile_sw(ks + buf * TILE, kb, p.k_s[2], tile * 64, p.nk);
        load_tile_sw(vs + buf * TILE, vb, p.v_s[2], tile * 64, p.nk);
        cp_async_commit();
    };

    load(0);
    unsigned qf[4][4];  // [16-wide slice of the head dim][A fragment]
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
            int row = q0 + g + (r & 1) * 8, col = kk * 16 + t * 2 + (r >> 1) * 8;
            qf[kk][r] = row < p.nq ? *(const unsigned*)(qb + (i64)row * p.q_s[2] + col) : 0u;
        }
    }
    // o[4n + e]: columns 8n + 2t + (e & 1) of rows g (e < 2) and g + 8 (e >= 2).
    float o[32];
    #pragma unroll
    for (int i = 0; i < 32; ++i) o[i] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    unsigned pf[4][4];
    float s[32];

    for (int it = 0; it < tiles; ++it) {
        // One barrier per tile: every thread's copies of tile it have landed, and every warpgroup is done with
        // tile it-1 (both its products were waited for), whose buffers tile it+1 now loads into.
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (it + 1 < tiles) load(it + 1);
        issue_scores<BF16>(s, qf, ks + (it & 1) * TILE);
        wgmma_wait_all();
        pin<32>(s);
        softmax_tile<BF16>(s, pf, o, m0, m1, l0, l1, it * 64, p.nk, t, p.scale_log2);
        issue_pv<BF16>(o, pf, vs + (it & 1) * TILE);
        wgmma_wait_all();
        pin<32>(o);
    }

    unsigned short* ob = (unsigned short*)p.o + p.o_off + b * p.o_s[0] + h * p.o_s[1];
    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    const int r0 = q0 + g, r1 = r0 + 8;
    #pragma unroll
    for (int n = 0; n < 8; ++n) {
        int col = n * 8 + t * 2;
        if (r0 < p.nq) *(unsigned*)(ob + (i64)r0 * p.o_s[2] + col) = pack2<BF16>(o[4 * n] * inv0, o[4 * n + 1] * inv0);
        if (r1 < p.nq)
            *(unsigned*)(ob + (i64)r1 * p.o_s[2] + col) = pack2<BF16>(o[4 * n + 2] * inv1, o[4 * n + 3] * inv1);
    }
}

#define FLASH90_BODY(BF16) flash90<BF16>(p)
#else
#define FLASH90_BODY(BF16) __trap()  // built for sm_90a only; the host launches it on sm_90 alone
#endif

// 256 threads (two warpgroups) and 128 query rows per block, two blocks per SM; the host mirrors this in
// attention.rs and the shared memory size (2 x 2 tiles of 8 KiB, plus 1 KiB for alignment) in kernels.rs.
extern "C" __global__ void __launch_bounds__(256, 2) flash90_f16(FlashParams p) { FLASH90_BODY(false); }
extern "C" __global__ void __launch_bounds__(256, 2) flash90_bf16(FlashParams p) { FLASH90_BODY(true); }
