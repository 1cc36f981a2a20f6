#version 450
// Every elementwise op over strided views: copy/cast, fill, unary, binary, affine, modulate, gated residual and
// nearest upsampling. One invocation per output element, grid-stride over the whole output; or, in pair mode
// (P[18], set by the host for f16/bf16 outputs whose rows are even-length, contiguous and start on a word), per
// two adjacent elements of a row, stored as one word instead of two atomic half-word updates.
//
//
// Vector mode (P[19], set by the host; not for upsampling): every operand f32, f16 or bf16, the last dim a multiple
// of 8 and contiguous in each, every row starting 16 bytes aligned (outer strides and offsets multiples of 8
// elements; inputs broadcast over outer dims by zero strides, as modulate's and the gated residual's [B, 1, D]
// operands), or an input broadcast along the last dim (stride 0: a per-row value, as a convolution's bias over its
// pixels), read as one element. Each invocation then takes 8 adjacent elements of a row: one 16-byte load per
// 16-bit operand (two per f32), the row's offsets from one division per outer dim, one 16-byte store.
//
// P: [0] mode, [1] sub (unary/binary function, upsample factor), [2] n, [3] rank, [4..12) output shape,
// [12..16) dtypes of y, a, b, c, [16] f0, [17] f1, [18] pair mode, [19] vector mode, views (offset + 8 strides)
// y@20, a@29, b@38, c@47.
#include "common.glsl"
#include "unary.glsl"
layout(local_size_x = 256) in;

// The output and inputs again, as 16-byte vectors (vector mode).
layout(std430, set = 0, binding = 1) writeonly buffer OutV { uvec4 y_v[]; };
layout(std430, set = 0, binding = 2) readonly buffer In2V { uvec4 a_v[]; };
layout(std430, set = 0, binding = 3) readonly buffer In3V { uvec4 b_v[]; };
layout(std430, set = 0, binding = 4) readonly buffer In4V { uvec4 c_v[]; };

float binary(uint f, float a, float b) {
    switch (f) {
        case 0u: return a + b;
        case 1u: return a - b;
        case 2u: return a * b;
        case 3u: return a / b;
        // NaN propagates like f64::max/min in the reference: the non-NaN operand wins.
        case 4u: return isnan(a) ? b : (isnan(b) ? a : max(a, b));
        default: return isnan(a) ? b : (isnan(b) ? a : min(a, b));
    }
}

// Offset in the input view of output index `lin`, with the last two dims divided by the upsample factor.
uint upsample_offset(uint lin, uint rank, uint factor) {
    uint off = P[29];
    for (int d = int(rank) - 1; d >= 0; --d) {
        uint n = P[4u + uint(d)];
        uint c = lin % n;
        lin /= n;
        if (uint(d) + 2u >= rank) c /= factor;
        off += c * P[30u + uint(d)];
    }
    return off;
}

// The op's value at output index `i` whose inputs lie at offsets oa, ob, oc (mode 7: oa already upsampled).
float value(uint mode, uint sub, uint oa, uint ob, uint oc) {
    uint da = P[13], db = P[14], dc = P[15];
    if (mode == 1u) return pf(16);
    float a = ld2(da, oa);
    if (mode == 0u || mode == 7u) return a;
    if (mode == 2u) return unary(sub, a);
    if (mode == 4u) return a * pf(16) + pf(17);
    float b = ld3(db, ob);
    if (mode == 3u) return binary(sub, a, b);
    float c = ld4(dc, oc);
    return mode == 5u ? a * (1.0 + b) + c : a + b * c;
}

// Elements e..e+7 (e a multiple of 8) of an f32 (dt 0), f16 (1) or bf16 (2) operand as f32.
#define DEFINE_LOAD8(NAME, BUFV)                                                                               \
    void NAME(uint dt, uint e, out vec4 lo, out vec4 hi) {                                                     \
        if (dt == 0u) {                                                                                        \
            lo = uintBitsToFloat(BUFV[e >> 2]);                                                                \
            hi = uintBitsToFloat(BUFV[(e >> 2) + 1u]);                                                         \
            return;                                                                                            \
        }                                                                                                      \
        uvec4 w = BUFV[e >> 3];                                                                                \
        if (dt == 1u) {                                                                                        \
            lo = vec4(unpackHalf2x16(w.x), unpackHalf2x16(w.y));                                               \
            hi = vec4(unpackHalf2x16(w.z), unpackHalf2x16(w.w));                                               \
        } else {                                                                                               \
            uvec4 l = w << 16, h = w & 0xffff0000u;                                                            \
            lo = uintBitsToFloat(uvec4(l.x, h.x, l.y, h.y));                                                   \
            hi = uintBitsToFloat(uvec4(l.z, h.z, l.w, h.w));                                                   \
        }                                                                                                      \
    }
DEFINE_LOAD8(load8_a, a_v)
DEFINE_LOAD8(load8_b, b_v)
DEFINE_LOAD8(load8_c, c_v)

uint pack16(uint dt, float v0, float v1) { return to16(dt, v0) | (to16(dt, v1) << 16); }

// Elements e..e+7 of the output.
void store8(uint dt, uint e, vec4 lo, vec4 hi) {
    if (dt == 0u) {
        y_v[e >> 2] = floatBitsToUint(lo);
        y_v[(e >> 2) + 1u] = floatBitsToUint(hi);
        return;
    }
    y_v[e >> 3] = uvec4(pack16(dt, lo.x, lo.y), pack16(dt, lo.z, lo.w), pack16(dt, hi.x, hi.y), pack16(dt, hi.z, hi.w));
}

// `value` on four elements (modes 0..6).
vec4 value4(uint mode, uint sub, vec4 a, vec4 b, vec4 c) {
    if (mode == 1u) return vec4(pf(16));
    if (mode == 0u) return a;
    if (mode == 4u) return a * pf(16) + pf(17);
    if (mode == 5u) return a * (1.0 + b) + c;
    if (mode == 6u) return a + b * c;
    vec4 r;
    for (int j = 0; j < 4; ++j) r[j] = mode == 2u ? unary(sub, a[j]) : binary(sub, a[j], b[j]);
    return r;
}

void vector_mode(uint mode, uint sub, uint n, uint rank, uint first, uint step) {
    uint dy = P[12], da = P[13], db = P[14], dc = P[15];
    uint last = rank - 1u, vpr = P[4u + last] / 8u;
    // An input's stride along the last dim: 1, or 0 where it is broadcast along the rows (a per-row value, as a
    // convolution's bias over the pixels): one element then stands for all 8.
    uint la = P[30u + last], lb = P[39u + last], lc = P[48u + last];
    for (uint j = first; j < n / 8u; j += step) {
        uint c = 8u * (j % vpr), row = j / vpr;
        uint oy = P[20] + c, oa = P[29] + c * la, ob = P[38] + c * lb, oc = P[47] + c * lc;
        for (uint d = last; d-- > 0u;) {
            uint nd = P[4u + d], i = row % nd;
            row /= nd;
            oy += i * P[21u + d];
            oa += i * P[30u + d];
            ob += i * P[39u + d];
            oc += i * P[48u + d];
        }
        if (mode == 0u && da == dy && la == 1u) {
            // Same-dtype copy: the bits as they are.
            if (dy == 0u) {
                y_v[oy >> 2] = a_v[oa >> 2];
                y_v[(oy >> 2) + 1u] = a_v[(oa >> 2) + 1u];
            } else {
                y_v[oy >> 3] = a_v[oa >> 3];
            }
            continue;
        }
        vec4 alo = vec4(0.0), ahi = vec4(0.0), blo = vec4(0.0), bhi = vec4(0.0), clo = vec4(0.0), chi = vec4(0.0);
        if (mode != 1u) {
            if (la == 0u) alo = ahi = vec4(ld2(da, oa));
            else load8_a(da, oa, alo, ahi);
        }
        if (mode == 3u || mode == 5u || mode == 6u) {
            if (lb == 0u) blo = bhi = vec4(ld3(db, ob));
            else load8_b(db, ob, blo, bhi);
        }
        if (mode == 5u || mode == 6u) {
            if (lc == 0u) clo = chi = vec4(ld4(dc, oc));
            else load8_c(dc, oc, clo, chi);
        }
        store8(dy, oy, value4(mode, sub, alo, blo, clo), value4(mode, sub, ahi, bhi, chi));
    }
}

uint raw16(uint e) { return (b2[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }

void main() {
    uint mode = P[0], sub = P[1], n = P[2], rank = P[3];
    uint dy = P[12], da = P[13];
    uint first = flat_group() * 256u + gl_LocalInvocationID.x, step = group_count() * 256u;
    if (P[19] != 0u) {
        vector_mode(mode, sub, n, rank, first, step);
        return;
    }
    if (P[18] != 0u) {
        // Pairs (i, i+1) of one row: the inputs of i+1 are one last-dim stride further (mode 7: recomputed).
        uint last = rank - 1u;
        for (uint j = first; j < n / 2u; j += step) {
            uint i = 2u * j;
            uint oy = view_offset(i, rank, 4u, 20u);
            uint oa = view_offset(i, rank, 4u, 29u), ob = view_offset(i, rank, 4u, 38u), oc = view_offset(i, rank, 4u, 47u);
            uint sa = P[30u + last], sb = P[39u + last], sc = P[48u + last];
            if (mode == 0u && da == dy) {
                b1[oy >> 1] = raw16(oa) | (raw16(oa + sa) << 16);
            } else if (mode == 7u) {
                st2(dy, oy, ld2(da, upsample_offset(i, rank, sub)), ld2(da, upsample_offset(i + 1u, rank, sub)));
            } else {
                st2(dy, oy, value(mode, sub, oa, ob, oc), value(mode, sub, oa + sa, ob + sb, oc + sc));
            }
        }
        return;
    }
    for (uint i = first; i < n; i += step) {
        uint oy = view_offset(i, rank, 4u, 20u);
        if (mode == 0u && da == dy) {
            copy_raw(dy, view_offset(i, rank, 4u, 29u), oy);
            continue;
        }
        uint oa = mode == 7u ? upsample_offset(i, rank, sub) : (mode == 1u ? 0u : view_offset(i, rank, 4u, 29u));
        uint ob = mode == 3u || mode == 5u || mode == 6u ? view_offset(i, rank, 4u, 38u) : 0u;
        uint oc = mode == 5u || mode == 6u ? view_offset(i, rank, 4u, 47u) : 0u;
        st(dy, oy, value(mode, sub, oa, ob, oc));
    }
}
