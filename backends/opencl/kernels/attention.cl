// Fused attention, flash style: each work-item owns one query row; the work-group walks the keys in tiles of
// BK rows staged in local memory and keeps an online softmax (running max m, running sum l, rescaled
// accumulator), so no score matrix is ever written. DH, DV (head dims), BQ (work-group size = query rows per
// group) and BK come from the build options.
// flags: 1 = causal (key j > query i masked), 2 = additive bias, 4 = per-head RMS norm of q and k.

kernel __attribute__((reqd_work_group_size(BQ, 1, 1)))
void attention(uint H, uint Nq, uint Nk, float scale, uint flags, float eps,
               global const uchar *q, uint qdt, View qv,
               global const uchar *k, uint kdt, View kv,
               global const uchar *v, uint vdt, View vv,
               global const uchar *bias, uint bdt, View bv,
               global const uchar *qn, uint qndt, View qnv,
               global const uchar *kn, uint kndt, View knv,
               global uchar *o, uint odt, View ov) {
    local float Ks[BK][DH];
    local float Vs[BK][DV];
    local float knw[DH];
    const uint li = get_local_id(0);
    const uint i0 = get_group_id(0) * BQ, i = i0 + li;
    const uint bh = get_group_id(1), b = bh / H, h = bh - (bh / H) * H;
    const bool active = i < Nq;
    const bool causal = (flags & 1u) != 0, has_bias = (flags & 2u) != 0, qk_norm = (flags & 4u) != 0;
    const ulong qb = qv.off + b * qv.st[0] + h * qv.st[1];
    const ulong kb = kv.off + b * kv.st[0] + h * kv.st[1];
    const ulong vb = vv.off + b * vv.st[0] + h * vv.st[1];
    const ulong bb = bv.off + b * bv.st[0] + h * bv.st[1];
    const ulong ob = ov.off + b * ov.st[0] + h * ov.st[1];

    float qr[DH];
    float acc[DV];
    for (uint c = 0; c < DV; ++c) acc[c] = 0.0f;
    for (uint d = 0; d < DH; ++d) qr[d] = active ? ld(q, qdt, qb + i * qv.st[2] + d * qv.st[3]) : 0.0f;
    if (qk_norm) {
        float ss = 0.0f;
        for (uint d = 0; d < DH; ++d) ss += qr[d] * qr[d];
        float inv = rsqrt(ss / (float)DH + eps);
        for (uint d = 0; d < DH; ++d) qr[d] *= inv * ld(qn, qndt, qnv.off + d * qnv.st[0]);
        for (uint d = li; d < DH; d += BQ) knw[d] = ld(kn, kndt, knv.off + d * knv.st[0]);
    }
    for (uint d = 0; d < DH; ++d) qr[d] *= scale;

    float m = -INFINITY, l = 0.0f;
    // With a causal mask no query of this group sees keys past its last row.
    const uint kend = causal ? min(Nk, min(Nq, i0 + BQ)) : Nk;
    for (uint j0 = 0; j0 < kend; j0 += BK) {
        barrier(CLK_LOCAL_MEM_FENCE);
        for (uint e = li; e < BK * DH; e += BQ) {
            uint jj = e / DH, d = e - jj * DH, j = j0 + jj;
            Ks[jj][d] = j < Nk ? ld(k, kdt, kb + j * kv.st[2] + d * kv.st[3]) : 0.0f;
        }
        for (uint e = li; e < BK * DV; e += BQ) {
            uint jj = e / DV, c = e - jj * DV, j = j0 + jj;
            Vs[jj][c] = j < Nk ? ld(v, vdt, vb + j * vv.st[2] + c * vv.st[3]) : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (qk_norm) {
            if (li < BK) {
                float ss = 0.0f;
                for (uint d = 0; d < DH; ++d) ss += Ks[li][d] * Ks[li][d];
                float inv = rsqrt(ss / (float)DH + eps);
                for (uint d = 0; d < DH; ++d) Ks[li][d] *= inv * knw[d];
            }
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        if (active) {
            float s[BK];
            float mt = -INFINITY;
            for (uint jj = 0; jj < BK; ++jj) {
                uint j = j0 + jj;
                float sc = -INFINITY;
                if (j < Nk && !(causal && j > i)) {
                    sc = 0.0f;
                    for (uint d = 0; d < DH; ++d) sc = mad(qr[d], Ks[jj][d], sc);
                    if (has_bias) sc += ld(bias, bdt, bb + i * bv.st[2] + j * bv.st[3]);
                }
                s[jj] = sc;
                mt = fmax(mt, sc);
            }
            float mn = fmax(m, mt);
            if (mn > -INFINITY) {
                float corr = exp(m - mn);
                l *= corr;
                for (uint c = 0; c < DV; ++c) acc[c] *= corr;
                for (uint jj = 0; jj < BK; ++jj) {
                    float p = exp(s[jj] - mn);
                    l += p;
                    for (uint c = 0; c < DV; ++c) acc[c] = mad(p, Vs[jj][c], acc[c]);
                }
                m = mn;
            }
        }
    }
    if (active) {
        float inv = 1.0f / l;
        for (uint c = 0; c < DV; ++c) st(o, odt, ob + i * ov.st[2] + c * ov.st[3], acc[c] * inv);
    }
}
