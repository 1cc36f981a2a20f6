// Fused attention on workgroup-scope cooperative matrices (VK_NV_cooperative_matrix2) for f16 q, k, v, y with head
// dims of 64: o = softmax(scale·q·kᵀ)·v, flash-style (FlashAttention-2's online softmax), the score matrix never
// written to memory. A workgroup takes BR query rows of one (batch, head) and walks the keys in tiles of BC. The
// driver splits each product among the workgroup's subgroups and stages the tensor-addressed K and V tiles through
// shared memory itself; the softmax's row maxima and sums are the extension's row reductions, and the per-row
// values (maxima, sums, corrections) are BR x RW matrices smeared along each row, resized to the scores' or the
// output's shape by row reductions, so no code depends on the fragment layout.
//
// The scores are scaled by scale·log2(e) in f32 and exponentiated with exp2. Rows of q beyond Nq load as zeros
// (clamped layouts) and are not stored; keys beyond Nk in the last tile are masked to -FLT_MAX/2 before the
// maximum (the running maximum starts there too, so no infinity ever meets a subtraction).
//
// On the H200 this takes the joint attention [2, 24, 4429, 64] to 1.43-1.45 ms (168 TFLOP/s; 124 registers) from
// the subgroup-scope shader's 2.98 ms: 128 query rows by 32 keys on 256 invocations, with the per-row values on
// BR x RW matrices (RW 16 and 32 timed alike). Measured and rejected there (docs/performance.md, "Workgroup-scope
// cooperative matrices", "The KHR form"): with the per-row values as BR x BC matrices, 64 x 32 on 128 invocations
// was best (1.69 ms, 147 registers), against key tiles of 64 (2.04), 16 (1.90) and 128 (4.9); 128 query rows with
// 256 invocations and key tiles of 64 (2.31) or 32 (2.32, in an earlier session); 96 rows (2.67); 32 rows (2.64);
// 64 invocations (6.7); row sums as a product with a matrix of ones (3.7); K/V tiles prefetched a tile ahead
// (3.39). With BR x 16 per-row values: 64 x 32 on 128 invocations 1.65 ms; 128 x 32 on 128 (1.81, 240 registers);
// 256 x 32 on 256 (2.07) or 512 (1.75); 96 x 32 (2.80); key tiles of 16 (1.89-1.97) or 64 (1.98-2.07); the maxima
// and corrections through shared memory, read by row in per-element functions (2.40); both exponentials in f16
// (1.81); q prescaled (1.75); 16-row subgroup-scope fragments reading K and V straight from memory, with no shared
// memory or barriers (6.9).
//
// Parameters: as attention.glsl ([0] B, [1] H, [2] Nq, [3] Nk, [4] Dh, [5] Dv, [9] scale, views y@20, q@25, k@30,
// v@35 as (offset, strides of b, h, n, d)). The host picks this shader only without bias, causal mask or q/k norm,
// for f16 q, k, v and y with Dh = Dv = 64, contiguous along the head dim, offsets and strides multiples of 8.
#extension GL_EXT_shader_explicit_arithmetic_types : require
#extension GL_EXT_shader_16bit_storage : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_cooperative_matrix : require
#extension GL_NV_cooperative_matrix2 : require
#extension GL_EXT_control_flow_attributes : require
#ifndef BR
#define BR 128
#endif
#ifndef BC
#define BC 32
#endif
#ifndef WG
#define WG 256
#endif
#define D 64
layout(local_size_x = WG) in;

layout(std430, set = 0, binding = 0) restrict readonly buffer Params { uint P[]; };
layout(std430, set = 0, binding = 1) writeonly buffer Y16 { float16_t y16[]; };
layout(std430, set = 0, binding = 2) readonly buffer Q16 { float16_t q16[]; };
layout(std430, set = 0, binding = 3) readonly buffer K16 { float16_t k16[]; };
layout(std430, set = 0, binding = 4) readonly buffer V16 { float16_t v16[]; };

#define SCORES coopmat<float, gl_ScopeWorkgroup, BR, BC, gl_MatrixUseAccumulator>
#define OUT coopmat<float, gl_ScopeWorkgroup, BR, D, gl_MatrixUseAccumulator>
// Columns of the per-row matrices: the N granularity of workgroup-scope matrices on 256 invocations (32 on the
// H200; 16 took the same time).
#ifndef RW
#define RW 32
#endif
#define ROWS coopmat<float, gl_ScopeWorkgroup, BR, RW, gl_MatrixUseAccumulator>
#define CLAMPED tensorLayoutNV<2, gl_CooperativeMatrixClampModeConstantNV>
const float NEG_HALF_MAX = -1.70141173e38;  // -FLT_MAX/2

float max_of(const in float x, const in float y) { return max(x, y); }
float sum_of(const in float x, const in float y) { return x + y; }
float first_of(const in float x, const in float y) { return x; }
float max_elem(const in uint32_t r, const in uint32_t c, const in float x, const in float y) { return max(x, y); }
float exp2_elem(const in uint32_t r, const in uint32_t c, const in float x) { return exp2(x); }
float mask_cols(const in uint32_t r, const in uint32_t c, const in float x, const in uint32_t valid) {
    return c < valid ? x : NEG_HALF_MAX;
}

CLAMPED rows_layout(uint rows, uint row_stride) {
    CLAMPED l = createTensorLayoutNV(2, gl_CooperativeMatrixClampModeConstantNV);
    return setTensorLayoutStrideNV(setTensorLayoutDimensionNV(l, rows, D), row_stride & ~7u, 1);
}

void main() {
    uint H = P[1], Nq = P[2], Nk = P[3];
    uint bh = gl_WorkGroupID.y, bi = bh / H, hi = bh % H;
    uint row0 = gl_WorkGroupID.x * BR;
    uint oy = P[20] + bi * P[21] + hi * P[22];
    uint oq = P[25] + bi * P[26] + hi * P[27];
    uint ok = P[30] + bi * P[31] + hi * P[32];
    uint ov = P[35] + bi * P[36] + hi * P[37];
    CLAMPED lq = rows_layout(Nq, P[28]), lk = rows_layout(Nk, P[33]), lv = rows_layout(Nk, P[38]);
    CLAMPED ly = rows_layout(Nq, P[23]);
    tensorViewNV<2, false, 1, 0> transposed = createTensorViewNV(2, false, 1, 0);

    coopmat<float16_t, gl_ScopeWorkgroup, BR, D, gl_MatrixUseA> q;
    coopMatLoadTensorNV(q, q16, oq, sliceTensorLayoutNV(lq, row0, BR, 0, D));
    float scale_log2 = uintBitsToFloat(P[9]) * 1.4426950408889634;

    OUT o = OUT(0.0);
    // m: the running row maxima, l: the running row sums, one value per row smeared over RW columns.
    ROWS m = ROWS(NEG_HALF_MAX), l = ROWS(0.0);
    for (uint j0 = 0u; j0 < Nk; j0 += BC) {
        coopmat<float16_t, gl_ScopeWorkgroup, D, BC, gl_MatrixUseB> kt;
        coopMatLoadTensorNV(kt, k16, ok, sliceTensorLayoutNV(lk, j0, BC, 0, D), transposed);
        SCORES s = coopMatMulAdd(q, kt, SCORES(0.0));
        s = s * scale_log2;
        if (j0 + BC > Nk) coopMatPerElementNV(s, s, mask_cols, Nk - j0);

        ROWS row_max, m_old = m, correction, row_sum;
        coopMatReduceNV(row_max, s, gl_CooperativeMatrixReduceRowNV, max_of);
        coopMatPerElementNV(m, row_max, max_elem, m_old);
        // The maxima resized to the scores' shape (a row reduction that keeps one element of each row).
        SCORES m_s, p;
        coopMatReduceNV(m_s, m, gl_CooperativeMatrixReduceRowNV, first_of);
        coopMatPerElementNV(p, s - m_s, exp2_elem);
        coopMatPerElementNV(correction, m_old - m, exp2_elem);
        coopMatReduceNV(row_sum, p, gl_CooperativeMatrixReduceRowNV, sum_of);
        l = correction * l + row_sum;

        coopmat<float16_t, gl_ScopeWorkgroup, BC, D, gl_MatrixUseB> vt;
        coopMatLoadTensorNV(vt, v16, ov, sliceTensorLayoutNV(lv, j0, BC, 0, D));
        // The correction resized to the output's shape (a row reduction that keeps one element of each row).
        OUT correction_o;
        coopMatReduceNV(correction_o, correction, gl_CooperativeMatrixReduceRowNV, first_of);
        o = o * correction_o;
        o = coopMatMulAdd(coopmat<float16_t, gl_ScopeWorkgroup, BR, BC, gl_MatrixUseA>(p), vt, o);
    }

    OUT inv_l;
    coopMatReduceNV(inv_l, l, gl_CooperativeMatrixReduceRowNV, first_of);
    [[unroll]] for (int i = 0; i < inv_l.length(); ++i) inv_l[i] = 1.0 / inv_l[i];
    coopmat<float16_t, gl_ScopeWorkgroup, BR, D, gl_MatrixUseAccumulator> y =
        coopmat<float16_t, gl_ScopeWorkgroup, BR, D, gl_MatrixUseAccumulator>(o * inv_l);
    coopMatStoreTensorNV(y, y16, oy, sliceTensorLayoutNV(ly, row0, BR, 0, D));
}
