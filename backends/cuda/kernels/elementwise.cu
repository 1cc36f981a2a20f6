// Elementwise ops over the output's shape: copy/cast, fill, unary, binary, affine, modulate, gated residual,
// nearest upsampling and row gather. Operands arrive broadcast to the output shape (stride 0).

#define EW_COPY 0
#define EW_FILL 1
#define EW_UNARY 2
#define EW_BINARY 3
#define EW_AFFINE 4
#define EW_MODULATE 5
#define EW_GATED 6

struct EwParams {
    TD in[3];
    TD out;
    i64 n;
    int op;
    int sub;
    float f0;
    float f1;
    int contiguous;  // every operand contiguous with the output's shape: index = offset + i
    int small;       // n < 2^32: index with 32-bit division
};

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float unary_op(int f, float x) {
    switch (f) {
        case 0: return -x;
        case 1: return expf(x);
        case 2: return logf(x);
        case 3: return sqrtf(x);
        case 4: return rsqrtf(x);
        case 5: return 1.f / x;
        case 6: return x * x;
        case 7: return fabsf(x);
        case 8: return tanhf(x);
        case 9: return sigmoidf_(x);
        case 10: return fmaxf(x, 0.f);
        case 11: return x * sigmoidf_(x);
        case 12: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
        case 13: return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
        case 14: return x * sigmoidf_(1.702f * x);
        case 15: return sinf(x);
        default: return cosf(x);
    }
}

__device__ __forceinline__ float binary_op(int f, float a, float b) {
    switch (f) {
        case 0: return a + b;
        case 1: return a - b;
        case 2: return a * b;
        case 3: return a / b;
        case 4: return fmaxf(a, b);
        default: return fminf(a, b);
    }
}

extern "C" __global__ void ew(EwParams p) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
#define EW_INDEX(t) (p.contiguous ? (t).offset + i : p.small ? td_index32((t), (unsigned)i) : td_index((t), i))
        i64 o = EW_INDEX(p.out);
        i64 e0 = 0, e1 = 0, e2 = 0;
        if (p.op != EW_FILL) e0 = EW_INDEX(p.in[0]);
        if (p.op == EW_BINARY || p.op >= EW_MODULATE) e1 = EW_INDEX(p.in[1]);
        if (p.op >= EW_MODULATE) e2 = EW_INDEX(p.in[2]);
        switch (p.op) {
            case EW_COPY: {
                int di = p.in[0].dtype, dout = p.out.dtype;
                if (di == dout) {
                    if (di == DT_F32 || di == DT_I32) ((unsigned int*)p.out.ptr)[o] = ((const unsigned int*)p.in[0].ptr)[e0];
                    else if (di == DT_I64) ((u64*)p.out.ptr)[o] = ((const u64*)p.in[0].ptr)[e0];
                    else if (di == DT_U8) ((unsigned char*)p.out.ptr)[o] = ((const unsigned char*)p.in[0].ptr)[e0];
                    else ((unsigned short*)p.out.ptr)[o] = ((const unsigned short*)p.in[0].ptr)[e0];
                } else {
                    std_(dout, p.out.ptr, o, ldd(di, p.in[0].ptr, e0));
                }
                break;
            }
            case EW_FILL: stf(p.out.dtype, p.out.ptr, o, p.f0); break;
            case EW_UNARY: stf(p.out.dtype, p.out.ptr, o, unary_op(p.sub, ldf(p.in[0].dtype, p.in[0].ptr, e0))); break;
            case EW_BINARY:
                stf(p.out.dtype, p.out.ptr, o,
                    binary_op(p.sub, ldf(p.in[0].dtype, p.in[0].ptr, e0), ldf(p.in[1].dtype, p.in[1].ptr, e1)));
                break;
            case EW_AFFINE: stf(p.out.dtype, p.out.ptr, o, ldf(p.in[0].dtype, p.in[0].ptr, e0) * p.f0 + p.f1); break;
            case EW_MODULATE: {
                float x = ldf(p.in[0].dtype, p.in[0].ptr, e0);
                float s = ldf(p.in[1].dtype, p.in[1].ptr, e1);
                float h = ldf(p.in[2].dtype, p.in[2].ptr, e2);
                stf(p.out.dtype, p.out.ptr, o, x * (1.f + s) + h);
                break;
            }
            default: {
                float x = ldf(p.in[0].dtype, p.in[0].ptr, e0);
                float g = ldf(p.in[1].dtype, p.in[1].ptr, e1);
                float r = ldf(p.in[2].dtype, p.in[2].ptr, e2);
                stf(p.out.dtype, p.out.ptr, o, x + g * r);
                break;
            }
        }
    }
}

struct UpsampleParams {
    TD in;
    TD out;
    i64 n;
    int factor;
    int pad;
};

extern "C" __global__ void upsample_nearest2d(UpsampleParams p) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
        i64 ow = p.out.shape[3], oh = p.out.shape[2], c = p.out.shape[1];
        i64 x = i % ow, y = (i / ow) % oh, ch = (i / (ow * oh)) % c, b = i / (ow * oh * c);
        i64 e = p.in.offset + b * p.in.strides[0] + ch * p.in.strides[1] + (y / p.factor) * p.in.strides[2] +
                (x / p.factor) * p.in.strides[3];
        stf(p.out.dtype, p.out.ptr, td_index(p.out, i), ldf(p.in.dtype, p.in.ptr, e));
    }
}

// Nearest upsampling of 16-bit data, eight output pixels of a row per thread and one 16-byte store: contiguous
// output, input last stride 1, OW a multiple of 8 and N·C·OH·OW/8 below 2^31 (32-bit index arithmetic; the host
// checks). The generic kernel's per-element 64-bit divisions made it the slowest op of the VAE decode.
extern "C" __global__ void upsample_nearest2d_h8(UpsampleParams p) {
    const unsigned ow8 = (unsigned)(p.out.shape[3] / 8), oh = (unsigned)p.out.shape[2], c = (unsigned)p.out.shape[1];
    const unsigned total = (unsigned)(p.n / 8), f = (unsigned)p.factor;
    const unsigned short* in = (const unsigned short*)p.in.ptr;
    U4* out = (U4*)((unsigned short*)p.out.ptr + p.out.offset);
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const unsigned g8 = i % ow8, r = i / ow8, y = r % oh, nc = r / oh, ch = nc % c, b = nc / c;
        const unsigned short* src =
            in + p.in.offset + b * p.in.strides[0] + ch * p.in.strides[1] + (y / f) * p.in.strides[2];
        unsigned v[4];
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            const unsigned x = g8 * 8 + 2 * j;
            v[j] = (unsigned)src[x / f] | ((unsigned)src[(x + 1) / f] << 16);
        }
        out[i] = U4{v[0], v[1], v[2], v[3]};
    }
}

struct GatherParams {
    TD table;
    TD ids;
    TD out;
    u64 error_flag;  // int* set to 1 when an id is out of range
    i64 n;
};

extern "C" __global__ void gather_rows(GatherParams p) {
    i64 d = p.out.shape[1];
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < p.n; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / d, j = i % d;
        i64 ide = p.ids.offset + r * p.ids.strides[0];
        i64 id = p.ids.dtype == DT_I64 ? ((const i64*)p.ids.ptr)[ide] : (i64)((const int*)p.ids.ptr)[ide];
        if (id < 0 || id >= p.table.shape[0]) {
            *(int*)p.error_flag = 1;
            id = 0;
        }
        i64 e = p.table.offset + id * p.table.strides[0] + j * p.table.strides[1];
        stf(p.out.dtype, p.out.ptr, p.out.offset + r * p.out.strides[0] + j * p.out.strides[1],
            ldf(p.table.dtype, p.table.ptr, e));
    }
}

// The fast path of `ew`: every operand of one float dtype, viewed as [d0, d1, d2, d3] with unit stride in the
// last dim, d3 and every offset and stride multiples of 8. Each thread handles 8 consecutive elements with 16-byte
// loads and stores (two for f32), and computes their index once.
struct EwVecParams {
    u64 ptr[4];  // out, in0, in1, in2
    i64 off[4];
    i64 s0[4];
    i64 s1[4];
    i64 s2[4];
    i64 d0, d1, d2, d3;
    i64 nvec;
    int op, sub, n_in, dtype;
    float f0, f1;
};

// Eight f16/bf16 values packed in 16 bytes, widened to f32.
__device__ __forceinline__ void unpack8(int dt, U4 q, float* v) {
    unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        unsigned short lo = (unsigned short)(w[j] & 0xffff), hi = (unsigned short)(w[j] >> 16);
        v[2 * j] = dt == DT_F16 ? h2f(lo) : bf2f(lo);
        v[2 * j + 1] = dt == DT_F16 ? h2f(hi) : bf2f(hi);
    }
}

__device__ __forceinline__ void load8(int dt, u64 ptr, i64 e, float* v) {
    if (dt == DT_F32) {
        const F4* p = (const F4*)((const float*)ptr + e);
        F4 a = p[0], b = p[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        U4 q = *(const U4*)((const unsigned short*)ptr + e);
        unsigned w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned short lo = (unsigned short)(w[j] & 0xffff), hi = (unsigned short)(w[j] >> 16);
            v[2 * j] = dt == DT_F16 ? h2f(lo) : bf2f(lo);
            v[2 * j + 1] = dt == DT_F16 ? h2f(hi) : bf2f(hi);
        }
    }
}

__device__ __forceinline__ void store8(int dt, u64 ptr, i64 e, const float* v) {
    if (dt == DT_F32) {
        F4* p = (F4*)((float*)ptr + e);
        p[0] = F4{v[0], v[1], v[2], v[3]};
        p[1] = F4{v[4], v[5], v[6], v[7]};
    } else {
        unsigned w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unsigned short lo = dt == DT_F16 ? f2h(v[2 * j]) : f2bf(v[2 * j]);
            unsigned short hi = dt == DT_F16 ? f2h(v[2 * j + 1]) : f2bf(v[2 * j + 1]);
            w[j] = (unsigned)lo | ((unsigned)hi << 16);
        }
        *(U4*)((unsigned short*)ptr + e) = U4{w[0], w[1], w[2], w[3]};
    }
}

// GELU (tanh approximation) as x·sigmoid(2u) = x / (1 + e^(-2u)), u = √(2/π)(x + 0.044715x³): the same function
// as 0.5x(1 + tanh u), with one MUFU exponential and a fast division instead of tanhf's longer sequence. Relative
// error ~1e-7 (f32 conformance passes); e^(-2u) overflowing to +inf gives -0, the limit.
__device__ __forceinline__ float gelu_tanh_fast(float x) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return __fdividef(x, 1.f + __expf(-2.f * u));
}

// The index type: 32-bit division is several times cheaper than 64-bit, and bounds the kernel at high bandwidth
// (the host picks `ew_vec32` when every index fits).
template <typename I>
__device__ __forceinline__ void ew_vec_body(const EwVecParams& p) {
    const I d1 = (I)p.d1, d2 = (I)p.d2, d3 = (I)p.d3;
    for (i64 vi = blockIdx.x * (i64)blockDim.x + threadIdx.x; vi < p.nvec; vi += (i64)gridDim.x * blockDim.x) {
        I i = (I)vi * 8;
        I c = i % d3, r = i / d3;
        I i2 = r % d2;
        r /= d2;
        I i1 = r % d1, i0 = r / d1;
        float a[8], b[8], cc[8], y[8];
        if (p.n_in > 0) load8(p.dtype, p.ptr[1], p.off[1] + i0 * p.s0[1] + i1 * p.s1[1] + i2 * p.s2[1] + c, a);
        if (p.n_in > 1) load8(p.dtype, p.ptr[2], p.off[2] + i0 * p.s0[2] + i1 * p.s1[2] + i2 * p.s2[2] + c, b);
        if (p.n_in > 2) load8(p.dtype, p.ptr[3], p.off[3] + i0 * p.s0[3] + i1 * p.s1[3] + i2 * p.s2[3] + c, cc);
        switch (p.op) {  // uniform across the grid: one branch per vector, not per element
            case EW_COPY:
#pragma unroll
                for (int j = 0; j < 8; ++j) y[j] = a[j];
                break;
            case EW_FILL:
#pragma unroll
                for (int j = 0; j < 8; ++j) y[j] = p.f0;
                break;
            case EW_UNARY:
                if (p.sub == 13) {  // GELU (tanh): the MM-DiT's feed-forward, worth its own loop
#pragma unroll
                    for (int j = 0; j < 8; ++j) y[j] = gelu_tanh_fast(a[j]);
                } else {
#pragma unroll
                    for (int j = 0; j < 8; ++j) y[j] = unary_op(p.sub, a[j]);
                }
                break;
            case EW_BINARY:
#pragma unroll
                for (int j = 0; j < 8; ++j) y[j] = binary_op(p.sub, a[j], b[j]);
                break;
            case EW_AFFINE:
#pragma unroll
                for (int j = 0; j < 8; ++j) y[j] = a[j] * p.f0 + p.f1;
                break;
            case EW_MODULATE:
#pragma unroll
                for (int j = 0; j < 8; ++j) y[j] = a[j] * (1.f + b[j]) + cc[j];
                break;
            default:
#pragma unroll
                for (int j = 0; j < 8; ++j) y[j] = a[j] + b[j] * cc[j];
                break;
        }
        store8(p.dtype, p.ptr[0], p.off[0] + i0 * p.s0[0] + i1 * p.s1[0] + i2 * p.s2[0] + c, y);
    }
}

extern "C" __global__ void ew_vec(EwVecParams p) { ew_vec_body<i64>(p); }
extern "C" __global__ void ew_vec32(EwVecParams p) { ew_vec_body<unsigned>(p); }
