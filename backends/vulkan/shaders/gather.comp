#version 450
// Row gather y[n, :] = table[ids[n], :]. The host has checked every id is inside 0..V.
//
// P: [0] N, [1] D, [2..5) dtypes y, table, ids, views: y@8 (offset, 2 strides), table@11 (offset, 2 strides),
// ids@14 (offset, stride).
#include "common.glsl"
layout(local_size_x = 256) in;

void main() {
    uint N = P[0], D = P[1];
    uint step = group_count() * 256u;
    for (uint e = flat_group() * 256u + gl_LocalInvocationID.x; e < N * D; e += step) {
        uint n = e / D, d = e % D;
        uint id = uint(ld3(P[4], P[14] + n * P[15]));
        st(P[2], P[8] + n * P[9] + d * P[10], ld2(P[3], P[11] + id * P[12] + d * P[13]));
    }
}
