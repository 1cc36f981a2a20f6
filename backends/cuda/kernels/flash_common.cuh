// Shared by both attention kernels (flash.cu for sm_80+, flash_sm90.cu for sm_90a): their parameters and the
// small PTX helpers they both use.

struct FlashParams {
    u64 q, k, v, o;
    i64 q_s[3], k_s[3], v_s[3], o_s[3];  // element strides over (batch, head, token); the feature stride is 1
    i64 q_off, k_off, v_off, o_off;
    int heads, nq, nk;
    float scale_log2;  // softmax scale · log2(e): scores go through exp2
};

#if __CUDA_ARCH__ >= 800

// Two floats into one 16x2 register, `lo` in the low half.
template <bool BF16>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 2^x in one MUFU instruction (exp2f adds denormal handling the softmax does not need: its inputs are ≤ 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// 16 bytes global → shared without staging in registers; `bytes` 0 fills zeros (rows past the last key).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

#endif
