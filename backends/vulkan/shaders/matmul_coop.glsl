// Batched matmul y = a·b (+ bias) on cooperative matrices (VK_NV_cooperative_matrix: tensor cores on NVIDIA):
// f16 a and b, f32 accumulation. A 256-invocation workgroup (8 subgroups of 32, 2 x 4) computes a 128 x 128 tile of
// y, each subgroup a 64 x 32 block of FM x FN fragments (FM, FN, FK set by the including shader to a shape the
// device lists), stepping K by BK. Operands go through shared memory as 16-byte vectors of 8 halves (the fragment
// loads then read whole vectors; offsets and strides are in vectors): a row-major (As[m][k]), b column-major
// (Bs[n][k]), rows padded by 8 halves (no bank conflicts for the fragment loads). Each invocation moves BK / 16
// vectors of a and as many of b per K step, read with one 128-bit load each where the operand is contiguous along K
// and 16-byte aligned (P[45], P[46], set by the host), else gathered half by half. The next K tile is read into
// registers while the current one is multiplied.
//
// Epilogue. Where the workgroup's tile lies inside y and y is f16 or f32 with unit column stride and 16-byte aligned
// rows (the MM-DiT's linears), the accumulators start from the bias (a 16-row broadcast tile of it in shared memory,
// loaded as fragments), and each is converted to the output type as a whole fragment (hardware rounding to nearest
// even) and stored straight to y. Elsewhere each fragment goes through the subgroup's slice of Cs and is written
// element by element, with the bias and the rounding in f32 code. The GELU epilogue (P[47], tanh form only) is
// applied in f32 before the conversion: on the accumulator fragments where they hold the bias, else in that
// element-wise write. It adds nothing to the whole-tile shader's 196 registers and replaces a pass of 0.14 ms
// per MM-DiT block (docs/performance.md). (glslc's optimiser crashes on a sum of two
// fragments, hence the bias as the starting value.)
//
// WHOLE_TILES (the matmul_coop_tiles shaders): the host guarantees K a multiple of BK, both operands
// vector-loadable and y stored directly, so the shader has no per-element bounds checks, gathers or element-wise
// epilogue. That takes it from 255 registers to under 200, and BK 64 then fits without spilling. M and N need not
// be multiples of 128 (the context stream's 2 x 333 rows): loads clamp the row (column of b) to the last valid one,
// so a partial tile reads only real data, and in the last row or column tile the fragments wholly inside y are
// stored directly, those straddling its edge through Cs element by element, those outside not at all.
//
// Every fragment is its own variable (macros expand the loops over fragments): NVIDIA's compiler kept an array of
// accumulator fragments in local memory. The subgroup's hand-offs through Cs use SUBGROUP_SHARED_BARRIER, not
// subgroupBarrier(): the latter is also a barrier for buffer memory, which made every fragment of the epilogue
// wait for the stores before it.
//
// Parameters: as matmul.comp, plus [45] a is vector-loadable, [46] b is (the host picks this shader only when a and
// b are f16), [47] the activation epilogue, and for the gated-residual epilogue (Op::MatmulGatedResidual, whole-tile
// shaders only) [48] on, [49] x's and [50] gate's dtypes, their views at 51 and 60 (offset, row and column strides,
// batch strides), x bound at 5 and gate at 6.
#ifndef BK
#define BK 32
#endif
#ifndef WHOLE_TILES
#define WHOLE_TILES 0
#endif
#ifndef KHR
#define KHR 0
#endif
#if KHR
// The same kernel in VK_KHR_cooperative_matrix's syntax (compiled by glslang 15; see build.rs).
#extension GL_KHR_cooperative_matrix : require
#define COOP_LOAD(m, buf, off, st, col_major) \
    coopMatLoad(m, buf, off, st, (col_major) ? gl_CooperativeMatrixLayoutColumnMajor : gl_CooperativeMatrixLayoutRowMajor)
#define COOP_STORE(m, buf, off, st) coopMatStore(m, buf, off, st, gl_CooperativeMatrixLayoutRowMajor)
#define COOP_MMA(a, b, c) coopMatMulAdd(a, b, c)
#else
#extension GL_NV_cooperative_matrix : require
#define COOP_LOAD(m, buf, off, st, col_major) coopMatLoadNV(m, buf, off, st, col_major)
#define COOP_STORE(m, buf, off, st) coopMatStoreNV(m, buf, off, st, false)
#define COOP_MMA(a, b, c) coopMatMulAddNV(a, b, c)
#endif
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
#include "vec8.glsl"
// Execution barrier of the subgroup that orders its shared-memory accesses only.
#define SUBGROUP_SHARED_BARRIER() \
    controlBarrier(gl_ScopeSubgroup, gl_ScopeSubgroup, gl_StorageSemanticsShared, gl_SemanticsAcquireRelease)
// Subgroups along M and N, and each one's block (defaults: 2 x 4 subgroups of 64 x 32; other values are timing
// variants, with the grid set by SD3_VULKAN_TILES, coop::tiles_block).
#ifndef WGM
#define WGM 2
#endif
#ifndef WGN
#define WGN 4
#endif
#ifndef WM
#define WM 64
#endif
#ifndef WN
#define WN 32
#endif
#define THREADS (32 * WGM * WGN)
#define BM (WGM * WM)
#define BN (WGN * WN)
// Shared row stride in 8-half vectors (BK + 8 halves), vectors per tile row.
#define SV ((BK + 8) / 8)
#define VPR (BK / 8)
#define FRAGS_N (WN / FN)
layout(local_size_x = THREADS) in;

#if KHR
#define ACC_T coopmat<float, gl_ScopeSubgroup, FM, FN, gl_MatrixUseAccumulator>
#define A_T coopmat<float16_t, gl_ScopeSubgroup, FM, FK, gl_MatrixUseA>
#define B_T coopmat<float16_t, gl_ScopeSubgroup, FK, FN, gl_MatrixUseB>
#define OUT16_T coopmat<float16_t, gl_ScopeSubgroup, FM, FN, gl_MatrixUseAccumulator>
#else
#define ACC_T fcoopmatNV<32, gl_ScopeSubgroup, FM, FN>
#define A_T fcoopmatNV<16, gl_ScopeSubgroup, FM, FK>
#define B_T fcoopmatNV<16, gl_ScopeSubgroup, FK, FN>
#define OUT16_T fcoopmatNV<16, gl_ScopeSubgroup, FM, FN>
#endif
// X(i) over the 4 fragment rows (WM / FM with FM 16), Y(j) over the fragment columns, Z(i, j) over both.
#define FOR_I(X) X(0) X(1) X(2) X(3)
#if FRAGS_N == 2
#define FOR_J(Y) Y(0) Y(1)
#define FOR_N(Z, i) Z(i, 0) Z(i, 1)
#elif FRAGS_N == 4
#define FOR_J(Y) Y(0) Y(1) Y(2) Y(3)
#define FOR_N(Z, i) Z(i, 0) Z(i, 1) Z(i, 2) Z(i, 3)
#elif FRAGS_N == 8
#define FOR_J(Y) Y(0) Y(1) Y(2) Y(3) Y(4) Y(5) Y(6) Y(7)
#define FOR_N(Z, i) Z(i, 0) Z(i, 1) Z(i, 2) Z(i, 3) Z(i, 4) Z(i, 5) Z(i, 6) Z(i, 7)
#endif
#define FOR_IJ(Z) FOR_N(Z, 0) FOR_N(Z, 1) FOR_N(Z, 2) FOR_N(Z, 3)
// Global vectors per invocation and K step, of a (BM * VPR / THREADS) and of b (BN * VPR / THREADS).
#define FOR_1(X) X(0)
#define FOR_2(X) X(0) X(1)
#define FOR_4(X) X(0) X(1) X(2) X(3)
#define FOR_8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#if BM * VPR / THREADS == 1
#define FOR_VA FOR_1
#elif BM * VPR / THREADS == 2
#define FOR_VA FOR_2
#elif BM * VPR / THREADS == 4
#define FOR_VA FOR_4
#elif BM * VPR / THREADS == 8
#define FOR_VA FOR_8
#endif
#if BN * VPR / THREADS == 1
#define FOR_VB FOR_1
#elif BN * VPR / THREADS == 2
#define FOR_VB FOR_2
#elif BN * VPR / THREADS == 4
#define FOR_VB FOR_4
#elif BN * VPR / THREADS == 8
#define FOR_VB FOR_8
#endif

// The a and b bindings again, as 16-byte vectors, and the output as 16-byte vectors for the fragment stores.
layout(std430, set = 0, binding = 2) readonly buffer In2v { uvec4 a_v[]; };
layout(std430, set = 0, binding = 3) readonly buffer In3v { uvec4 b_v[]; };
layout(std430, set = 0, binding = 1) writeonly buffer OutV { uvec4 y_v[]; };
// The gated-residual epilogue's x (binding 5; gate is binding 6, read element by element).
layout(std430, set = 0, binding = 5) readonly buffer In5v { uvec4 x_v[]; };

shared uvec4 As[BM * SV];
shared uvec4 Bs[BN * SV];
// Per-subgroup fragment slices (element-wise epilogue) or the 16-row broadcast bias tile (direct epilogue).
shared float Cs[FM * BN > WGM * WGN * FM * FN ? FM * BN : WGM * WGN * FM * FN];

uint batch_offset(uint bi, uint v) {
    uint off = P[v];
    for (int d = int(P[4]) - 1; d >= 0; --d) {
        uint n = P[5u + uint(d)];
        off += (bi % n) * P[v + 3u + uint(d)];
        bi /= n;
    }
    return off;
}

DEFINE_HALF(h2, b2)
DEFINE_HALF(h3, b3)
// WHOLE_TILES: rows past the operand are clamped to its last row instead of zeroed (their products land outside y).
DEFINE_VEC8(vec_a, a_v, h2, WHOLE_TILES)
DEFINE_VEC8(vec_b, b_v, h3, WHOLE_TILES)

// The activation epilogue these shaders have: P[47] for the MM-DiT's GELU (tanh form; UnaryOp id 13, plus 1).
// Other activations are declined by the host (the core runs a unary op after the matmul): the general unary
// function in this epilogue took the whole-tile shader from 196 registers to 249, with spills.
const uint ACT_GELU_TANH = 14u;

// 0.5 x (1 + tanh u) = x · sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
float gelu_tanh(float x) { return x / (1.0 + exp(-1.5957691216057308 * (x + 0.044715 * x * x * x))); }

// Fragment (i, j) of this subgroup, stored in its slice of Cs, out to y with the bias, the GELU epilogue and the
// output dtype; f16 outputs with unit column stride are written a word (two columns) at a time.
// (`has_bias` and `gelu` false: the accumulators started from the bias and had the GELU applied.)
// With `residual` (the gated-residual epilogue), x at `ox` and gate at `og` are read with their strides (P[52],
// P[53] and P[61], P[62]) and the value becomes x + gate·value.
void write_fragment(uint cs0, uint r0, uint c0, uint M, uint N, uint oy, uint sym, uint syn, uint dy, uint dbias,
                    bool has_bias, bool gelu, bool residual, uint ox, uint og) {
    for (uint p = gl_SubgroupInvocationID; p < FM * FN / 2u; p += gl_SubgroupSize) {
        uint fr = p / (FN / 2u), fc = 2u * (p % (FN / 2u));
        uint r = r0 + fr, c = c0 + fc;
        if (r >= M || c >= N) continue;
        float v0 = Cs[cs0 + fr * FN + fc], v1 = Cs[cs0 + fr * FN + fc + 1u];
        if (has_bias) {
            v0 += ld4(dbias, P[43] + c * P[44]);
            if (c + 1u < N) v1 += ld4(dbias, P[43] + (c + 1u) * P[44]);
        }
        if (gelu) {
            v0 = gelu_tanh(v0);
            v1 = gelu_tanh(v1);
        }
        if (residual) {
            v0 = ld5(P[49], ox + r * P[52] + c * P[53]) + ld6(P[50], og + r * P[61] + c * P[62]) * v0;
            if (c + 1u < N) {
                v1 = ld5(P[49], ox + r * P[52] + (c + 1u) * P[53]) +
                     ld6(P[50], og + r * P[61] + (c + 1u) * P[62]) * v1;
            }
        }
        uint e = oy + r * sym + c * syn;
        if (dy == 1u && syn == 1u && (e & 1u) == 0u && c + 1u < N) {
            b1[e >> 1] = f32_to_f16(v0) | (f32_to_f16(v1) << 16);
        } else {
            st(dy, e, v0);
            if (c + 1u < N) st(dy, e + syn, v1);
        }
    }
}

void main() {
    uint M = P[0], N = P[1], K = P[2];
    uint dy = P[11], dbias = P[14];
    uint bi = gl_WorkGroupID.z;
    uint oa = batch_offset(bi, 16u), ob = batch_offset(bi, 25u), oy = batch_offset(bi, 34u);
    uint sam = P[17], sak = P[18], sbk = P[26], sbn = P[27], sym = P[35], syn = P[36];
    uint row0 = gl_WorkGroupID.y * BM, col0 = gl_WorkGroupID.x * BN;
    uint t = gl_LocalInvocationID.x;
    uint w = gl_SubgroupID, wm = w / uint(WGN), wn = w % uint(WGN);
    uint r0 = row0 + wm * WM, c0 = col0 + wn * WN;
    // Vector q = t + THREADS*v of a tile covers tile row q / VPR, columns 8*(q % VPR) .. +7. b's "rows" are its
    // columns n (stored column-major), its "columns" k.
    bool va = P[45] != 0u, vb = P[46] != 0u;
    uint am = M - min(M, row0), bn = N - min(N, col0);
    uint abase = oa + row0 * sam, bbase = ob + col0 * sbn;
#define Q_R(v) ((t + uint(THREADS) * (v)) / VPR)
#define Q_C(v) (8u * ((t + uint(THREADS) * (v)) % VPR))
#define LOAD_A(v) uvec4 ra##v = vec_a(va, abase, Q_R(v), Q_C(v), sam, sak, am, K);
#define LOAD_B(v) uvec4 rb##v = vec_b(vb, bbase, Q_R(v), Q_C(v), sbn, sbk, bn, K);
    FOR_VA(LOAD_A)
    FOR_VB(LOAD_B)
#define DECL_ACC(i, j) ACC_T acc##i##j = ACC_T(0.0);
    FOR_IJ(DECL_ACC)
    // Workgroup-uniform: the whole tile inside y, f16 or f32 y with unit column stride and 16-byte aligned rows.
    uint vecw = dy == 1u ? 8u : 4u;
    bool direct = WHOLE_TILES != 0 || ((dy == 0u || dy == 1u) && syn == 1u && sym % vecw == 0u && oy % vecw == 0u &&
                                       row0 + BM <= M && col0 + BN <= N);
    if (direct && P[15] != 0u) {
        // The bias of the tile's BN columns in each of FM rows of Cs.
        for (uint e = t; e < FM * BN; e += uint(THREADS)) Cs[e] = ld4(dbias, P[43] + min(col0 + e % BN, N - 1u) * P[44]);
        barrier();
#define LOAD_BIAS(i, j) COOP_LOAD(acc##i##j, Cs, wn * WN + j * FN, BN, false);
        FOR_IJ(LOAD_BIAS)
    }
    for (uint k0 = 0u; k0 < K; k0 += BK) {
#define STORE_A(v) As[Q_R(v) * SV + Q_C(v) / 8u] = ra##v;
#define STORE_B(v) Bs[Q_R(v) * SV + Q_C(v) / 8u] = rb##v;
        FOR_VA(STORE_A)
        FOR_VB(STORE_B)
        barrier();
        uint k1 = k0 + BK;
        if (k1 < K) {
            uint kl = K - k1;
#define NEXT_A(v) ra##v = vec_a(va, abase + k1 * sak, Q_R(v), Q_C(v), sam, sak, am, kl);
#define NEXT_B(v) rb##v = vec_b(vb, bbase + k1 * sbk, Q_R(v), Q_C(v), sbn, sbk, bn, kl);
            FOR_VA(NEXT_A)
            FOR_VB(NEXT_B)
        }
        [[unroll]] for (uint kk = 0u; kk < BK; kk += FK) {
#define LOAD_FA(i) A_T fa##i; COOP_LOAD(fa##i, As, (wm * WM + i * FM) * SV + kk / 8u, SV, false);
#define LOAD_FB(j) B_T fb##j; COOP_LOAD(fb##j, Bs, (wn * WN + j * FN) * SV + kk / 8u, SV, true);
#define MMA(i, j) acc##i##j = COOP_MMA(fa##i, fb##j, acc##i##j);
            FOR_I(LOAD_FA)
            FOR_J(LOAD_FB)
            FOR_IJ(MMA)
        }
        barrier();
    }
    // The gated-residual epilogue (P[48]: Op::MatmulGatedResidual, whole-tile calls only): y = x + gate·acc. On the
    // fragments wholly inside y, with x loaded as a fragment and the gate's row (the host takes only gates that are
    // one row per batch element) as a 16-row broadcast tile in Cs; the fragments across y's edge get it in
    // write_fragment.
    bool residual = WHOLE_TILES != 0 && P[48] != 0u;
    uint ox = 0u, og = 0u;
    if (residual) {
        ox = batch_offset(bi, 51u);
        og = batch_offset(bi, 60u);
        for (uint e = t; e < FM * BN; e += uint(THREADS)) Cs[e] = ld6(P[50], og + min(col0 + e % BN, N - 1u) * P[62]);
        barrier();
#define RESIDUAL(i, j)                                                                                       \
    if (r0 + i * FM + FM <= M && c0 + j * FN + FN <= N) {                                                    \
        OUT16_T x16;                                                                                         \
        COOP_LOAD(x16, x_v, (ox + (r0 + i * FM) * P[52] + c0 + j * FN) / 8u, P[52] / 8u, false);            \
        ACC_T xf = ACC_T(x16), gf;                                                                           \
        COOP_LOAD(gf, Cs, wn * WN + j * FN, BN, false);                                                      \
        for (int e = 0; e < acc##i##j.length(); ++e) acc##i##j[e] = xf[e] + gf[e] * acc##i##j[e];           \
    }
        FOR_IJ(RESIDUAL)
        // Cs is the subgroups' store slices from here on.
        barrier();
    }
    // The GELU epilogue, on the accumulators where they hold the bias already (elsewhere in write_fragment).
#define GELU(i, j) for (int e = 0; e < acc##i##j.length(); ++e) acc##i##j[e] = gelu_tanh(acc##i##j[e]);
    if (direct && P[47] == ACT_GELU_TANH) {
        FOR_IJ(GELU)
    }
#define STORE16(i, j)                                                                                        \
    COOP_STORE(OUT16_T(acc##i##j), y_v, (oy + (r0 + i * FM) * sym + c0 + j * FN) / 8u, sym / 8u);
#define STORE32(i, j) COOP_STORE(acc##i##j, y_v, (oy + (r0 + i * FM) * sym + c0 + j * FN) / 4u, sym / 4u);
    // Workgroup-uniform; always true for the whole-tile shader's full tiles.
    bool full = WHOLE_TILES == 0 ? direct : row0 + BM <= M && col0 + BN <= N;
    if (full) {
        if (dy == 1u) {
            FOR_IJ(STORE16)
        } else {
            FOR_IJ(STORE32)
        }
        return;
    }
    uint cs0 = w * FM * FN;
#if WHOLE_TILES
    // The last row or column tile: per fragment (subgroup-uniform), direct where wholly inside y.
#define EDGE(i, j)                                                                                           \
    if (r0 + i * FM + FM <= M && c0 + j * FN + FN <= N) {                                                    \
        if (dy == 1u) {                                                                                      \
            STORE16(i, j)                                                                                    \
        } else {                                                                                             \
            STORE32(i, j)                                                                                    \
        }                                                                                                    \
    } else if (r0 + i * FM < M && c0 + j * FN < N) {                                                         \
        COOP_STORE(acc##i##j, Cs, cs0, FN);                                                              \
        SUBGROUP_SHARED_BARRIER();                                                                           \
        write_fragment(cs0, r0 + i * FM, c0 + j * FN, M, N, oy, sym, syn, dy, dbias, false, false, residual,  \
                       ox, og);                                                                              \
        SUBGROUP_SHARED_BARRIER();                                                                           \
    }
    FOR_IJ(EDGE)
#else
#define OUT(i, j)                                                                                            \
    COOP_STORE(acc##i##j, Cs, cs0, FN);                                                                  \
    SUBGROUP_SHARED_BARRIER();                                                                               \
    write_fragment(cs0, r0 + i * FM, c0 + j * FN, M, N, oy, sym, syn, dy, dbias, P[15] != 0u,                \
                   P[47] == ACT_GELU_TANH, false, 0u, 0u);                                                   \
    SUBGROUP_SHARED_BARRIER();
    FOR_IJ(OUT)
#endif
}
