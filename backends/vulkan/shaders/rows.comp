#version 450
// Row ops over the last dim: softmax, layer norm (optionally affine), RMS norm, fused layer-norm + modulate.
// One workgroup per row (grid-stride over rows); statistics are two-pass (mean, then variance) like the reference.
//
// P: [0] mode (0 softmax, 1 layer norm, 2 rms norm, 3 layer norm modulate), [1] affine, [2] rows, [3] D,
// [4] outer rank, [5..12) outer shape, [13..17) dtypes y, x, t2, t3, [18] pair mode (f16/bf16 output rows that are
// even-length, contiguous and start on a word: two elements per word store, no atomics), [19] eps,
// views y@20, x@29, t2@38, t3@47: offset, 7 outer strides, stride along D.
// t2/t3 are (weight, bias) for layer norm, (weight, -) for RMS norm, (scale, shift) for modulate.
#include "common.glsl"
layout(local_size_x = 256) in;

shared float red[256];

float reduce_sum(float v) {
    uint t = gl_LocalInvocationID.x;
    red[t] = v;
    barrier();
    for (uint s = 128u; s > 0u; s >>= 1) {
        if (t < s) red[t] += red[t + s];
        barrier();
    }
    float r = red[0];
    barrier();
    return r;
}

float reduce_max(float v) {
    uint t = gl_LocalInvocationID.x;
    red[t] = v;
    barrier();
    for (uint s = 128u; s > 0u; s >>= 1) {
        if (t < s) red[t] = max(red[t], red[t + s]);
        barrier();
    }
    float r = red[0];
    barrier();
    return r;
}

// Store the row's outputs, element j's value being F(j).
#define WRITE_ROW(F)                                                                                     \
    if (pairs) {                                                                                         \
        for (uint j = 2u * t; j < D; j += 512u) st2(dy, by + j, F(j), F(j + 1u));                        \
    } else {                                                                                             \
        for (uint j = t; j < D; j += 256u) st(dy, by + j * sy, F(j));                                    \
    }

void main() {
    bool pairs = P[18] != 0u;
    uint mode = P[0], affine = P[1], rows = P[2], D = P[3], orank = P[4];
    uint dy = P[13], dx = P[14], d2 = P[15], d3 = P[16];
    float eps = pf(19);
    uint t = gl_LocalInvocationID.x;
    for (uint row = flat_group(); row < rows; row += group_count()) {
        uint by = row_base(row, orank, 20u), bx = row_base(row, orank, 29u);
        uint b2 = row_base(row, orank, 38u), b3 = row_base(row, orank, 47u);
        uint sy = P[28], sx = P[37], s2 = P[46], s3 = P[55];
        if (mode == 0u) {
            float m = uintBitsToFloat(0xff800000u);
            for (uint j = t; j < D; j += 256u) m = max(m, ld2(dx, bx + j * sx));
            m = reduce_max(m);
            float s = 0.0;
            for (uint j = t; j < D; j += 256u) s += exp(ld2(dx, bx + j * sx) - m);
            s = reduce_sum(s);
#define SOFTMAX(j) (exp(ld2(dx, bx + (j) * sx) - m) / s)
            WRITE_ROW(SOFTMAX)
        } else if (mode == 2u) {
            float s = 0.0;
            for (uint j = t; j < D; j += 256u) {
                float v = ld2(dx, bx + j * sx);
                s += v * v;
            }
            float inv = 1.0 / sqrt(reduce_sum(s) / float(D) + eps);
#define RMS(j) (ld2(dx, bx + (j) * sx) * inv * ld3(d2, b2 + (j) * s2))
            WRITE_ROW(RMS)
        } else {
            float s = 0.0;
            for (uint j = t; j < D; j += 256u) s += ld2(dx, bx + j * sx);
            float mean = reduce_sum(s) / float(D);
            float q = 0.0;
            for (uint j = t; j < D; j += 256u) {
                float v = ld2(dx, bx + j * sx) - mean;
                q += v * v;
            }
            float inv = 1.0 / sqrt(reduce_sum(q) / float(D) + eps);
#define NORMED(j) ((ld2(dx, bx + (j) * sx) - mean) * inv)
#define MODULATED(j) (NORMED(j) * (1.0 + ld3(d2, b2 + (j) * s2)) + ld4(d3, b3 + (j) * s3))
#define AFFINE(j) (NORMED(j) * ld3(d2, b2 + (j) * s2) + ld4(d3, b3 + (j) * s3))
            if (mode == 3u) {
                WRITE_ROW(MODULATED)
            } else if (affine != 0u) {
                WRITE_ROW(AFFINE)
            } else {
                WRITE_ROW(NORMED)
            }
        }
    }
}
