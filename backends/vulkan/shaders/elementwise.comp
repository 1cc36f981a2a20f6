#version 450
// Every elementwise op over strided views: copy/cast, fill, unary, binary, affine, modulate, gated residual and
// nearest upsampling. One invocation per output element, grid-stride over the whole output; or, in pair mode
// (P[18], set by the host for f16/bf16 outputs whose rows are even-length, contiguous and start on a word), per
// two adjacent elements of a row, stored as one word instead of two atomic half-word updates.
//
// P: [0] mode, [1] sub (unary/binary function, upsample factor), [2] n, [3] rank, [4..12) output shape,
// [12..16) dtypes of y, a, b, c, [16] f0, [17] f1, [18] pair mode, views (offset + 8 strides) y@20, a@29, b@38,
// c@47.
#include "common.glsl"
layout(local_size_x = 256) in;

const float SQRT1_2 = 0.70710678118654752;

float erf_approx(float x) {
    // Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
    float t = 1.0 / (1.0 + 0.3275911 * abs(x));
    float y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-x * x);
    return x < 0.0 ? -y : y;
}

float tanh_safe(float x) {
    float t = exp(-2.0 * abs(x));
    float y = (1.0 - t) / (1.0 + t);
    return x < 0.0 ? -y : y;
}

float sigmoid(float x) { return 1.0 / (1.0 + exp(-x)); }

float unary(uint f, float x) {
    switch (f) {
        case 0u: return -x;
        case 1u: return exp(x);
        case 2u: return log(x);
        case 3u: return sqrt(x);
        case 4u: return 1.0 / sqrt(x);
        case 5u: return 1.0 / x;
        case 6u: return x * x;
        case 7u: return abs(x);
        case 8u: return tanh_safe(x);
        case 9u: return sigmoid(x);
        case 10u: return max(x, 0.0);
        case 11u: return x * sigmoid(x);
        case 12u: return 0.5 * x * (1.0 + erf_approx(x * SQRT1_2));
        case 13u: return 0.5 * x * (1.0 + tanh_safe(0.7978845608028654 * (x + 0.044715 * x * x * x)));
        case 14u: return x * sigmoid(1.702 * x);
        case 15u: return sin(x);
        default: return cos(x);
    }
}

float binary(uint f, float a, float b) {
    switch (f) {
        case 0u: return a + b;
        case 1u: return a - b;
        case 2u: return a * b;
        case 3u: return a / b;
        // NaN propagates like f64::max/min in the reference: the non-NaN operand wins.
        case 4u: return isnan(a) ? b : (isnan(b) ? a : max(a, b));
        default: return isnan(a) ? b : (isnan(b) ? a : min(a, b));
    }
}

// Offset in the input view of output index `lin`, with the last two dims divided by the upsample factor.
uint upsample_offset(uint lin, uint rank, uint factor) {
    uint off = P[29];
    for (int d = int(rank) - 1; d >= 0; --d) {
        uint n = P[4u + uint(d)];
        uint c = lin % n;
        lin /= n;
        if (uint(d) + 2u >= rank) c /= factor;
        off += c * P[30u + uint(d)];
    }
    return off;
}

// The op's value at output index `i` whose inputs lie at offsets oa, ob, oc (mode 7: oa already upsampled).
float value(uint mode, uint sub, uint oa, uint ob, uint oc) {
    uint da = P[13], db = P[14], dc = P[15];
    if (mode == 1u) return pf(16);
    float a = ld2(da, oa);
    if (mode == 0u || mode == 7u) return a;
    if (mode == 2u) return unary(sub, a);
    if (mode == 4u) return a * pf(16) + pf(17);
    float b = ld3(db, ob);
    if (mode == 3u) return binary(sub, a, b);
    float c = ld4(dc, oc);
    return mode == 5u ? a * (1.0 + b) + c : a + b * c;
}

uint raw16(uint e) { return (b2[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }

void main() {
    uint mode = P[0], sub = P[1], n = P[2], rank = P[3];
    uint dy = P[12], da = P[13];
    uint first = flat_group() * 256u + gl_LocalInvocationID.x, step = group_count() * 256u;
    if (P[18] != 0u) {
        // Pairs (i, i+1) of one row: the inputs of i+1 are one last-dim stride further (mode 7: recomputed).
        uint last = rank - 1u;
        for (uint j = first; j < n / 2u; j += step) {
            uint i = 2u * j;
            uint oy = view_offset(i, rank, 4u, 20u);
            uint oa = view_offset(i, rank, 4u, 29u), ob = view_offset(i, rank, 4u, 38u), oc = view_offset(i, rank, 4u, 47u);
            uint sa = P[30u + last], sb = P[39u + last], sc = P[48u + last];
            if (mode == 0u && da == dy) {
                b1[oy >> 1] = raw16(oa) | (raw16(oa + sa) << 16);
            } else if (mode == 7u) {
                st2(dy, oy, ld2(da, upsample_offset(i, rank, sub)), ld2(da, upsample_offset(i + 1u, rank, sub)));
            } else {
                st2(dy, oy, value(mode, sub, oa, ob, oc), value(mode, sub, oa + sa, ob + sb, oc + sc));
            }
        }
        return;
    }
    for (uint i = first; i < n; i += step) {
        uint oy = view_offset(i, rank, 4u, 20u);
        if (mode == 0u && da == dy) {
            copy_raw(dy, view_offset(i, rank, 4u, 29u), oy);
            continue;
        }
        uint oa = mode == 7u ? upsample_offset(i, rank, sub) : (mode == 1u ? 0u : view_offset(i, rank, 4u, 29u));
        uint ob = mode == 3u || mode == 5u || mode == 6u ? view_offset(i, rank, 4u, 38u) : 0u;
        uint oc = mode == 5u || mode == 6u ? view_offset(i, rank, 4u, 47u) : 0u;
        st(dy, oy, value(mode, sub, oa, ob, oc));
    }
}
