#version 450
// im2col for the convolution on cooperative matrices (src/conv_im2col.rs): one band of output rows of one image's
// patches as columns [pixels, K] with K ordered (kernel tap, channel), f16, zero where a tap falls in the padding.
// A workgroup takes 32 pixels × 64 channels of one tap through shared memory: it reads them from the NCHW input
// with each subgroup on 32 consecutive pixels of a few channel planes (coalesced), and writes them with each pixel's
// 64 channels as 128 contiguous bytes of its column row (whole 32-byte sectors). Needs C a multiple of 8 (checked
// by the host); channels past C in the last chunk are not written.
//
// P: [0] C, [1] KW, [2] OW, [3] stride h, [4] stride w, [5] padding h, [6] padding w, [7] first output row of the
// band, [8] pixels in the band, [9] K, [10] H, [11] W, x view [12] element offset (of the image), [13] stride of
// c, [14] of h, [15] of w. Workgroups: x = pixel tiles of 32, y = taps, z = chunks of 64 channels.
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
layout(local_size_x = 256) in;
layout(std430, set = 0, binding = 1) writeonly buffer OutV { uvec4 y_v[]; };

// 32 pixels × 32 channel pairs (one word each), rows padded by a word.
shared uint tile[32][33];

uint half_at(uint e) { return (b2[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }

void main() {
    uint C = P[0], KW = P[1], OW = P[2], sh = P[3], sw = P[4], ph = P[5], pw = P[6], oh0 = P[7];
    uint pixels = P[8], K = P[9], H = P[10], W = P[11];
    uint xo = P[12], sc = P[13], sxh = P[14], sxw = P[15];
    uint t = gl_LocalInvocationID.x;
    uint p0 = gl_WorkGroupID.x * 32u, tap = gl_WorkGroupID.y, c0 = gl_WorkGroupID.z * 64u;
    uint i = tap / KW, j = tap % KW;
    // Read: 4 consecutive pixels (t % 8) of one channel pair (t / 8).
    uint pair = t / 8u, pq = 4u * (t % 8u);
    uint c = c0 + 2u * pair;
    [[unroll]] for (uint q = 0u; q < 4u; ++q) {
        uint p = p0 + pq + q;
        uint word = 0u;
        if (p < pixels && c < C) {
            uint ih = (oh0 + p / OW) * sh + i, iw = (p % OW) * sw + j;
            // ih, iw are offset by the padding: inside the image when ph <= ih < H + ph (likewise w).
            if (ih >= ph && ih < H + ph && iw >= pw && iw < W + pw) {
                uint e = xo + c * sc + (ih - ph) * sxh + (iw - pw) * sxw;
                word = half_at(e) | (half_at(e + sc) << 16);
            }
        }
        tile[pq + q][pair] = word;
    }
    barrier();
    // Write: 8 channels (t % 8) of one pixel (t / 8).
    uint p = t / 8u, v = t % 8u;
    if (p0 + p < pixels && c0 + 8u * v < C) {
        uvec4 w = uvec4(tile[p][4u * v], tile[p][4u * v + 1u], tile[p][4u * v + 2u], tile[p][4u * v + 3u]);
        y_v[((p0 + p) * K + tap * C + c0 + 8u * v) >> 3] = w;
    }
}
