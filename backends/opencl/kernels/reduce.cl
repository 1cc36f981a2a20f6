// Reductions over segments: a segment is a run of `seglen` consecutive logical elements (a row of the last
// dim for layer/RMS norm and softmax, a (C/groups)*spatial block for group norm). One work-group per segment.
// RWG (work-group size, a power of two) comes from the build options.
// Operand bits of `contig`: 0 = x, 1 = p, 2 = q, 3 = y.

#define NORM_RMS 1u      // RMS norm: no mean subtraction
#define NORM_MUL 2u      // multiply by p
#define NORM_ADD 4u      // add q
#define NORM_MODULATE 8u // multiply by (1 + p) instead of p

inline float wg_sum(float v, local float *red) {
    uint lid = get_local_id(0);
    red[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint s = RWG / 2; s > 0; s >>= 1) {
        if (lid < s) red[lid] += red[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float r = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return r;
}

inline float wg_max(float v, local float *red) {
    uint lid = get_local_id(0);
    red[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint s = RWG / 2; s > 0; s >>= 1) {
        if (lid < s) red[lid] = fmax(red[lid], red[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float r = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return r;
}

// y = norm(x) [* p or * (1 + p)] [+ q]; norm is layer norm (biased variance, two passes) or RMS norm.
kernel __attribute__((reqd_work_group_size(RWG, 1, 1)))
void seg_norm(uint seglen, Shape sh, uint mode, float eps, uint contig,
              global const uchar *x, uint xdt, View xv,
              global const uchar *p, uint pdt, View pv,
              global const uchar *q, uint qdt, View qv,
              global uchar *y, uint ydt, View yv) {
    local float red[RWG];
    uint lid = get_local_id(0);
    uint base = get_group_id(0) * seglen;
    float mean = 0.0f;
    if (!(mode & NORM_RMS)) {
        float s = 0.0f;
        for (uint j = lid; j < seglen; j += RWG) s += ld(x, xdt, VOFF(contig, 0, sh, xv, base + j));
        mean = wg_sum(s, red) / (float)seglen;
    }
    float s2 = 0.0f;
    for (uint j = lid; j < seglen; j += RWG) {
        float d = ld(x, xdt, VOFF(contig, 0, sh, xv, base + j)) - mean;
        s2 += d * d;
    }
    float inv = rsqrt(wg_sum(s2, red) / (float)seglen + eps);
    for (uint j = lid; j < seglen; j += RWG) {
        uint i = base + j;
        float v = (ld(x, xdt, VOFF(contig, 0, sh, xv, i)) - mean) * inv;
        if (mode & NORM_MUL) {
            float w = ld(p, pdt, VOFF(contig, 1, sh, pv, i));
            v *= (mode & NORM_MODULATE) ? 1.0f + w : w;
        }
        if (mode & NORM_ADD) v += ld(q, qdt, VOFF(contig, 2, sh, qv, i));
        st(y, ydt, VOFF(contig, 3, sh, yv, i), v);
    }
}

kernel __attribute__((reqd_work_group_size(RWG, 1, 1)))
void softmax(uint seglen, Shape sh, uint contig,
             global const uchar *x, uint xdt, View xv, global uchar *y, uint ydt, View yv) {
    local float red[RWG];
    uint lid = get_local_id(0);
    uint base = get_group_id(0) * seglen;
    float m = -INFINITY;
    for (uint j = lid; j < seglen; j += RWG) m = fmax(m, ld(x, xdt, VOFF(contig, 0, sh, xv, base + j)));
    m = wg_max(m, red);
    float s = 0.0f;
    for (uint j = lid; j < seglen; j += RWG) s += exp(ld(x, xdt, VOFF(contig, 0, sh, xv, base + j)) - m);
    float inv = 1.0f / wg_sum(s, red);
    for (uint j = lid; j < seglen; j += RWG) {
        uint i = base + j;
        st(y, ydt, VOFF(contig, 3, sh, yv, i), exp(ld(x, xdt, VOFF(contig, 0, sh, xv, i)) - m) * inv);
    }
}
