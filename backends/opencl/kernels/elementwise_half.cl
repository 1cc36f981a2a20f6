// f16 arithmetic for the elementwise ops whose result rounds like the f32 path's: every operand and the output
// are f16, and the op is a short chain of +, -, · (add, sub, mul, neg, square, relu, gated residual, modulate).
// Transcendental maps (exp, tanh, GELU, ...) and divisions stay on `ew` in f32: half-precision versions of
// those built-ins are less accurate, and 1 + tanh(x) cancels badly in f16.
// Same arguments as `ew` (elementwise.cl); the dtype codes are ignored (all f16). Used only where the device
// reports cl_khr_fp16 (or SD3_OPENCL_HALF_MATH=1 forces it); a build failure turns the path off.

#ifdef cl_khr_fp16
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#endif

#define EW_UNARY 2u
#define EW_BINARY 3u
#define EW_MODULATE 5u
#define EW_GATED 6u

kernel void ew_half(uint n, Shape sh, uint op, uint sub, float p0, float p1, uint contig,
                    global const half *a, uint adt, View av,
                    global const half *b, uint bdt, View bv,
                    global const half *c, uint cdt, View cv,
                    global half *y, uint ydt, View yv) {
    uint i = get_global_id(0);
    if (i >= n) return;
    const half x = a[VOFF(contig, 0, sh, av, i)];
    const half zero = (half)0.0f, one = (half)1.0f;
    half r;
    if (op == EW_UNARY) {
        // UnaryOp ids: 0 neg, 6 square, 10 relu (the host sends no other).
        r = sub == 0 ? -x : sub == 6 ? x * x : (x > zero ? x : zero);
    } else if (op == EW_BINARY) {
        // BinaryOp ids: 0 add, 1 sub, 2 mul.
        const half u = b[VOFF(contig, 1, sh, bv, i)];
        r = sub == 0 ? x + u : sub == 1 ? x - u : x * u;
    } else if (op == EW_MODULATE) {
        r = x * (one + b[VOFF(contig, 1, sh, bv, i)]) + c[VOFF(contig, 2, sh, cv, i)];
    } else {
        r = x + b[VOFF(contig, 1, sh, bv, i)] * c[VOFF(contig, 2, sh, cv, i)];
    }
    y[VOFF(contig, 3, sh, yv, i)] = r;
}
