#version 450
// y = a·b (+ bias) for a few rows of a (M <= 8, no batch) and b contiguous along K (a linear layer's transposed
// weight): adaLN modulation, time and pooled-text embeddings. Memory-bound on b, so each of b's columns n is read
// once, by 32 invocations striding over K (8 halves at a time, one 128-bit load where b is f16 and 16-byte
// aligned: P[46]), all M rows accumulated in f32 and reduced in shared memory. 256 invocations = 8 columns per
// workgroup; workgroups grid-stride over the columns.
//
// P: as matmul.comp (a@16, b@25, y@34, bias@43; dtypes [11..15), [15] has bias; [47] activation epilogue), plus
// [46] b is vector-loadable (as in matmul_coop.glsl).
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
#include "unary.glsl"
#define MAXM 8
layout(local_size_x = 256) in;

layout(std430, set = 0, binding = 3) readonly buffer In3v { uvec4 b_v[]; };

shared float red[MAXM][256];

void main() {
    uint M = P[0], N = P[1], K = P[2];
    uint dy = P[11], da = P[12], db = P[13], dbias = P[14];
    uint oa = P[16], sam = P[17], sak = P[18], ob = P[25], sbn = P[27], oy = P[34], sym = P[35], syn = P[36];
    bool vec = P[46] != 0u;
    uint t = gl_LocalInvocationID.x, lane = t % 32u, col = t / 32u;
    for (uint n0 = flat_group() * 8u; n0 < N; n0 += group_count() * 8u) {
        uint n = n0 + col;
        float acc[MAXM];
        [[unroll]] for (uint m = 0u; m < MAXM; ++m) acc[m] = 0.0;
        if (n < N) {
            uint base = ob + n * sbn;
            for (uint k0 = 8u * lane; k0 < K; k0 += 256u) {
                float bv[8];
                if (vec) {
                    uvec4 x = b_v[(base + k0) >> 3];
                    vec2 p0 = unpackHalf2x16(x.x), p1 = unpackHalf2x16(x.y), p2 = unpackHalf2x16(x.z), p3 = unpackHalf2x16(x.w);
                    bv[0] = p0.x; bv[1] = p0.y; bv[2] = p1.x; bv[3] = p1.y;
                    bv[4] = p2.x; bv[5] = p2.y; bv[6] = p3.x; bv[7] = p3.y;
                } else {
                    [[unroll]] for (uint j = 0u; j < 8u; ++j) bv[j] = k0 + j < K ? ld3(db, base + k0 + j) : 0.0;
                }
                [[unroll]] for (uint m = 0u; m < MAXM; ++m) {
                    if (m < M) {
                        [[unroll]] for (uint j = 0u; j < 8u; ++j)
                            if (k0 + j < K) acc[m] += ld2(da, oa + m * sam + (k0 + j) * sak) * bv[j];
                    }
                }
            }
        }
        [[unroll]] for (uint m = 0u; m < MAXM; ++m) red[m][t] = acc[m];
        barrier();
        for (uint s = 16u; s > 0u; s >>= 1) {
            if (lane < s) {
                [[unroll]] for (uint m = 0u; m < MAXM; ++m) red[m][t] += red[m][t + s];
            }
            barrier();
        }
        if (n < N && lane < M) {
            float v = red[lane][col * 32u];
            if (P[15] != 0u) v += ld4(dbias, P[43] + n * P[44]);
            if (P[47] != 0u) v = unary(P[47] - 1u, v);
            st(dy, oy + lane * sym + n * syn, v);
        }
        barrier();
    }
}
