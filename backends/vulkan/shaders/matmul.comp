#version 450
// Batched matmul y = a·b (+ bias) with f32 accumulation, tiled in shared memory: a 256-invocation workgroup
// computes a 64x64 tile of y, each invocation 4x4 outputs, stepping K by 16. Any strides (row- or column-major
// a and b, broadcast batch dims). Workgroup (x, y, z) = (column tile, row tile, batch).
//
// P: [0] M, [1] N, [2] K, [3] batch count, [4] batch rank, [5..11) batch shape, [11..15) dtypes y, a, b, bias,
// [15] has bias, views (offset, two matrix strides, 6 batch strides): a@16 (s_m, s_k), b@25 (s_k, s_n),
// y@34 (s_m, s_n); bias@43 (offset, stride); [47] activation epilogue: 0 none, else the UnaryOp id + 1.
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
#include "unary.glsl"
layout(local_size_x = 256) in;

shared float As[16][64];
shared float Bs[16][64];

uint batch_offset(uint bi, uint v) {
    uint off = P[v];
    for (int d = int(P[4]) - 1; d >= 0; --d) {
        uint n = P[5u + uint(d)];
        off += (bi % n) * P[v + 3u + uint(d)];
        bi /= n;
    }
    return off;
}

void main() {
    uint M = P[0], N = P[1], K = P[2];
    uint dy = P[11], da = P[12], db = P[13], dbias = P[14];
    uint bi = gl_WorkGroupID.z;
    uint oa = batch_offset(bi, 16u), ob = batch_offset(bi, 25u), oy = batch_offset(bi, 34u);
    uint sam = P[17], sak = P[18], sbk = P[26], sbn = P[27], sym = P[35], syn = P[36];
    uint row0 = gl_WorkGroupID.y * 64u, col0 = gl_WorkGroupID.x * 64u;
    uint t = gl_LocalInvocationID.x;
    uint tx = t % 16u, ty = t / 16u;
    float acc[4][4];
    [[unroll]] for (int i = 0; i < 4; ++i)
        [[unroll]] for (int j = 0; j < 4; ++j) acc[i][j] = 0.0;
    for (uint k0 = 0u; k0 < K; k0 += 16u) {
        // 1024 elements per tile, 4 per invocation.
        for (uint e = t; e < 1024u; e += 256u) {
            uint kk = e / 64u, mm = e % 64u;
            uint r = row0 + mm, k = k0 + kk;
            As[kk][mm] = (r < M && k < K) ? ld2(da, oa + r * sam + k * sak) : 0.0;
            uint c = col0 + mm;
            Bs[kk][mm] = (c < N && k < K) ? ld3(db, ob + k * sbk + c * sbn) : 0.0;
        }
        barrier();
        // Unrolled: also keeps lavapipe (Mesa < 23) under its 65535 loop iterations per invocation for long K.
        [[unroll]] for (uint kk = 0u; kk < 16u; ++kk) {
            float av[4], bv[4];
            [[unroll]] for (uint i = 0u; i < 4u; ++i) av[i] = As[kk][ty + 16u * i];
            [[unroll]] for (uint j = 0u; j < 4u; ++j) bv[j] = Bs[kk][tx + 16u * j];
            [[unroll]] for (uint i = 0u; i < 4u; ++i)
                [[unroll]] for (uint j = 0u; j < 4u; ++j) acc[i][j] += av[i] * bv[j];
        }
        barrier();
    }
    for (uint i = 0u; i < 4u; ++i) {
        uint r = row0 + ty + 16u * i;
        if (r >= M) continue;
        for (uint j = 0u; j < 4u; ++j) {
            uint c = col0 + tx + 16u * j;
            if (c >= N) continue;
            float v = acc[i][j];
            if (P[15] != 0u) v += ld4(dbias, P[43] + c * P[44]);
            if (P[47] != 0u) v = unary(P[47] - 1u, v);
            st(dy, oy + r * sym + c * syn, v);
        }
    }
}
