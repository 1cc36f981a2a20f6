#version 450
// im2col for the convolution on cooperative matrices (src/conv_im2col.rs): one band of output rows of one image's
// patches as columns [pixels, K] with K ordered (kernel tap, channel), f16, zero where a tap falls in the padding.
// Each invocation writes 8 channels of one tap of one pixel as one 16-byte store; consecutive invocations take
// consecutive pixels, so the 8 reads from the NCHW input (one per channel plane) are coalesced across the
// subgroup. Needs C a multiple of 8 (the host checks).
//
// P: [0] C, [1] KW, [2] OW, [3] stride h, [4] stride w, [5] padding h, [6] padding w, [7] first output row of the
// band, [8] pixels in the band, [9] K, [10] H, [11] W, x view [12] element offset (of the image), [13] stride of
// c, [14] of h, [15] of w.
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
layout(local_size_x = 256) in;
layout(std430, set = 0, binding = 1) writeonly buffer OutV { uvec4 y_v[]; };

uint half_at(uint e) { return (b2[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }

void main() {
    uint C = P[0], KW = P[1], OW = P[2], sh = P[3], sw = P[4], ph = P[5], pw = P[6], oh0 = P[7];
    uint pixels = P[8], K = P[9], H = P[10], W = P[11];
    uint xo = P[12], sc = P[13], sxh = P[14], sxw = P[15];
    uint items = pixels * (K / 8u);
    uint step = group_count() * 256u;
    for (uint g = flat_group() * 256u + gl_LocalInvocationID.x; g < items; g += step) {
        uint p = g % pixels, kv = g / pixels;
        uint k0 = kv * 8u, tap = k0 / C, c0 = k0 % C;
        uint ih = (oh0 + p / OW) * sh + tap / KW, iw = (p % OW) * sw + tap % KW;
        uvec4 v = uvec4(0u);
        // ih, iw are offset by the padding: inside the image when ph <= ih < H + ph (likewise w).
        if (ih >= ph && ih < H + ph && iw >= pw && iw < W + pw) {
            uint e = xo + c0 * sc + (ih - ph) * sxh + (iw - pw) * sxw;
            uint w[4];
            [[unroll]] for (uint j = 0u; j < 4u; ++j) w[j] = half_at(e + 2u * j * sc) | (half_at(e + (2u * j + 1u) * sc) << 16);
            v = uvec4(w[0], w[1], w[2], w[3]);
        }
        y_v[p * (K / 8u) + kv] = v;
    }
}
