// Shared by every shader: the bindings, element loads/stores for every storage dtype, and strided indexing.
//
// Binding 0 holds the dispatch's parameters as 32-bit words (`P`); binding 1 is the output, bindings 2..7 the
// inputs in the op's input order. Tensors are bound as arrays of 32-bit words so that f16/bf16 (two per word)
// need no 16-bit storage feature: they are converted to f32 on load and rounded to nearest-even on store.
// Dtype codes are the core's DType ids: 0 f32, 1 f16, 2 bf16, 3 i32, 4 i64 (two words), 5 u8 (four per word).

// `restrict`: the parameter ring is never bound as an output, so loads of P can be hoisted past output stores.
layout(std430, set = 0, binding = 0) restrict readonly buffer Params { uint P[]; };
layout(std430, set = 0, binding = 1) buffer Out { uint b1[]; };
layout(std430, set = 0, binding = 2) readonly buffer In2 { uint b2[]; };
layout(std430, set = 0, binding = 3) readonly buffer In3 { uint b3[]; };
layout(std430, set = 0, binding = 4) readonly buffer In4 { uint b4[]; };
layout(std430, set = 0, binding = 5) readonly buffer In5 { uint b5[]; };
layout(std430, set = 0, binding = 6) readonly buffer In6 { uint b6[]; };
layout(std430, set = 0, binding = 7) readonly buffer In7 { uint b7[]; };

float pf(uint i) { return uintBitsToFloat(P[i]); }

// An i64 (low word, high word) as f32: exact to 2^24, like the reference's conversion.
float i64_to_f32(uint lo, uint hi) {
    if ((hi == 0u && lo < 0x80000000u) || (hi == 0xffffffffu && lo >= 0x80000000u)) return float(int(lo));
    return float(int(hi)) * 4294967296.0 + float(lo);
}

#define DEFINE_LOAD(NAME, BUF)                                                                 \
    float NAME(uint dt, uint i) {                                                              \
        if (dt == 0u) return uintBitsToFloat(BUF[i]);                                          \
        if (dt == 1u) return unpackHalf2x16((BUF[i >> 1] >> ((i & 1u) * 16u)) & 0xffffu).x;    \
        if (dt == 2u) return uintBitsToFloat(((BUF[i >> 1] >> ((i & 1u) * 16u)) & 0xffffu) << 16); \
        if (dt == 3u) return float(int(BUF[i]));                                               \
        if (dt == 5u) return float((BUF[i >> 2] >> ((i & 3u) * 8u)) & 0xffu);                  \
        return i64_to_f32(BUF[2u * i], BUF[2u * i + 1u]);                                      \
    }

DEFINE_LOAD(ld1, b1)
DEFINE_LOAD(ld2, b2)
DEFINE_LOAD(ld3, b3)
DEFINE_LOAD(ld4, b4)
DEFINE_LOAD(ld5, b5)
DEFINE_LOAD(ld6, b6)
DEFINE_LOAD(ld7, b7)

// f32 -> f16 bits, round to nearest even (GLSL leaves packHalf2x16's rounding to the implementation).
uint f32_to_f16(float f) {
    uint x = floatBitsToUint(f);
    uint sign = (x >> 16) & 0x8000u;
    uint ex = (x >> 23) & 0xffu;
    uint man = x & 0x7fffffu;
    if (ex == 0xffu) return sign | 0x7c00u | (man != 0u ? 0x200u : 0u);
    int e = int(ex) - 112;
    if (e >= 31) return sign | 0x7c00u;
    if (e <= 0) {
        if (e < -10) return sign;
        man |= 0x800000u;
        uint shift = uint(14 - e);
        uint h = man >> shift;
        uint rem = man & ((1u << shift) - 1u);
        uint halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (h & 1u) != 0u)) h++;
        return sign | h;
    }
    uint h = sign | (uint(e) << 10) | (man >> 13);
    uint rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u) != 0u)) h++;
    return h;
}

uint f32_to_bf16(float f) {
    uint x = floatBitsToUint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (x >> 16) | 0x40u;
    return (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
}

// Rust's `as i32`: saturating, NaN -> 0.
int f32_to_i32(float v) {
    if (isnan(v)) return 0;
    if (v >= 2147483647.0) return 2147483647;
    if (v <= -2147483648.0) return -2147483647 - 1;
    return int(v);
}

// Rust's `as u8`: saturating, NaN -> 0.
uint f32_to_u8(float v) {
    if (isnan(v) || v <= 0.0) return 0u;
    return v >= 255.0 ? 255u : uint(v);
}

// Write the sub-word `bits` (width `mask`) at bit `sh` of word `w` of the output, atomically: other invocations
// may own the rest of the word.
void st_part(uint w, uint sh, uint mask, uint bits) {
    atomicAnd(b1[w], ~(mask << sh));
    atomicOr(b1[w], (bits & mask) << sh);
}

void st(uint dt, uint i, float v) {
    if (dt == 0u) { b1[i] = floatBitsToUint(v); return; }
    if (dt == 3u) { b1[i] = uint(f32_to_i32(v)); return; }
    if (dt == 5u) { st_part(i >> 2, (i & 3u) * 8u, 0xffu, f32_to_u8(v)); return; }
    if (dt == 4u) {
        // Rust's `as i64`: truncate, saturate, NaN -> 0.
        if (v >= 9223372036854775808.0) { b1[2u * i] = 0xffffffffu; b1[2u * i + 1u] = 0x7fffffffu; return; }
        float t = isnan(v) ? 0.0 : trunc(max(v, -9223372036854775808.0));
        if (abs(t) < 2147483648.0) {
            b1[2u * i] = uint(int(t));
            b1[2u * i + 1u] = t < 0.0 ? 0xffffffffu : 0u;
            return;
        }
        // |t| >= 2^31 has at most 24 significant bits, all at or above bit 8: split |t| exactly, then negate.
        float a = abs(t);
        float hi = floor(a / 4294967296.0);
        uint lo_u = uint(a - hi * 4294967296.0), hi_u = uint(hi);
        if (t < 0.0) {
            lo_u = ~lo_u + 1u;
            hi_u = ~hi_u + (lo_u == 0u ? 1u : 0u);
        }
        b1[2u * i] = lo_u;
        b1[2u * i + 1u] = hi_u;
        return;
    }
    uint h = dt == 1u ? f32_to_f16(v) : f32_to_bf16(v);
    st_part(i >> 1, (i & 1u) * 16u, 0xffffu, h);
}

// f32 -> the 16 bits of an f16 (dt 1) or bf16 (dt 2).
uint to16(uint dt, float v) { return dt == 1u ? f32_to_f16(v) : f32_to_bf16(v); }

// Elements i and i+1 (i even: one word) of a 16-bit output in one plain store, where the invocation owns the word.
void st2(uint dt, uint i, float v0, float v1) { b1[i >> 1] = to16(dt, v0) | (to16(dt, v1) << 16); }

// Bit-exact copy of element `src` of binding 2 to element `dst` of the output, both of dtype `dt`.
void copy_raw(uint dt, uint src, uint dst) {
    if (dt == 0u || dt == 3u) { b1[dst] = b2[src]; return; }
    if (dt == 4u) { b1[2u * dst] = b2[2u * src]; b1[2u * dst + 1u] = b2[2u * src + 1u]; return; }
    if (dt == 5u) { st_part(dst >> 2, (dst & 3u) * 8u, 0xffu, b2[src >> 2] >> ((src & 3u) * 8u)); return; }
    st_part(dst >> 1, (dst & 1u) * 16u, 0xffffu, b2[src >> 1] >> ((src & 1u) * 16u));
}

// Element offset of logical row-major index `lin` of a view: shape at P[shape_at..], rank `rank`,
// the view's offset at P[view_at] and its strides at P[view_at + 1 ..].
uint view_offset(uint lin, uint rank, uint shape_at, uint view_at) {
    // Rank 1 (the host merges the dims of contiguous operands): no division.
    if (rank == 1u) return P[view_at] + lin * P[view_at + 1u];
    uint off = P[view_at];
    for (int d = int(rank) - 1; d >= 0; --d) {
        uint n = P[shape_at + uint(d)];
        off += (lin % n) * P[view_at + 1u + uint(d)];
        lin /= n;
    }
    return off;
}

// Grid-stride kernels are launched on a 2-D grid of workgroups (x at most 65535), so that each invocation handles
// about one item: the flat workgroup index, and the number of workgroups launched.
uint flat_group() { return gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; }
uint group_count() { return gl_NumWorkGroups.x * gl_NumWorkGroups.y; }

// Row ops (rows.comp, rows_vec8.comp): the offset of row `row` in the view at P[view_at] (offset, then the strides
// of the outer dims), the outer shape (orank dims) at P[5..].
uint row_base(uint row, uint orank, uint view_at) {
    uint off = P[view_at];
    for (int d = int(orank) - 1; d >= 0; --d) {
        uint n = P[5u + uint(d)];
        off += (row % n) * P[view_at + 1u + uint(d)];
        row /= n;
    }
    return off;
}
