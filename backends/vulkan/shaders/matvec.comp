#version 450
// y = a·b (+ bias) for a few rows of a (M <= 8, no batch) and b contiguous along K (a linear layer's transposed
// weight): adaLN modulation, time and pooled-text embeddings. Memory-bound on b: each of b's columns n is read once,
// by 8 invocations, each taking 16 bytes (8 halves) of every 128 contiguous ones, two loads in flight; a workgroup
// of 256 takes 32 columns at a time (grid-striding). Where a is f16 and vector-loadable too (P[45]) its 8 halves come
// as one load. Each invocation accumulates all M rows in f32; the 8 partial sums of a column meet in shared memory
// (3 steps). On the H200 an adaLN linear [2, 1536] -> 9216 takes 0.047 ms (600 GB/s of weights); the previous
// shader (32 invocations per column, a read half by half, 5 reduction steps over all 8 rows) took 0.13-0.33 ms.
//
// P: as matmul.comp (a@16, b@25, y@34, bias@43; dtypes [11..15), [15] has bias; [47] activation epilogue), plus
// [45] a and [46] b vector-loadable (as in matmul_coop.glsl).
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
#include "unary.glsl"
#define MAXM 8
#define LANES 8
layout(local_size_x = 256) in;

layout(std430, set = 0, binding = 2) readonly buffer In2v { uvec4 a_v[]; };
layout(std430, set = 0, binding = 3) readonly buffer In3v { uvec4 b_v[]; };

shared float red[MAXM][256];

void unpack8(uvec4 x, out float v[8]) {
    vec2 p0 = unpackHalf2x16(x.x), p1 = unpackHalf2x16(x.y), p2 = unpackHalf2x16(x.z), p3 = unpackHalf2x16(x.w);
    v[0] = p0.x; v[1] = p0.y; v[2] = p1.x; v[3] = p1.y;
    v[4] = p2.x; v[5] = p2.y; v[6] = p3.x; v[7] = p3.y;
}

void main() {
    uint M = P[0], N = P[1], K = P[2];
    uint dy = P[11], da = P[12], db = P[13], dbias = P[14];
    uint oa = P[16], sam = P[17], sak = P[18], ob = P[25], sbn = P[27], oy = P[34], sym = P[35], syn = P[36];
    bool va = P[45] != 0u, vb = P[46] != 0u;
    uint t = gl_LocalInvocationID.x, sub = t % LANES, col = t / LANES;
    for (uint n0 = flat_group() * (256u / LANES); n0 < N; n0 += group_count() * (256u / LANES)) {
        uint n = n0 + col;
        float acc[MAXM];
        [[unroll]] for (uint m = 0u; m < MAXM; ++m) acc[m] = 0.0;
        if (n < N) {
            uint base = ob + n * sbn;
            for (uint k00 = 8u * sub; k00 < K; k00 += 16u * LANES) {
                float bv[2][8];
                [[unroll]] for (uint u = 0u; u < 2u; ++u) {
                    uint k0 = k00 + 8u * LANES * u;
                    if (vb && k0 < K) {
                        unpack8(b_v[(base + k0) >> 3], bv[u]);
                    } else {
                        [[unroll]] for (uint j = 0u; j < 8u; ++j) bv[u][j] = k0 + j < K ? ld3(db, base + k0 + j) : 0.0;
                    }
                }
                [[unroll]] for (uint u = 0u; u < 2u; ++u) {
                    uint k0 = k00 + 8u * LANES * u;
                    if (k0 >= K) continue;
                    [[unroll]] for (uint m = 0u; m < MAXM; ++m) {
                        if (m >= M) continue;
                        float av[8];
                        if (va) {
                            unpack8(a_v[(oa + m * sam + k0) >> 3], av);
                        } else {
                            [[unroll]] for (uint j = 0u; j < 8u; ++j)
                                av[j] = k0 + j < K ? ld2(da, oa + m * sam + (k0 + j) * sak) : 0.0;
                        }
                        [[unroll]] for (uint j = 0u; j < 8u; ++j) acc[m] += av[j] * bv[u][j];
                    }
                }
            }
        }
        [[unroll]] for (uint m = 0u; m < MAXM; ++m) red[m][t] = acc[m];
        barrier();
        for (uint s = LANES / 2u; s > 0u; s >>= 1) {
            if (sub < s) {
                [[unroll]] for (uint m = 0u; m < MAXM; ++m)
                    if (m < M) red[m][t] += red[m][t + s];
            }
            barrier();
        }
        if (n < N && sub < M) {
            float v = red[sub][col * LANES];
            if (P[15] != 0u) v += ld4(dbias, P[43] + n * P[44]);
            if (P[47] != 0u) v = unary(P[47] - 1u, v);
            st(dy, oy + sub * sym + n * syn, v);
        }
        barrier();
    }
}
