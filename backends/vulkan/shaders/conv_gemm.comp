#version 450
// 2-D convolution (NCHW, OIHW, dilation 1, groups 1) as an implicit GEMM: per image n (workgroup z), the output
// [O, OH·OW] is the product of the weights [O, C·KH·KW] and the input's patches [C·KH·KW, OH·OW], gathered on the
// fly (zero outside the image) instead of materialised. Tiled like matmul.comp: a 256-invocation workgroup
// computes a 64x64 tile, 4x4 outputs per invocation, stepping K by 16 through shared memory, f32 accumulation.
//
// P: as conv2d.comp ([0] N, [1] C, [2] H, [3] W, [4] O, [5] KH, [6] KW, [7] OH, [8] OW, [9] stride y,
// [10] stride x, [11] pad y, [12] pad x, [13] has bias, [14..18) dtypes y, x, w, bias, views y@20, x@25, w@30,
// bias@35), plus [18] the weights are contiguous per output channel (element k of row o at o·P[31] + k).
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
layout(local_size_x = 256) in;

shared float As[16][64];
shared float Bs[16][64];

void main() {
    uint C = P[1], H = P[2], W = P[3], O = P[4], KH = P[5], KW = P[6], OH = P[7], OW = P[8];
    uint dy = P[14], dx = P[15], dw = P[16], db = P[17];
    bool w_flat = P[18] != 0u;
    uint KK = KH * KW, K = C * KK, NP = OH * OW;
    uint n = gl_WorkGroupID.z;
    uint row0 = gl_WorkGroupID.y * 64u, col0 = gl_WorkGroupID.x * 64u;
    uint t = gl_LocalInvocationID.x;
    uint tx = t % 16u, ty = t / 16u;
    // This invocation always loads tile column t % 64: output channel row0 + t % 64 of the weights, and output
    // pixel col0 + t % 64 of the patches (its top-left input coordinate precomputed).
    uint lo = row0 + t % 64u, lp = col0 + t % 64u;
    int iy0 = int((lp / OW) * P[9]) - int(P[11]);
    int ix0 = int((lp % OW) * P[10]) - int(P[12]);
    uint xb = P[25] + n * P[26];
    float acc[4][4];
    [[unroll]] for (int i = 0; i < 4; ++i)
        [[unroll]] for (int j = 0; j < 4; ++j) acc[i][j] = 0.0;
    for (uint k0 = 0u; k0 < K; k0 += 16u) {
        [[unroll]] for (uint i = 0u; i < 4u; ++i) {
            uint kk = t / 64u + 4u * i, k = k0 + kk;
            uint c = k / KK, r = k % KK, ky = r / KW, kx = r % KW;
            float a = 0.0;
            if (lo < O && k < K) {
                a = ld3(dw, w_flat ? P[30] + lo * P[31] + k : P[30] + lo * P[31] + c * P[32] + ky * P[33] + kx * P[34]);
            }
            As[kk][t % 64u] = a;
            float b = 0.0;
            int iy = iy0 + int(ky), ix = ix0 + int(kx);
            if (lp < NP && k < K && iy >= 0 && iy < int(H) && ix >= 0 && ix < int(W)) {
                b = ld2(dx, xb + c * P[27] + uint(iy) * P[28] + uint(ix) * P[29]);
            }
            Bs[kk][t % 64u] = b;
        }
        barrier();
        // Unrolled: also keeps lavapipe (Mesa < 23) under its 65535 loop iterations per invocation.
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
        uint o = row0 + ty + 16u * i;
        if (o >= O) continue;
        float bias = P[13] != 0u ? ld4(db, P[35] + o * P[36]) : 0.0;
        for (uint j = 0u; j < 4u; ++j) {
            uint p = col0 + tx + 16u * j;
            if (p >= NP) continue;
            st(dy, P[20] + n * P[21] + o * P[22] + (p / OW) * P[23] + (p % OW) * P[24], acc[i][j] + bias);
        }
    }
}
