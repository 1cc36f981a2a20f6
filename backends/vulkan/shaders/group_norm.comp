#version 450
// Group norm over (C/groups, spatial...): one workgroup per (batch, group), grid-stride; two-pass statistics.
//
// P: [0] N·groups, [1] groups, [2] channels per group, [3] spatial size S, [4] spatial rank, [5..11) spatial shape,
// [11..15) dtypes y, x, weight, bias, [15] affine, [16] eps,
// views y@20, x@29 (offset, 8 strides over [N, C, spatial...]), weight@38, bias@40 (offset, stride).
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

// Offset of element e of group g of batch n in view `v`.
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
    uint total = P[0], G = P[1], cg = P[2], S = P[3];
    uint dy = P[11], dx = P[12], dw = P[13], db = P[14], affine = P[15];
    float eps = pf(16);
    uint len = cg * S;
    uint t = gl_LocalInvocationID.x;
    for (uint ng = gl_WorkGroupID.x; ng < total; ng += gl_NumWorkGroups.x) {
        uint n = ng / G, g = ng % G;
        float s = 0.0;
        for (uint e = t; e < len; e += 256u) s += ld2(dx, elem_offset(n, g * cg + e / S, e % S, 29u));
        float mean = reduce_sum(s) / float(len);
        float q = 0.0;
        for (uint e = t; e < len; e += 256u) {
            float v = ld2(dx, elem_offset(n, g * cg + e / S, e % S, 29u)) - mean;
            q += v * v;
        }
        float inv = 1.0 / sqrt(reduce_sum(q) / float(len) + eps);
        for (uint e = t; e < len; e += 256u) {
            uint c = g * cg + e / S;
            float v = (ld2(dx, elem_offset(n, c, e % S, 29u)) - mean) * inv;
            if (affine != 0u) v = v * ld3(dw, P[38] + c * P[39]) + ld4(db, P[40] + c * P[41]);
            st(dy, elem_offset(n, c, e % S, 20u), v);
        }
    }
}
