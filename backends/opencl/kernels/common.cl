// Shared by every program: dtype codes, loads/stores with conversion, and strided views.
// Arithmetic is f32 (f16 and bf16 are storage formats), except in elementwise_half.cl.

#define DT_F32 0u
#define DT_F16 1u
#define DT_BF16 2u
#define DT_I32 3u
#define DT_I64 4u
#define DT_U8 5u

#define MAXR 8

// A logical shape (row-major). Passed by value; the host mirrors this layout (`Shape` in ops/args.rs).
typedef struct {
    uint d[MAXR];
    uint rank;
    uint pad;
} Shape;

// Element strides and offset of one operand over a Shape (stride 0 = broadcast).
typedef struct {
    ulong st[MAXR];
    ulong off;
} View;

// Buffer element index of logical (row-major) element `i` of `s` in view `v`.
inline ulong voff(const Shape *s, const View *v, uint i) {
    ulong o = v->off;
    for (int d = (int)s->rank - 1; d >= 0; --d) {
        uint n = s->d[d];
        uint q = i / n;
        o += (ulong)(i - q * n) * v->st[d];
        i = q;
    }
    return o;
}

// Bit `b` of `contig` says operand b is contiguous over the shape: its element index is off + i.
#define VOFF(contig, b, sh, v, i) ((((contig) >> (b)) & 1u) ? (v).off + (ulong)(i) : voff(&(sh), &(v), (i)))

inline float bf16_to_f32(ushort h) { return as_float(((uint)h) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
inline ushort f32_to_bf16(float x) {
    uint u = as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (ushort)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (ushort)(u >> 16);
}

inline float ld(global const uchar *p, uint dt, ulong i) {
    switch (dt) {
    case DT_F32: return ((global const float *)p)[i];
    case DT_F16: return vload_half(i, (global const half *)p);
    case DT_BF16: return bf16_to_f32(((global const ushort *)p)[i]);
    case DT_I32: return (float)((global const int *)p)[i];
    case DT_I64: return (float)((global const long *)p)[i];
    default: return (float)p[i];
    }
}

inline void st(global uchar *p, uint dt, ulong i, float x) {
    switch (dt) {
    case DT_F32: ((global float *)p)[i] = x; break;
    case DT_F16: vstore_half_rte(x, i, (global half *)p); break;
    case DT_BF16: ((global ushort *)p)[i] = f32_to_bf16(x); break;
    case DT_I32: ((global int *)p)[i] = convert_int_sat_rtz(x); break;
    case DT_I64: ((global long *)p)[i] = convert_long_sat_rtz(x); break;
    default: p[i] = convert_uchar_sat_rtz(x); break;
    }
}

// Integer loads/stores, exact for every integer dtype (int-to-int copies, ids); stores saturate like a cast.
inline long ldi(global const uchar *p, uint dt, ulong i) {
    switch (dt) {
    case DT_I32: return (long)((global const int *)p)[i];
    case DT_I64: return ((global const long *)p)[i];
    default: return (long)p[i];
    }
}

inline void sti(global uchar *p, uint dt, ulong i, long x) {
    switch (dt) {
    case DT_I32: ((global int *)p)[i] = (int)clamp(x, (long)INT_MIN, (long)INT_MAX); break;
    case DT_I64: ((global long *)p)[i] = x; break;
    default: p[i] = (uchar)clamp(x, 0L, 255L); break;
    }
}

// Unary maps (elementwise.cl, and the matmul activation epilogue in matmul.cl).
#define SQRT_2_OVER_PI 0.7978845608028654f

inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp(-x)); }

// Ids are UnaryOp's discriminants (core/src/op.rs).
inline float unary_f(uint f, float x) {
    switch (f) {
    case 0: return -x;
    case 1: return exp(x);
    case 2: return log(x);
    case 3: return sqrt(x);
    case 4: return rsqrt(x);
    case 5: return 1.0f / x;
    case 6: return x * x;
    case 7: return fabs(x);
    case 8: return tanh(x);
    case 9: return sigmoid_f(x);
    case 10: return fmax(x, 0.0f);
    case 11: return x * sigmoid_f(x);
    case 12: return 0.5f * x * (1.0f + erf(x * 0.7071067811865476f));
    case 13: return 0.5f * x * (1.0f + tanh(SQRT_2_OVER_PI * (x + 0.044715f * x * x * x)));
    case 14: return x * sigmoid_f(1.702f * x);
    case 15: return sin(x);
    default: return cos(x);
    }
}
