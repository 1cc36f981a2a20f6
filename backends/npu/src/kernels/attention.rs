//! Fused multi-head attention, flash style: `o = softmax(scale·q̃·k̃ᵀ + bias + causal) · v`.
//!
//! Work items are `(batch, head, block of QB queries)`. Keys and values stream through in tiles of KB rows
//! (local buffers); scores never exist beyond a `QB × KB` tile, and the softmax is computed online (running max
//! and sum per query, rescaling the accumulator when the max grows). q̃, k̃ are RMS-normed per head when
//! `qk_norm`.

use super::rows::{load_vec, rms_normalize};
use super::Operand;
use crate::par::par_for;

const QB: usize = 32;
const KB: usize = 64;

pub struct AttentionArgs<'a> {
    pub q: &'a Operand,
    pub k: &'a Operand,
    pub v: &'a Operand,
    pub bias: Option<&'a Operand>,
    /// RMS weights for q and k, and the epsilon.
    pub qk_norm: Option<(&'a Operand, &'a Operand, f32)>,
    pub out: &'a Operand,
    pub scale: f32,
    pub causal: bool,
}

/// Load rows `r0..r0+n` of the `(b, h)` matrix of a `[B, H, N, D]` operand into `dst` (row-major, `d` wide).
unsafe fn load_rows(t: &Operand, b: usize, h: usize, r0: usize, n: usize, dst: &mut [f32]) {
    let s = &t.layout.strides;
    let d = t.shape()[3];
    let base = t.layout.offset + b * s[0] + h * s[1];
    for i in 0..n {
        for c in 0..d {
            dst[i * d + c] = t.load(base + (r0 + i) * s[2] + c * s[3]);
        }
    }
}

pub fn attention(a: &AttentionArgs) {
    let qs = a.q.shape();
    let (bn, hn, nq, dh) = (qs[0], qs[1], qs[2], qs[3]);
    let nk = a.k.shape()[2];
    let dv = a.v.shape()[3];
    let norms = a.qk_norm.map(|(qw, kw, eps)| (load_vec(qw), load_vec(kw), eps));
    let qblocks = nq.div_ceil(QB);
    par_for(bn * hn * qblocks, 1, |items| {
        let mut qt = vec![0f32; QB * dh];
        let mut kt = vec![0f32; KB * dh];
        let mut vt = vec![0f32; KB * dv];
        let mut s = vec![0f32; KB];
        let mut acc = vec![0f32; QB * dv];
        let mut mx = [f32::NEG_INFINITY; QB];
        let mut sum = [0f32; QB];
        for it in items {
            let (bh, qb) = (it / qblocks, it % qblocks);
            let (b, h) = (bh / hn, bh % hn);
            let i0 = qb * QB;
            let qn = QB.min(nq - i0);
            // SAFETY (whole block): rows and columns are inside the bounds-checked q, k, v, bias and out views.
            unsafe {
                load_rows(a.q, b, h, i0, qn, &mut qt);
                if let Some((qw, _, eps)) = &norms {
                    qt[..qn * dh].chunks_mut(dh).for_each(|row| rms_normalize(row, qw, *eps));
                }
                acc[..qn * dv].fill(0.0);
                mx.fill(f32::NEG_INFINITY);
                sum.fill(0.0);
                for j0 in (0..nk).step_by(KB) {
                    let kn = KB.min(nk - j0);
                    if a.causal && j0 > i0 + qn - 1 {
                        break;
                    }
                    load_rows(a.k, b, h, j0, kn, &mut kt);
                    load_rows(a.v, b, h, j0, kn, &mut vt);
                    if let Some((_, kw, eps)) = &norms {
                        kt[..kn * dh].chunks_mut(dh).for_each(|row| rms_normalize(row, kw, *eps));
                    }
                    for i in 0..qn {
                        let qrow = &qt[i * dh..(i + 1) * dh];
                        let mut tile_max = f32::NEG_INFINITY;
                        for j in 0..kn {
                            let krow = &kt[j * dh..(j + 1) * dh];
                            let mut dot = qrow.iter().zip(krow).map(|(x, y)| x * y).sum::<f32>() * a.scale;
                            if let Some(bias) = a.bias {
                                let bs = &bias.layout.strides;
                                dot += bias.load(
                                    bias.layout.offset + b * bs[0] + h * bs[1] + (i0 + i) * bs[2] + (j0 + j) * bs[3],
                                );
                            }
                            if a.causal && j0 + j > i0 + i {
                                dot = f32::NEG_INFINITY;
                            }
                            s[j] = dot;
                            tile_max = tile_max.max(dot);
                        }
                        let new_max = mx[i].max(tile_max);
                        if new_max == f32::NEG_INFINITY {
                            continue;
                        }
                        let correction = (mx[i] - new_max).exp();
                        mx[i] = new_max;
                        let arow = &mut acc[i * dv..(i + 1) * dv];
                        arow.iter_mut().for_each(|x| *x *= correction);
                        let mut tile_sum = 0f32;
                        for j in 0..kn {
                            let p = (s[j] - new_max).exp();
                            tile_sum += p;
                            for (x, &vv) in arow.iter_mut().zip(&vt[j * dv..(j + 1) * dv]) {
                                *x += p * vv;
                            }
                        }
                        sum[i] = sum[i] * correction + tile_sum;
                    }
                }
                let os = &a.out.layout.strides;
                let ob = a.out.layout.offset + b * os[0] + h * os[1];
                for i in 0..qn {
                    let inv = 1.0 / sum[i];
                    for c in 0..dv {
                        a.out.store(ob + (i0 + i) * os[2] + c * os[3], acc[i * dv + c] * inv);
                    }
                }
            }
        }
    });
}

/// The gradients of plain self-attention (`Op::AttentionBackward`), as Ascend's fused attention-score gradient
/// computes them: per `(batch, head)`, the probabilities row by row from `q`, `k` (never stored as a matrix),
/// `D = rowsum(do ∘ o)`, then `dv += pᵀ·do`, `dS = p ∘ (do·vᵀ − D)`, `dq = scale·dS·k`, `dk += scale·dSᵀ·q`.
/// Operands `[B, H, N, D]`; `out` is `[3, B, H, N, D]` = (dq, dk, dv).
pub fn attention_backward(ins: [&Operand; 5], out: &Operand, scale: f32, causal: bool) {
    let s = ins[0].shape();
    let (bn, hn, n, d) = (s[0], s[1], s[2], s[3]);
    par_for(bn * hn, 1, |items| {
        let mut rows: Vec<Vec<f32>> = vec![vec![0f32; n * d]; 5];
        let (mut dk, mut dv, mut dq_row) = (vec![0f32; n * d], vec![0f32; n * d], vec![0f32; d]);
        let mut p = vec![0f32; n];
        for bh in items {
            let (b, h) = (bh / hn, bh % hn);
            // SAFETY (whole item): rows and columns are inside the bounds-checked operand views, and each item
            // writes only its own (b, h) slice of the output.
            unsafe {
                for (t, dst) in ins.iter().zip(rows.iter_mut()) {
                    load_rows(t, b, h, 0, n, dst);
                }
                let [q, k, v, o, d_o] = [&rows[0], &rows[1], &rows[2], &rows[3], &rows[4]];
                dk.fill(0.0);
                dv.fill(0.0);
                let os = &out.layout.strides;
                let at = |part: usize, i: usize, c: usize| {
                    out.layout.offset + part * os[0] + b * os[1] + h * os[2] + i * os[3] + c * os[4]
                };
                for i in 0..n {
                    let (qi, doi) = (&q[i * d..(i + 1) * d], &d_o[i * d..(i + 1) * d]);
                    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
                    let keys = if causal { i + 1 } else { n };
                    let mut mx = f32::NEG_INFINITY;
                    for j in 0..keys {
                        p[j] = scale * dot(qi, &k[j * d..(j + 1) * d]);
                        mx = mx.max(p[j]);
                    }
                    let mut sum = 0f32;
                    p[..keys].iter_mut().for_each(|x| {
                        *x = (*x - mx).exp();
                        sum += *x;
                    });
                    let delta = dot(doi, &o[i * d..(i + 1) * d]);
                    dq_row.fill(0.0);
                    for j in 0..keys {
                        let pj = p[j] / sum;
                        let ds = pj * (dot(doi, &v[j * d..(j + 1) * d]) - delta) * scale;
                        for c in 0..d {
                            dv[j * d + c] += pj * doi[c];
                            dk[j * d + c] += ds * qi[c];
                            dq_row[c] += ds * k[j * d + c];
                        }
                    }
                    for (c, &x) in dq_row.iter().enumerate() {
                        out.store(at(0, i, c), x);
                    }
                }
                for i in 0..n {
                    for c in 0..d {
                        out.store(at(1, i, c), dk[i * d + c]);
                        out.store(at(2, i, c), dv[i * d + c]);
                    }
                }
            }
        }
    });
}
