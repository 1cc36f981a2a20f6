// Batched matmul y = a·b (+ bias) on cooperative matrices (VK_NV_cooperative_matrix: tensor cores on NVIDIA):
// f16 a and b, f32 accumulation, any output dtype. A 256-invocation workgroup (8 subgroups of 32, 2 x 4) computes
// a 128 x 128 tile of y, each subgroup a 64 x 32 block of FM x FN fragments (FM, FN, FK set by the including shader to
// a shape the device lists), stepping K by 32. Operands go through shared memory as 16-byte vectors of 8 halves
// (the fragment loads then read whole vectors; offsets and strides are in vectors): a row-major (As[m][k]), b
// column-major (Bs[n][k]), rows padded to 40 halves (no bank conflicts for the fragment loads). Each
// invocation moves 2 vectors of a and 2 of b per K step, read with one 128-bit load each where the operand
// is contiguous along K and 16-byte aligned (P[45], P[46], set by the host), else gathered half by half. The next
// K tile is read into registers while the current one is multiplied.
//
// Every fragment is its own variable (macros expand the loops over fragments): NVIDIA's compiler kept an array of
// accumulator fragments in local memory. The subgroup's hand-offs through Cs use SUBGROUP_SHARED_BARRIER, not
// subgroupBarrier(): the latter is also a barrier for buffer memory, which made every fragment of the epilogue
// wait for the stores before it (on the H200 the epilogue took 4/5 of the kernel's time).
//
// Parameters: as matmul.comp, plus [45] a is vector-loadable, [46] b is (the host picks this shader only when a and
// b are f16).
#extension GL_NV_cooperative_matrix : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"
// Execution barrier of the subgroup that orders its shared-memory accesses only.
#define SUBGROUP_SHARED_BARRIER() \
    controlBarrier(gl_ScopeSubgroup, gl_ScopeSubgroup, gl_StorageSemanticsShared, gl_SemanticsAcquireRelease)
#define WN 32
#define WM 64
#define BM (2 * WM)
#define BN (4 * WN)
#define BK 32
// Shared row stride in 8-half vectors (40 halves), vectors per tile row.
#define SV ((BK + 8) / 8)
#define VPR (BK / 8)
#define FRAGS_N (WN / FN)
layout(local_size_x = 256) in;

#define ACC_T fcoopmatNV<32, gl_ScopeSubgroup, FM, FN>
#define A_T fcoopmatNV<16, gl_ScopeSubgroup, FM, FK>
#define B_T fcoopmatNV<16, gl_ScopeSubgroup, FK, FN>
// X(i) over the 4 fragment rows (WM / FM with FM 16), Y(j) over the fragment columns, Z(i, j) over both.
#define FOR_I(X) X(0) X(1) X(2) X(3)
#if FRAGS_N == 2
#define FOR_J(Y) Y(0) Y(1)
#define FOR_N(Z, i) Z(i, 0) Z(i, 1)
#elif FRAGS_N == 4
#define FOR_J(Y) Y(0) Y(1) Y(2) Y(3)
#define FOR_N(Z, i) Z(i, 0) Z(i, 1) Z(i, 2) Z(i, 3)
#endif
#define FOR_IJ(Z) FOR_N(Z, 0) FOR_N(Z, 1) FOR_N(Z, 2) FOR_N(Z, 3)
// Global vectors per invocation and K step: a's and b's (BM * VPR / 256 = BN * VPR / 256 = 2).
#define FOR_VA(X) X(0) X(1)
#define FOR_VB(X) X(0) X(1)

// The a and b bindings again, as 16-byte vectors.
layout(std430, set = 0, binding = 2) readonly buffer In2v { uvec4 a_v[]; };
layout(std430, set = 0, binding = 3) readonly buffer In3v { uvec4 b_v[]; };

shared uvec4 As[BM * SV];
shared uvec4 Bs[BN * SV];
shared float Cs[8 * FM * FN];

uint batch_offset(uint bi, uint v) {
    uint off = P[v];
    for (int d = int(P[4]) - 1; d >= 0; --d) {
        uint n = P[5u + uint(d)];
        off += (bi % n) * P[v + 3u + uint(d)];
        bi /= n;
    }
    return off;
}

uint h2(uint e) { return (b2[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }
uint h3(uint e) { return (b3[e >> 1] >> ((e & 1u) * 16u)) & 0xffffu; }

// Halves c..c+7 of tile row r of an operand whose element (r, c) lies at base + r*sr + c*sc, as one vector (zero
// outside rows x cols). `vec` (uniform): unit sc, base, sr and cols multiples of 8, so one aligned 128-bit load.
#define DEFINE_VEC8(NAME, BUF, BUFV, H)                                                                     \
    uvec4 NAME(bool vec, uint base, uint r, uint c, uint sr, uint sc, uint rows, uint cols) {               \
        if (r >= rows || c >= cols) return uvec4(0u);                                                      \
        uint e = base + r * sr + c * sc;                                                                   \
        if (vec) return BUFV[e >> 3];                                                                      \
        uint w[4];                                                                                         \
        [[unroll]] for (uint j = 0u; j < 4u; ++j) {                                                        \
            uint lo = c + 2u * j < cols ? H(e + 2u * j * sc) : 0u;                                         \
            uint hi = c + 2u * j + 1u < cols ? H(e + (2u * j + 1u) * sc) : 0u;                             \
            w[j] = lo | (hi << 16);                                                                        \
        }                                                                                                  \
        return uvec4(w[0], w[1], w[2], w[3]);                                                              \
    }
DEFINE_VEC8(vec_a, b2, a_v, h2)
DEFINE_VEC8(vec_b, b3, b_v, h3)

// Fragment (i, j) of this subgroup, stored in its slice of Cs, out to y with the bias and the output dtype; f16
// outputs with unit column stride are written a word (two columns) at a time.
void write_fragment(uint cs0, uint r0, uint c0, uint M, uint N, uint oy, uint sym, uint syn, uint dy, uint dbias) {
    bool has_bias = P[15] != 0u;
    for (uint p = gl_SubgroupInvocationID; p < FM * FN / 2u; p += gl_SubgroupSize) {
        uint fr = p / (FN / 2u), fc = 2u * (p % (FN / 2u));
        uint r = r0 + fr, c = c0 + fc;
        if (r >= M || c >= N) continue;
        float v0 = Cs[cs0 + fr * FN + fc], v1 = Cs[cs0 + fr * FN + fc + 1u];
        if (has_bias) {
            v0 += ld4(dbias, P[43] + c * P[44]);
            if (c + 1u < N) v1 += ld4(dbias, P[43] + (c + 1u) * P[44]);
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
    uint w = gl_SubgroupID, wm = w / 4u, wn = w % 4u;
    // Vector q = t + 256*v of a tile covers tile row q / VPR, columns 8*(q % VPR) .. +7. b's "rows" are its
    // columns n (stored column-major), its "columns" k.
    bool va = P[45] != 0u, vb = P[46] != 0u;
    uint am = M - min(M, row0), bn = N - min(N, col0);
    uint abase = oa + row0 * sam, bbase = ob + col0 * sbn;
#define Q_R(v) ((t + 256u * (v)) / VPR)
#define Q_C(v) (8u * ((t + 256u * (v)) % VPR))
#define LOAD_A(v) uvec4 ra##v = vec_a(va, abase, Q_R(v), Q_C(v), sam, sak, am, K);
#define LOAD_B(v) uvec4 rb##v = vec_b(vb, bbase, Q_R(v), Q_C(v), sbn, sbk, bn, K);
    FOR_VA(LOAD_A)
    FOR_VB(LOAD_B)
#define DECL_ACC(i, j) ACC_T acc##i##j = ACC_T(0.0);
    FOR_IJ(DECL_ACC)
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
#define LOAD_FA(i) A_T fa##i; coopMatLoadNV(fa##i, As, (wm * WM + i * FM) * SV + kk / 8u, SV, false);
#define LOAD_FB(j) B_T fb##j; coopMatLoadNV(fb##j, Bs, (wn * WN + j * FN) * SV + kk / 8u, SV, true);
#define MMA(i, j) acc##i##j = coopMatMulAddNV(fa##i, fb##j, acc##i##j);
            FOR_I(LOAD_FA)
            FOR_J(LOAD_FB)
            FOR_IJ(MMA)
        }
        barrier();
    }
    uint cs0 = w * FM * FN;
#define OUT(i, j)                                                                                            \
    coopMatStoreNV(acc##i##j, Cs, cs0, FN, false);                                                           \
    SUBGROUP_SHARED_BARRIER();                                                                               \
    write_fragment(cs0, row0 + wm * WM + i * FM, col0 + wn * WN + j * FN, M, N, oy, sym, syn, dy, dbias);    \
    SUBGROUP_SHARED_BARRIER();
    FOR_IJ(OUT)
}
