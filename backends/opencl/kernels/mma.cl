// Helpers of gemm_mma.cl (included once per program): the 16-bit staging conversion and the MMA instruction.
// MMA_BF16 (build option) picks bf16 or f16 operands.

// The dtype code of the MMA operands: inputs of this dtype can be staged without conversion.
#define MMA_DT (MMA_BF16 ? DT_BF16 : DT_F16)

inline ushort to_mma_bits(float x) {
#if MMA_BF16
    return f32_to_bf16(x);
#else
    ushort h;
    vstore_half_rte(x, 0, (private half *)&h);
    return h;
#endif
}

inline void mma_16816(float *d, const uint *a, const uint *b) {
#if MMA_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(d[0]), "f"(d[1]),
                   "f"(d[2]), "f"(d[3]));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(d[0]), "f"(d[1]),
                   "f"(d[2]), "f"(d[3]));
#endif
}

#ifdef MMA_MI // the GEMM programs only (attention_mma.cl has its own tiles)
// MMA_MI x MMA_NJ MMA tiles per warp and MMA_WM x MMA_WN warps per work-group, MMA_BK deep slices (build
// options): 2 x 4 tiles on 2 x 2 warps give 64x64 work-group tiles of 128 threads.
#define MMA_THREADS (32 * MMA_WM * MMA_WN)
#define BM (16 * MMA_MI * MMA_WM)
#define BN (8 * MMA_NJ * MMA_WN)
#define BK MMA_BK // k per local-memory slice: 32 or 64
#define LDS (BK + 8) // row pitch in 16-bit elements (padding spreads the fragment reads over banks)
#if (BM * BK / 8) % MMA_THREADS != 0 || (BN * BK / 8) % MMA_THREADS != 0
#error "each thread must stage whole 8-element chunks of both tiles"
#endif

// Fragments of one BK slice from local memory, and the warp's MMA_MI x MMA_NJ MMAs on them.
inline void mma_block(local const ushort *As, local const ushort *Bs, float acc[MMA_MI][MMA_NJ][4], uint wm, uint wn,
                      uint g, uint t) {
    for (uint ks = 0; ks < BK; ks += 16) {
        uint af[MMA_MI][4], bf[MMA_NJ][2];
        for (uint i = 0; i < MMA_MI; ++i) {
            uint r = wm + i * 16 + g, c = ks + t * 2;
            af[i][0] = *(local const uint *)&As[r * LDS + c];
            af[i][1] = *(local const uint *)&As[(r + 8) * LDS + c];
            af[i][2] = *(local const uint *)&As[r * LDS + c + 8];
            af[i][3] = *(local const uint *)&As[(r + 8) * LDS + c + 8];
        }
        for (uint j = 0; j < MMA_NJ; ++j) {
            uint n = wn + j * 8 + g, c = ks + t * 2;
            bf[j][0] = *(local const uint *)&Bs[n * LDS + c];
            bf[j][1] = *(local const uint *)&Bs[n * LDS + c + 8];
        }
        for (uint i = 0; i < MMA_MI; ++i)
            for (uint j = 0; j < MMA_NJ; ++j) mma_16816(acc[i][j], af[i], bf[j]);
    }
}

#endif

// 8 consecutive 16-bit values row[k..k+8) as one uint4, zero past K or where !valid (nothing is read then).
inline uint4 fetch8(global const ushort *row, uint k, uint K, bool valid) {
    if (valid && k + 8 <= K) return *(global const uint4 *)(row + k);
    ushort tmp[8];
    for (uint q = 0; q < 8; ++q) tmp[q] = (valid && k + q < K) ? row[k + q] : (ushort)0;
    return as_uint4(vload8(0, tmp));
}
