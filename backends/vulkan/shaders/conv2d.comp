#version 450
// Direct 2-D convolution (NCHW, OIHW, dilation 1, groups 1): one invocation per output element, grid-stride.
//
// P: [0] N, [1] C, [2] H, [3] W, [4] O, [5] KH, [6] KW, [7] OH, [8] OW, [9] stride y, [10] stride x,
// [11] pad y, [12] pad x, [13] has bias, [14..18) dtypes y, x, w, bias,
// views (offset + 4 strides): y@20, x@25, w@30; bias@35 (offset, stride).
#include "common.glsl"
layout(local_size_x = 256) in;

void main() {
    uint C = P[1], H = P[2], W = P[3], O = P[4], KH = P[5], KW = P[6], OH = P[7], OW = P[8];
    uint dy = P[14], dx = P[15], dw = P[16], db = P[17];
    uint total = P[0] * O * OH * OW;
    uint step = group_count() * 256u;
    for (uint e = flat_group() * 256u + gl_LocalInvocationID.x; e < total; e += step) {
        uint ox = e % OW, oy = (e / OW) % OH, o = (e / (OW * OH)) % O, n = e / (OW * OH * O);
        float acc = P[13] != 0u ? ld4(db, P[35] + o * P[36]) : 0.0;
        int iy0 = int(oy * P[9]) - int(P[11]);
        int ix0 = int(ox * P[10]) - int(P[12]);
        for (uint c = 0u; c < C; ++c) {
            uint xb = P[25] + n * P[26] + c * P[27];
            uint wb = P[30] + o * P[31] + c * P[32];
            for (uint ky = 0u; ky < KH; ++ky) {
                int iy = iy0 + int(ky);
                if (iy < 0 || iy >= int(H)) continue;
                for (uint kx = 0u; kx < KW; ++kx) {
                    int ix = ix0 + int(kx);
                    if (ix < 0 || ix >= int(W)) continue;
                    acc += ld2(dx, xb + uint(iy) * P[28] + uint(ix) * P[29]) * ld3(dw, wb + ky * P[33] + kx * P[34]);
                }
            }
        }
        st(dy, P[20] + n * P[21] + o * P[22] + oy * P[23] + ox * P[24], acc);
    }
}
