// Row-wise ops over the last dim (softmax, layer norm, RMS norm, fused adaLN) and group norm.
// One block per row (or per (sample, group)); f32 statistics, two passes for the variance.

#define ROW_SOFTMAX 0
#define ROW_LAYER_NORM 1
#define ROW_RMS_NORM 2
#define ROW_LN_MODULATE 3

struct RowParams {
    TD x;
    TD a;  // layer norm weight [D] / rms weight [D] / modulate scale (x's shape)
    TD b;  // layer norm bias [D] / modulate shift (x's shape)
    TD out;
    i64 rows;
    i64 d;
    int op;
    int affine;
    float eps;
    int causal_base;  // softmax: mask column j of row r when j > causal_base + r % causal_rows; -1: no mask
    i64 causal_rows;
};

extern "C" __global__ void row_op(RowParams p) {
    __shared__ float scratch[32];
    for (i64 r = blockIdx.x; r < p.rows; r += gridDim.x) {
        i64 xo = td_row(p.x, r), oo = td_row(p.out, r);
        i64 xs = td_last_stride(p.x), os = td_last_stride(p.out);
        if (p.op == ROW_SOFTMAX) {
            i64 last = p.causal_base < 0 ? p.d - 1 : p.causal_base + r % p.causal_rows;  // last unmasked column
            if (last > p.d - 1) last = p.d - 1;
            float m = NEG_INF;
            for (i64 j = threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, ldf(p.x.dtype, p.x.ptr, xo + j * xs));
            m = block_max(m, scratch);
            float s = 0.f;
            for (i64 j = threadIdx.x; j <= last; j += blockDim.x) s += expf(ldf(p.x.dtype, p.x.ptr, xo + j * xs) - m);
            s = block_sum(s, scratch);
            float inv = 1.f / s;
            for (i64 j = threadIdx.x; j < p.d; j += blockDim.x) {
                float v = j <= last ? expf(ldf(p.x.dtype, p.x.ptr, xo + j * xs) - m) * inv : 0.f;
                stf(p.out.dtype, p.out.ptr, oo + j * os, v);
            }
            continue;
        }
        float mean = 0.f;
        if (p.op != ROW_RMS_NORM) {
            float s = 0.f;
            for (i64 j = threadIdx.x; j < p.d; j += blockDim.x) s += ldf(p.x.dtype, p.x.ptr, xo + j * xs);
            mean = block_sum(s, scratch) / (float)p.d;
        }
        float ss = 0.f;
        for (i64 j = threadIdx.x; j < p.d; j += blockDim.x) {
            float v = ldf(p.x.dtype, p.x.ptr, xo + j * xs) - mean;
            ss += v * v;
        }
        float inv = rsqrtf(block_sum(ss, scratch) / (float)p.d + p.eps);
        i64 ao = 0, bo = 0, as_ = 0, bs_ = 0;
        if (p.op == ROW_LN_MODULATE) {
            ao = td_row(p.a, r);
            bo = td_row(p.b, r);
            as_ = td_last_stride(p.a);
            bs_ = td_last_stride(p.b);
        }
        for (i64 j = threadIdx.x; j < p.d; j += blockDim.x) {
            float v = (ldf(p.x.dtype, p.x.ptr, xo + j * xs) - mean) * inv;
            if (p.op == ROW_LAYER_NORM && p.affine) {
                v = v * ldf(p.a.dtype, p.a.ptr, p.a.offset + j * p.a.strides[0]) +
                    ldf(p.b.dtype, p.b.ptr, p.b.offset + j * p.b.strides[0]);
            } else if (p.op == ROW_RMS_NORM) {
                v = v * ldf(p.a.dtype, p.a.ptr, p.a.offset + j * p.a.strides[0]);
            } else if (p.op == ROW_LN_MODULATE) {
                float sc = ldf(p.a.dtype, p.a.ptr, ao + j * as_);
                float sh = ldf(p.b.dtype, p.b.ptr, bo + j * bs_);
                v = v * (1.f + sc) + sh;
            }
            stf(p.out.dtype, p.out.ptr, oo + j * os, v);
        }
    }
}

// Layer norm, RMS norm and fused adaLN for rows of at most 32·8·VEC elements with unit last stride and
// 16-byte aligned rows (the host checks): one warp per row, the row read once into registers with 16-byte loads,
// statistics by warp shuffles. The block-per-row `row_op` reads the row three times with per-element dtype
// switches and leaves most of each block idle at D = 1536. VEC is the smallest that holds the row, so registers
// (and with them occupancy, which hides the memory latency) are not spent on a longer row than the one at hand.
//
// HALF: f16/bf16 rows are kept as their raw 16-byte vectors (4 registers per 8 elements instead of 8) and widened
// on each pass; the registers saved go to occupancy, which is what hides the memory latency here.
template <int VEC, bool HALF>
__device__ __forceinline__ void row_warp_body(const RowParams& p) {
    const int lane = threadIdx.x & 31;
    const i64 warps = (i64)gridDim.x * (blockDim.x >> 5);
    for (i64 r = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < p.rows; r += warps) {
        // The row's index over the leading dims, decomposed once with 32-bit division and shared by every operand
        // (they all have x's shape; td_row's 64-bit divisions per operand outweighed the row's arithmetic).
        unsigned idx[SD3_MAX_RANK - 1];
        {
            unsigned rest = (unsigned)r;
#pragma unroll
            for (int dd = SD3_MAX_RANK - 2; dd >= 0; --dd) {
                idx[dd] = 0;
                if (dd < p.x.rank - 1) {
                    const unsigned n = (unsigned)p.x.shape[dd];
                    idx[dd] = rest % n;
                    rest /= n;
                }
            }
        }
        auto row_at = [&](const TD& t) {
            i64 off = t.offset;
#pragma unroll
            for (int dd = 0; dd < SD3_MAX_RANK - 1; ++dd)
                if (dd < t.rank - 1) off += (i64)idx[dd] * t.strides[dd];
            return off;
        };
        const i64 xo = row_at(p.x), oo = row_at(p.out);
        const int d = (int)p.d;
        float v[HALF ? 1 : VEC][8];
        U4 raw[HALF ? VEC : 1] = {};
        // Element j of vector i, as f32.
        auto get = [&](int i, float* out8) {
            if constexpr (HALF) {
                unpack8(p.x.dtype, raw[i], out8);
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) out8[j] = v[i][j];
            }
        };
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const int c = (i * 32 + lane) * 8;
            if (c < d) {
                float t[8];
                if constexpr (HALF) {
                    raw[i] = *(const U4*)((const unsigned short*)p.x.ptr + xo + c);
                } else {
                    load8(p.x.dtype, p.x.ptr, xo + c, v[i]);
                }
                get(i, t);
#pragma unroll
                for (int j = 0; j < 8; ++j) s += t[j];
            }
        }
        const float mean = p.op == ROW_RMS_NORM ? 0.f : warp_sum(s) / (float)d;
        float ss = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            if ((i * 32 + lane) * 8 < d) {
                float t[8];
                get(i, t);
#pragma unroll
                for (int j = 0; j < 8; ++j) ss += (t[j] - mean) * (t[j] - mean);
            }
        }
        const float inv = rsqrtf(warp_sum(ss) / (float)d + p.eps);
        const i64 ao = p.op == ROW_LN_MODULATE ? row_at(p.a) : p.a.offset;
        const i64 bo = p.op == ROW_LN_MODULATE ? row_at(p.b) : p.b.offset;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const int c = (i * 32 + lane) * 8;
            if (c >= d) continue;
            float y[8], a[8], b[8];
            get(i, y);
#pragma unroll
            for (int j = 0; j < 8; ++j) y[j] = (y[j] - mean) * inv;
            if (p.op == ROW_LN_MODULATE) {
                load8(p.a.dtype, p.a.ptr, ao + c, a);
                load8(p.b.dtype, p.b.ptr, bo + c, b);
#pragma unroll
                for (int j = 0; j < 8; ++j) y[j] = y[j] * (1.f + a[j]) + b[j];
            } else if (p.op == ROW_RMS_NORM || p.affine) {
                load8(p.a.dtype, p.a.ptr, ao + c, a);
#pragma unroll
                for (int j = 0; j < 8; ++j) y[j] *= a[j];
                if (p.op == ROW_LAYER_NORM) {
                    load8(p.b.dtype, p.b.ptr, bo + c, b);
#pragma unroll
                    for (int j = 0; j < 8; ++j) y[j] += b[j];
                }
            }
            store8(p.out.dtype, p.out.ptr, oo + c, y);
        }
    }
}

// Row lengths up to 1024 / 1536 / 3072; `_h` for f16/bf16 rows.
extern "C" __global__ void __launch_bounds__(128) row_warp4(RowParams p) { row_warp_body<4, false>(p); }
extern "C" __global__ void __launch_bounds__(128) row_warp6(RowParams p) { row_warp_body<6, false>(p); }
extern "C" __global__ void __launch_bounds__(128) row_warp12(RowParams p) { row_warp_body<12, false>(p); }
extern "C" __global__ void __launch_bounds__(128) row_warp4_h(RowParams p) { row_warp_body<4, true>(p); }
extern "C" __global__ void __launch_bounds__(128) row_warp6_h(RowParams p) { row_warp_body<6, true>(p); }
extern "C" __global__ void __launch_bounds__(128) row_warp12_h(RowParams p) { row_warp_body<12, true>(p); }

struct GroupNormParams {
    TD x;
    TD w;
    TD b;
    TD out;
    i64 channels;
    i64 spatial;
    int groups;
    int affine;
    float eps;
    int contiguous;  // x and out contiguous: element index = offset + flat index
    u64 stats;       // double[2 * N * groups]: sum and sum of squares per (sample, group), zeroed by the host
    i64 chunk;       // elements of a group per block in group_norm_stats
    u64 coeffs;      // float[3 * N * channels]: mean, scale and shift per (sample, channel), for group_norm_apply8
};

__device__ __forceinline__ i64 gn_index(const GroupNormParams& p, const TD& t, i64 flat) {
    return p.contiguous ? t.offset + flat : td_index(t, flat);
}

// Group norm, pass 1: many blocks per (sample, group) (grid: chunks × N·groups), partial sums in f32 per block,
// accumulated in f64 with atomics. One block per group, as in `group_norm`, leaves most of the GPU idle on
// VAE-sized maps (32 groups of 4 M elements at 1024²).
extern "C" __global__ void group_norm_stats(GroupNormParams p) {
    __shared__ float scratch[32];
    i64 ng = blockIdx.y, n = ng / p.groups, g = ng % p.groups;
    i64 cpg = p.channels / p.groups, len = cpg * p.spatial;
    i64 base = (n * p.channels + g * cpg) * p.spatial;
    i64 start = blockIdx.x * p.chunk, end = start + p.chunk < len ? start + p.chunk : len;
    float s = 0.f, ss = 0.f;
    for (i64 e = start + threadIdx.x; e < end; e += blockDim.x) {
        float v = ldf(p.x.dtype, p.x.ptr, gn_index(p, p.x, base + e));
        s += v;
        ss += v * v;
    }
    s = block_sum(s, scratch);
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) {
        atomicAdd((double*)p.stats + 2 * ng, (double)s);
        atomicAdd((double*)p.stats + 2 * ng + 1, (double)ss);
    }
}

// Group norm, pass 2: normalise every element (grid-stride over N·C·spatial).
extern "C" __global__ void group_norm_apply(GroupNormParams p) {
    i64 total = p.x.shape[0] * p.channels * p.spatial;
    i64 cpg = p.channels / p.groups;
    double len = (double)(cpg * p.spatial);
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 c = (i / p.spatial) % p.channels, n = i / (p.spatial * p.channels);
        i64 ng = n * p.groups + c / cpg;
        double mean = ((const double*)p.stats)[2 * ng] / len;
        double var = ((const double*)p.stats)[2 * ng + 1] / len - mean * mean;
        float inv = (float)(1.0 / sqrt((var > 0.0 ? var : 0.0) + (double)p.eps));
        float v = (ldf(p.x.dtype, p.x.ptr, gn_index(p, p.x, i)) - (float)mean) * inv;
        if (p.affine)
            v = v * ldf(p.w.dtype, p.w.ptr, p.w.offset + c * p.w.strides[0]) +
                ldf(p.b.dtype, p.b.ptr, p.b.offset + c * p.b.strides[0]);
        stf(p.out.dtype, p.out.ptr, gn_index(p, p.out, i), v);
    }
}

// Group norm, pass 1 as in group_norm_stats, eight elements per thread with 16-byte loads: contiguous operands,
// spatial size and offsets multiples of 8, chunks multiples of 8.
extern "C" __global__ void group_norm_stats8(GroupNormParams p) {
    __shared__ float scratch[32];
    i64 ng = blockIdx.y, n = ng / p.groups, g = ng % p.groups;
    i64 cpg = p.channels / p.groups, len = cpg * p.spatial;
    i64 base = p.x.offset + (n * p.channels + g * cpg) * p.spatial;
    i64 start = blockIdx.x * p.chunk, end = start + p.chunk < len ? start + p.chunk : len;
    float s = 0.f, ss = 0.f;
    for (i64 e = start + threadIdx.x * 8; e < end; e += blockDim.x * 8) {
        float v[8];
        load8(p.x.dtype, p.x.ptr, base + e, v);
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            s += v[j];
            ss += v[j] * v[j];
        }
    }
    s = block_sum(s, scratch);
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) {
        atomicAdd((double*)p.stats + 2 * ng, (double)s);
        atomicAdd((double*)p.stats + 2 * ng + 1, (double)ss);
    }
}

// Group norm, pass 2 for group_norm_apply8: per (sample, channel), the group's mean and the scale and shift that
// fold in the affine weights, so pass 3 does no division and no f64 arithmetic per element.
extern "C" __global__ void group_norm_coeffs(GroupNormParams p) {
    i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x;  // sample · channels + channel
    if (i >= p.x.shape[0] * p.channels) return;
    i64 c = i % p.channels, n = i / p.channels, cpg = p.channels / p.groups, ng = n * p.groups + c / cpg;
    double len = (double)(cpg * p.spatial);
    double mean = ((const double*)p.stats)[2 * ng] / len;
    double var = ((const double*)p.stats)[2 * ng + 1] / len - mean * mean;
    float scale = (float)(1.0 / sqrt((var > 0.0 ? var : 0.0) + (double)p.eps)), shift = 0.f;
    if (p.affine) {
        scale *= ldf(p.w.dtype, p.w.ptr, p.w.offset + c * p.w.strides[0]);
        shift = ldf(p.b.dtype, p.b.ptr, p.b.offset + c * p.b.strides[0]);
    }
    float* out = (float*)p.coeffs + 3 * i;
    out[0] = (float)mean;
    out[1] = scale;
    out[2] = shift;
}

// Group norm, pass 3: y = (x - mean)·scale + shift over one (sample, channel) plane per blockIdx.y, eight
// elements per thread (the same conditions as group_norm_stats8).
extern "C" __global__ void group_norm_apply8(GroupNormParams p) {
    const i64 nc = blockIdx.y;
    const float* k = (const float*)p.coeffs + 3 * nc;
    const float mean = k[0], scale = k[1], shift = k[2];
    const i64 xb = p.x.offset + nc * p.spatial, ob = p.out.offset + nc * p.spatial;
    for (i64 e = (blockIdx.x * (i64)blockDim.x + threadIdx.x) * 8; e < p.spatial; e += (i64)gridDim.x * blockDim.x * 8) {
        float v[8];
        load8(p.x.dtype, p.x.ptr, xb + e, v);
        #pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = (v[j] - mean) * scale + shift;
        store8(p.out.dtype, p.out.ptr, ob + e, v);
    }
}

// One block per (sample, group). Element e of the group: channel g*cpg + e / spatial, position e % spatial.
extern "C" __global__ void group_norm(GroupNormParams p) {
    __shared__ float scratch[32];
    i64 n = blockIdx.x / p.groups, g = blockIdx.x % p.groups;
    i64 cpg = p.channels / p.groups, len = cpg * p.spatial;
    i64 base = (n * p.channels + g * cpg) * p.spatial;  // logical flat index of the group's first element
    float s = 0.f;
    for (i64 e = threadIdx.x; e < len; e += blockDim.x) s += ldf(p.x.dtype, p.x.ptr, td_index(p.x, base + e));
    float mean = block_sum(s, scratch) / (float)len;
    float ss = 0.f;
    for (i64 e = threadIdx.x; e < len; e += blockDim.x) {
        float v = ldf(p.x.dtype, p.x.ptr, td_index(p.x, base + e)) - mean;
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / (float)len + p.eps);
    for (i64 e = threadIdx.x; e < len; e += blockDim.x) {
        float v = (ldf(p.x.dtype, p.x.ptr, td_index(p.x, base + e)) - mean) * inv;
        if (p.affine) {
            i64 c = g * cpg + e / p.spatial;
            v = v * ldf(p.w.dtype, p.w.ptr, p.w.offset + c * p.w.strides[0]) +
                ldf(p.b.dtype, p.b.ptr, p.b.offset + c * p.b.strides[0]);
        }
        stf(p.out.dtype, p.out.ptr, td_index(p.out, base + e), v);
    }
}

struct Im2colParams {
    TD x;       // [N, C, H, W]
    u64 cols;   // [C*KH*KW, OH*OW] of dtype `cols_dtype`, for sample `n`
    i64 n;
    int kh, kw, sh, sw, ph, pw;
    i64 oh, ow;
    int cols_dtype;
    int pad;
};

// One block per (column-matrix row, output row): the (c, ky, kx, oy) decomposition is done once per block and
// threads walk the output row, so reads along the input row and writes along the column row are contiguous and
// no thread divides per element (per-element 64-bit index division made this kernel the VAE decode's bottleneck).
extern "C" __global__ void im2col(Im2colParams p) {
    const i64 C = p.x.shape[1], H = p.x.shape[2], W = p.x.shape[3];
    const i64 cols_w = p.oh * p.ow, pairs = C * p.kh * p.kw * p.oh;
    for (i64 pr = blockIdx.x; pr < pairs; pr += gridDim.x) {
        const i64 oy = pr % p.oh, row = pr / p.oh;
        const i64 kx = row % p.kw, ky = (row / p.kw) % p.kh, c = row / (p.kw * p.kh);
        const i64 iy = oy * p.sh + ky - p.ph;
        const bool row_in = iy >= 0 && iy < H;
        const i64 in_base = p.x.offset + p.n * p.x.strides[0] + c * p.x.strides[1] + iy * p.x.strides[2];
        const i64 out_base = row * cols_w + oy * p.ow;
        for (i64 ox = threadIdx.x; ox < p.ow; ox += blockDim.x) {
            const i64 ix = ox * p.sw + kx - p.pw;
            float v = 0.f;
            if (row_in && ix >= 0 && ix < W) v = ldf(p.x.dtype, p.x.ptr, in_base + ix * p.x.strides[3]);
            stf(p.cols_dtype, p.cols, out_base + ox, v);
        }
    }
}

// im2col of 16-bit data into a 16-bit column matrix, eight output pixels per thread and one 16-byte store: the
// generic kernel's two-byte stores left the VAE's convolutions far below the memory bound. Needs the input's last
// stride 1, OW a multiple of 8 and C·KH·KW·OH·OW/8 below 2^31 (32-bit index arithmetic); the host checks.
extern "C" __global__ void im2col8_h(Im2colParams p) {
    const int H = (int)p.x.shape[2], W = (int)p.x.shape[3];
    const unsigned ow8 = (unsigned)(p.ow / 8), oh = (unsigned)p.oh, kw = p.kw, kh = p.kh;
    const unsigned total = (unsigned)p.x.shape[1] * kh * kw * oh * ow8;
    const unsigned short* x = (const unsigned short*)p.x.ptr + p.x.offset + p.n * p.x.strides[0];
    U4* cols = (U4*)p.cols;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const unsigned g8 = i % ow8, pr = i / ow8, oy = pr % oh, row = pr / oh;
        const unsigned kx = row % kw, t = row / kw, ky = t % kh, c = t / kh;
        const int iy = (int)oy * p.sh + (int)ky - p.ph;
        unsigned v[4] = {0u, 0u, 0u, 0u};
        if (iy >= 0 && iy < H) {
            const unsigned short* src = x + c * p.x.strides[1] + iy * p.x.strides[2];
            const int ix0 = (int)(g8 * 8) * p.sw + (int)kx - p.pw;
            #pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int ix = ix0 + e * p.sw;
                if (ix >= 0 && ix < W) v[e / 2] |= (unsigned)src[ix] << ((e & 1) * 16);
            }
        }
        cols[(u64)row * oh * ow8 + oy * ow8 + g8] = U4{v[0], v[1], v[2], v[3]};
    }
}
