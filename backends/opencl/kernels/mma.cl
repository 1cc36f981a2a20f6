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

