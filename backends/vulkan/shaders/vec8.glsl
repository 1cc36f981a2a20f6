// 16-bit element loads shared by the cooperative-matrix shaders (matmul_coop.glsl, attention_coop.glsl), whose f16
// operands are bound as arrays of 32-bit words (common.glsl) and again as 16-byte vectors.

// NAME(e): the 16 bits of element e of binding BUF.
#define DEFINE_HALF(NAME, BUF) \
    uint NAME(uint e) { return (BUF[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }

// NAME(vec, base, r, c, sr, sc, rows, cols): halves c..c+7 of row r of a [rows x cols] f16 block whose element
// (r, c) lies at base + r*sr + c*sc, as one vector, zero outside the block. `vec` (uniform): unit sc, and base, sr
// and cols multiples of 8, so one aligned 128-bit load from BUFV; else half by half through H. CLAMP (a constant,
// 1 only where the host guarantees whole vectors inside the columns): rows past the block read its last row.
#define DEFINE_VEC8(NAME, BUFV, H, CLAMP)                                                                    \
    uvec4 NAME(bool vec, uint base, uint r, uint c, uint sr, uint sc, uint rows, uint cols) {               \
        uint e = base + r * sr + c * sc;                                                                   \
        if (CLAMP != 0) return BUFV[(base + min(r, rows - 1u) * sr + c) >> 3];                             \
        if (r >= rows || c >= cols) return uvec4(0u);                                                      \
        if (vec) return BUFV[e >> 3];                                                                      \
        uint w[4];                                                                                         \
        [[unroll]] for (uint j = 0u; j < 4u; ++j) {                                                        \
            uint lo = c + 2u * j < cols ? H(e + 2u * j * sc) : 0u;                                         \
            uint hi = c + 2u * j + 1u < cols ? H(e + (2u * j + 1u) * sc) : 0u;                             \
            w[j] = lo | (hi << 16);                                                                        \
        }                                                                                                  \
        return uvec4(w[0], w[1], w[2], w[3]);                                                              \
    }
