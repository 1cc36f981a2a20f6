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
    int pad;
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
        i64 o = p.contiguous ? p.out.offset + i : td_index(p.out, i);
        i64 e0 = 0, e1 = 0, e2 = 0;
        if (p.op != EW_FILL) e0 = p.contiguous ? p.in[0].offset + i : td_index(p.in[0], i);
        if (p.op == EW_BINARY || p.op >= EW_MODULATE) e1 = p.contiguous ? p.in[1].offset + i : td_index(p.in[1], i);
        if (p.op >= EW_MODULATE) e2 = p.contiguous ? p.in[2].offset + i : td_index(p.in[2], i);
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
