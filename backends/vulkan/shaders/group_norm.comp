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
// (offset, stride), [42] scratch offset.
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
    for (uint wi = flat_group(); wi < NG * chunks; wi += group_count()) {
        uint ng = wi / chunks, c = wi % chunks, n = ng / G, g = ng % G;
        uint e0 = c * clen, e1 = min(len, e0 + clen);
        if (mode == 0u) {
            float s = 0.0;
            for (uint e = e0 + t; e < e1; e += 256u) s += ld2(dx, elem_offset(n, g * cg + e / S, e % S, 29u));
            s = reduce_sum(s);
            if (t == 0u) b1[sc + wi] = floatBitsToUint(s);
            continue;
        }
        float sum = 0.0;
        for (uint k = 0u; k < chunks; ++k) sum += mode == 1u ? ld1(0u, sc + ng * chunks + k) : ld5(0u, sc + ng * chunks + k);
        float mean = sum / float(len);
        if (mode == 1u) {
            float q = 0.0;
            for (uint e = e0 + t; e < e1; e += 256u) {
                float v = ld2(dx, elem_offset(n, g * cg + e / S, e % S, 29u)) - mean;
                q += v * v;
            }
            q = reduce_sum(q);
            if (t == 0u) b1[sc + NG * chunks + wi] = floatBitsToUint(q);
            continue;
        }
        float q = 0.0;
        for (uint k = 0u; k < chunks; ++k) q += ld5(0u, sc + NG * chunks + ng * chunks + k);
        float inv = 1.0 / sqrt(q / float(len) + eps);
        for (uint e = e0 + t; e < e1; e += 256u) {
            uint ch = g * cg + e / S;
            float v = (ld2(dx, elem_offset(n, ch, e % S, 29u)) - mean) * inv;
            if (affine != 0u) v = v * ld3(dw, P[38] + ch * P[39]) + ld4(db, P[40] + ch * P[41]);
            st(dy, elem_offset(n, ch, e % S, 20u), v);
        }
    }
}
