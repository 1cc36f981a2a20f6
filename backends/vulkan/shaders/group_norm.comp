#version 450
// Group norm over (C/groups, spatial...), in three passes over chunks of CHUNK elements of each group, so that a
// group of any size spreads over many workgroups (and each invocation loops a bounded number of times: lavapipe,
// Mesa < 23, ends an invocation after 65535 loop iterations). Statistics are two-pass like the reference:
//   mode 0: partial sums of x per chunk            -> scratch[ng·chunks + c]          (binding 1 = scratch)
//   mode 1: mean from those; partial Σ(x-mean)²    -> scratch[NG·chunks + ng·chunks + c] (binding 1 = scratch)
//   mode 2: mean and 1/std from the partials; normalise (and scale/shift) the chunk into y (binding 5 = scratch)
// One workgroup per (batch·group, chunk), grid-stride.
//
// P: [0] NG = N·groups, [1] groups, [2] channels per group, [3] spatial size S, [4] spatial rank,
// [5..11) spatial shape, [11..15) dtypes y, x, weight, bias, [15] affine, [16] eps, [17] mode, [18] chunks,
// [19] chunk length, views y@20, x@29 (offset, 8 strides over [N, C, spatial...]), weight@38, bias@40
// (offset, stride), [42] scratch offset, [43] vector mode.
//
// Vector mode (set by the host where x and y are contiguous f16 with 16-byte aligned starts and the spatial size is
// a multiple of 8, as the VAE's activations): each invocation takes 8 adjacent elements of the group (one channel)
// with one 16-byte load and, in the last pass, one 16-byte store, with no index division per element.
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
layout(local_size_x = 256) in;
layout(std430, set = 0, binding = 1) writeonly buffer OutV { uvec4 y_v[]; };
layout(std430, set = 0, binding = 2) readonly buffer InV { uvec4 x_v[]; };

// The sum of 8 halves (and of their squared deviations from `mean`).
float sum8(uvec4 w, float mean, bool squares) {
    float s = 0.0;
    [[unroll]] for (uint j = 0u; j < 4u; ++j) {
        vec2 h = unpackHalf2x16(w[j]) - mean;
        s += squares ? dot(h, h) : h.x + h.y;
    }
    return s;
}

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

// Offset of (batch n, channel c, spatial index s) in view `v`.
uint elem_offset(uint n, uint c, uint s, uint v) {
    uint off = P[v] + n * P[v + 1u] + c * P[v + 2u];
    uint srank = P[4];
    for (int d = int(srank) - 1; d >= 0; --d) {
        uint len = P[5u + uint(d)];
        off += (s % len) * P[v + 3u + uint(d)];
        s /= len;
    }
    return off;
}

void main() {
    uint NG = P[0], G = P[1], cg = P[2], S = P[3];
    uint dy = P[11], dx = P[12], dw = P[13], db = P[14], affine = P[15];
    float eps = pf(16);
    uint mode = P[17], chunks = P[18], clen = P[19], sc = P[42];
    uint len = cg * S;
    uint t = gl_LocalInvocationID.x;
    bool vec = P[43] != 0u;
    for (uint wi = flat_group(); wi < NG * chunks; wi += group_count()) {
        uint ng = wi / chunks, c = wi % chunks, n = ng / G, g = ng % G;
        uint e0 = c * clen, e1 = min(len, e0 + clen);
        // Vector mode: the group's first element in x and y (contiguous: its elements follow one another).
        uint gx = P[29] + n * P[30] + g * cg * S, gy = P[20] + n * P[21] + g * cg * S;
        if (mode == 0u) {
            float s = 0.0;
            if (vec) {
                for (uint e = e0 + 8u * t; e < e1; e += 2048u) s += sum8(x_v[(gx + e) >> 3], 0.0, false);
            } else {
                for (uint e = e0 + t; e < e1; e += 256u) s += ld2(dx, elem_offset(n, g * cg + e / S, e % S, 29u));
            }
            s = reduce_sum(s);
            if (t == 0u) b1[sc + wi] = floatBitsToUint(s);
            continue;
        }
        float sum = 0.0;
        for (uint k = 0u; k < chunks; ++k) sum += mode == 1u ? ld1(0u, sc + ng * chunks + k) : ld5(0u, sc + ng * chunks + k);
        float mean = sum / float(len);
        if (mode == 1u) {
            float q = 0.0;
            if (vec) {
                for (uint e = e0 + 8u * t; e < e1; e += 2048u) q += sum8(x_v[(gx + e) >> 3], mean, true);
            } else {
                for (uint e = e0 + t; e < e1; e += 256u) {
                    float v = ld2(dx, elem_offset(n, g * cg + e / S, e % S, 29u)) - mean;
                    q += v * v;
                }
            }
            q = reduce_sum(q);
            if (t == 0u) b1[sc + NG * chunks + wi] = floatBitsToUint(q);
            continue;
        }
        float q = 0.0;
        for (uint k = 0u; k < chunks; ++k) q += ld5(0u, sc + NG * chunks + ng * chunks + k);
        float inv = 1.0 / sqrt(q / float(len) + eps);
        if (vec) {
            for (uint e = e0 + 8u * t; e < e1; e += 2048u) {
                uint ch = g * cg + e / S;
                float wv = affine != 0u ? ld3(dw, P[38] + ch * P[39]) : 1.0;
                float bv = affine != 0u ? ld4(db, P[40] + ch * P[41]) : 0.0;
                uvec4 w = x_v[(gx + e) >> 3], o;
                [[unroll]] for (uint j = 0u; j < 4u; ++j) {
                    vec2 h = (unpackHalf2x16(w[j]) - mean) * inv * wv + bv;
                    o[j] = f32_to_f16(h.x) | (f32_to_f16(h.y) << 16);
                }
                y_v[(gy + e) >> 3] = o;
            }
            continue;
        }
        for (uint e = e0 + t; e < e1; e += 256u) {
            uint ch = g * cg + e / S;
            float v = (ld2(dx, elem_offset(n, ch, e % S, 29u)) - mean) * inv;
            if (affine != 0u) v = v * ld3(dw, P[38] + ch * P[39]) + ld4(db, P[40] + ch * P[41]);
            st(dy, elem_offset(n, ch, e % S, 20u), v);
        }
    }
}
