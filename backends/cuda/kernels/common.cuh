// Shared definitions for every sd3 CUDA kernel: the tensor descriptor (mirrors `params.rs`), dtype codes
// (mirror sd3_core::DType ids) and element loads/stores that convert through f32 (f64 for integer casts).
// No CUDA headers are included so NVRTC needs no include path: f16/bf16 conversions use PTX `cvt` and bit shifts.

#define SD3_MAX_RANK 8
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_I32 3
#define DT_I64 4
#define DT_U8 5

#define NEG_INF __int_as_float(0xff800000)
typedef long long i64;
typedef unsigned long long u64;

// 16-byte vectors for wide loads and stores (defined here so NVRTC needs no CUDA headers).
struct __align__(16) U4 {
    unsigned x, y, z, w;
};
struct __align__(16) F4 {
    float x, y, z, w;
};

struct TD {
    i64 shape[SD3_MAX_RANK];
    i64 strides[SD3_MAX_RANK];
    i64 offset;
    u64 ptr;
    int rank;
    int dtype;
};

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }
__device__ __forceinline__ unsigned short f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffff) > 0x7f800000) return (unsigned short)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fff + ((u >> 16) & 1);                                                  // round to nearest even
    return (unsigned short)(u >> 16);
}

// Element `e` (element index into the buffer, offset already applied) as f32.
__device__ __forceinline__ float ldf(int dt, u64 ptr, i64 e) {
    switch (dt) {
        case DT_F32: return ((const float*)ptr)[e];
        case DT_F16: return h2f(((const unsigned short*)ptr)[e]);
        case DT_BF16: return bf2f(((const unsigned short*)ptr)[e]);
        case DT_I32: return (float)((const int*)ptr)[e];
        case DT_I64: return (float)((const i64*)ptr)[e];
        default: return (float)((const unsigned char*)ptr)[e];
    }
}
__device__ __forceinline__ void stf(int dt, u64 ptr, i64 e, float v) {
    switch (dt) {
        case DT_F32: ((float*)ptr)[e] = v; break;
        case DT_F16: ((unsigned short*)ptr)[e] = f2h(v); break;
        case DT_BF16: ((unsigned short*)ptr)[e] = f2bf(v); break;
        case DT_I32: ((int*)ptr)[e] = (int)v; break;
        case DT_I64: ((i64*)ptr)[e] = (i64)v; break;
        default: ((unsigned char*)ptr)[e] = (unsigned char)v; break;
    }
}
__device__ __forceinline__ double ldd(int dt, u64 ptr, i64 e) {
    switch (dt) {
        case DT_I32: return (double)((const int*)ptr)[e];
        case DT_I64: return (double)((const i64*)ptr)[e];
        default: return (double)ldf(dt, ptr, e);
    }
}
__device__ __forceinline__ void std_(int dt, u64 ptr, i64 e, double v) {
    switch (dt) {
        case DT_I32: ((int*)ptr)[e] = (int)v; break;
        case DT_I64: ((i64*)ptr)[e] = (i64)v; break;
        case DT_U8: ((unsigned char*)ptr)[e] = (unsigned char)v; break;
        default: stf(dt, ptr, e, (float)v); break;
    }
}

// Index helpers. Loops run over the compile-time SD3_MAX_RANK with a guard, fully unrolled, so every access
// to a descriptor field has a constant index: a loop bounded by the runtime rank would make the compiler copy
// the whole parameter struct into local memory in every thread.

// Buffer element index of the logical row-major element `i` of a view.
__device__ __forceinline__ i64 td_index(const TD& t, i64 i) {
    i64 off = t.offset;
#pragma unroll
    for (int d = SD3_MAX_RANK - 1; d >= 0; --d) {
        if (d < t.rank) {
            i64 n = t.shape[d];
            off += (i % n) * t.strides[d];
            i /= n;
        }
    }
    return off;
}

// The same with 32-bit division, for tensors of fewer than 2^32 elements (64-bit division is many times slower).
__device__ __forceinline__ i64 td_index32(const TD& t, unsigned i) {
    i64 off = t.offset;
#pragma unroll
    for (int d = SD3_MAX_RANK - 1; d >= 0; --d) {
        if (d < t.rank) {
            unsigned n = (unsigned)t.shape[d];
            off += (i64)(i % n) * t.strides[d];
            i /= n;
        }
    }
    return off;
}

// Element index of (row r, column 0) where rows enumerate all dims but the last.
__device__ __forceinline__ i64 td_row(const TD& t, i64 r) {
    i64 off = t.offset;
#pragma unroll
    for (int d = SD3_MAX_RANK - 2; d >= 0; --d) {
        if (d < t.rank - 1) {
            i64 n = t.shape[d];
            off += (r % n) * t.strides[d];
            r /= n;
        }
    }
    return off;
}

// The last dim's stride of a view, read with constant indices.
__device__ __forceinline__ i64 td_last_stride(const TD& t) {
    i64 s = 1;
#pragma unroll
    for (int d = 0; d < SD3_MAX_RANK; ++d)
        if (d == t.rank - 1) s = t.strides[d];
    return s;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
// Block-wide reductions for blockDim.x a multiple of 32, at most 1024. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = (threadIdx.x < (blockDim.x >> 5)) ? scratch[threadIdx.x] : 0.f;
    if (warp == 0) r = warp_sum(r);
    if (threadIdx.x == 0) scratch[0] = r;
    __syncthreads();
    return scratch[0];
}
__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = (threadIdx.x < (blockDim.x >> 5)) ? scratch[threadIdx.x] : NEG_INF;
    if (warp == 0) r = warp_max(r);
    if (threadIdx.x == 0) scratch[0] = r;
    __syncthreads();
    return scratch[0];
}
