//! Flash attention on the AVX-512 micro-kernel of [`crate::sgemm`], with every operand pre-packed so that no
//! tile product re-packs anything:
//!
//! - per head: keys (RMS-normed) packed as `MR`-key A panels, values as `NR`-column B panels;
//! - per block of `BQ` queries: the (normed, scaled) queries packed transposed as B panels;
//! - per tile of `BK` keys: `Sᵀ = K·Qᵀ` (keys × queries), so the online softmax runs down columns and every
//!   step is a vector op across queries; `P = exp(Sᵀ − m)` is then re-laid as A panels (12 contiguous floats
//!   per key) and `O += P·V` accumulates in registers.

use crate::attention::AttentionArgs;
use crate::math::{self, simd_fn};
use crate::norm::{param, rms_norm_row};
use crate::sgemm::{kernel, Strided, MR, NR};
use rayon::prelude::*;

/// Queries per block: a multiple of both MR and NR.
const BQ: usize = 96;
/// Keys per tile: a multiple of MR.
const BK: usize = 240;

pub fn attention(args: &AttentionArgs) {
    let qs = &args.q.layout.shape;
    let (nb, nh, nq, dh) = (qs[0], qs[1], qs[2], qs[3]);
    let nk = args.k.layout.shape[2];
    let dv = args.v.layout.shape[3];
    let norms = args.qk_norm.as_ref().map(|(qn, kn, eps)| (param(qn), param(kn), *eps));
    let nk_pad = nk.next_multiple_of(MR);
    let dv_pad = dv.next_multiple_of(NR);
    (0..nb * nh).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / nh, bh % nh);
        // Keys as A panels: panel g holds keys 12g.., laid out [dh][MR].
        let mut kp = vec![0f32; nk_pad * dh];
        let mut row = vec![0f32; dh.max(dv)];
        let mut normed = vec![0f32; dh];
        for j in 0..nk {
            let r = &mut row[..dh];
            args.k.load_row(b, h, j, r);
            let r = match &norms {
                Some((_, kn, eps)) => {
                    rms_norm_row(r, kn, *eps, &mut normed);
                    &normed
                }
                None => &*r,
            };
            let (g, t) = (j / MR, j % MR);
            for (p, &v) in r.iter().enumerate() {
                kp[(g * dh + p) * MR + t] = v;
            }
        }
        // Values as B panels: panel c holds columns 32c.., laid out [key][NR].
        let mut vp = vec![0f32; dv_pad * nk_pad];
        for j in 0..nk {
            let r = &mut row[..dv];
            args.v.load_row(b, h, j, r);
            for (col, &v) in r.iter().enumerate() {
                vp[((col / NR) * nk_pad + j) * NR + col % NR] = v;
            }
        }
        let shared = Head { kp: &kp, vp: &vp, nk, nk_pad, dh, dv, dv_pad };
        (0..nq.div_ceil(BQ)).into_par_iter().for_each(|qb| {
            let i0 = qb * BQ;
            query_block(args, &shared, norms.as_ref(), b, h, i0, BQ.min(nq - i0));
        });
    });
}

/// One head's packed keys and values.
struct Head<'a> {
    kp: &'a [f32],
    vp: &'a [f32],
    nk: usize,
    nk_pad: usize,
    dh: usize,
    dv: usize,
    dv_pad: usize,
}

fn query_block(
    args: &AttentionArgs,
    hd: &Head,
    norms: Option<&(Vec<f32>, Vec<f32>, f32)>,
    b: usize,
    h: usize,
    i0: usize,
    rows: usize,
) {
    let Head { kp, vp, nk, nk_pad, dh, dv, dv_pad } = *hd;
    // Queries, transposed, as B panels: panel c holds queries 32c.., laid out [dh][NR].
    let mut qp = vec![0f32; BQ * dh];
    let mut row = vec![0f32; dh];
    let mut normed = vec![0f32; dh];
    for i in 0..rows {
        args.q.load_row(b, h, i0 + i, &mut row);
        if let Some((qn, _, eps)) = norms {
            rms_norm_row(&row, qn, *eps, &mut normed);
            row.copy_from_slice(&normed);
        }
        for (p, &v) in row.iter().enumerate() {
            qp[((i / NR) * dh + p) * NR + i % NR] = v * args.scale;
        }
    }
    let mut st = vec![0f32; BK * BQ]; // Sᵀ tile, keys × queries
    let mut pp = vec![0f32; BQ * BK]; // P as A panels
    let mut o = vec![0f32; BQ * dv_pad];
    let mut m = [f32::NEG_INFINITY; BQ];
    let mut l = [0f32; BQ];
    let mut bias_row = vec![0f32; BK];
    let q_panels = rows.div_ceil(NR);
    let o_row_panels = rows.div_ceil(MR);
    let last_query = i0 + rows - 1;
    let mut j0 = 0;
    while j0 < nk && !(args.causal && j0 > last_query) {
        let bk = BK.min(nk - j0);
        // Sᵀ = K[j0..j0+bk]·Qᵀ.
        for g in 0..bk.div_ceil(MR) {
            let mr = MR.min(bk - g * MR);
            for c in 0..q_panels {
                let dst = Strided { ptr: st[g * MR * BQ + c * NR..].as_mut_ptr(), rs: BQ as isize, cs: 1 };
                // SAFETY: AVX-512 checked by the caller; panels and tile sized above.
                unsafe {
                    kernel(dh, kp[(j0 / MR + g) * dh * MR..].as_ptr(), qp[c * dh * NR..].as_ptr(), dst, true, mr, NR)
                };
            }
        }
        if let Some(bias) = &args.bias {
            let bs = &bias.layout.strides;
            for i in 0..rows {
                let start = bias.layout.offset + b * bs[0] + h * bs[1] + (i0 + i) * bs[2] + j0 * bs[3];
                // SAFETY: inside the validated bias view.
                unsafe {
                    <f32 as crate::strided::Scalar>::load_run(
                        bias.view.dtype,
                        bias.view.base(),
                        start,
                        bs[3],
                        &mut bias_row[..bk],
                    )
                };
                for (j, &bv) in bias_row[..bk].iter().enumerate() {
                    st[j * BQ + i] += bv;
                }
            }
        }
        if args.causal {
            // Key j0+j is hidden from queries before it.
            for j in 0..bk {
                let hidden = (j0 + j).saturating_sub(i0).min(rows);
                st[j * BQ..j * BQ + hidden].fill(f32::NEG_INFINITY);
            }
        }
        let mut sub = [0f32; BQ];
        let mut corr = [0f32; BQ];
        online_softmax(&mut st[..bk * BQ], &mut m, &mut l, &mut sub, &mut corr);
        if corr[..rows].iter().any(|&c| c != 1.0) {
            for (i, orow) in o.chunks_exact_mut(dv_pad).enumerate().take(rows) {
                math::scale_in_place(orow, corr[i]);
            }
        }
        // P as A panels: panel g holds queries 12g.., laid out [key][MR].
        for g in 0..o_row_panels {
            let panel = &mut pp[g * bk * MR..(g + 1) * bk * MR];
            for (j, dst) in panel.chunks_exact_mut(MR).enumerate() {
                dst.copy_from_slice(&st[j * BQ + g * MR..j * BQ + (g + 1) * MR]);
            }
        }
        // O += P·V[j0..j0+bk].
        for g in 0..o_row_panels {
            for c in 0..dv_pad / NR {
                let dst = Strided { ptr: o[g * MR * dv_pad + c * NR..].as_mut_ptr(), rs: dv_pad as isize, cs: 1 };
                let v_tile = vp[(c * nk_pad + j0) * NR..].as_ptr();
                // SAFETY: as above.
                unsafe { kernel(bk, pp[g * bk * MR..].as_ptr(), v_tile, dst, false, MR, NR) };
            }
        }
        j0 += bk;
    }
    for (i, orow) in o.chunks_exact_mut(dv_pad).enumerate().take(rows) {
        let orow = &mut orow[..dv];
        math::scale_in_place(orow, 1.0 / l[i]);
        args.out.store_row(b, h, i0 + i, orow);
    }
}

simd_fn! {
    /// One online-softmax step down the columns of `st` (rows of BQ queries): update the running max `m`
    /// and denominator `l`, replace scores by `exp(s - m)`, and return in `corr` the factor that rescales
    /// what was accumulated before. Columns that have seen only -inf keep weight 0.
    fn online_softmax(st: &mut [f32], m: &mut [f32; BQ], l: &mut [f32; BQ], sub: &mut [f32; BQ], corr: &mut [f32; BQ]) {
        let mut mx = [f32::NEG_INFINITY; BQ];
        for r in st.chunks_exact(BQ) {
            for i in 0..BQ {
                mx[i] = if r[i] > mx[i] { r[i] } else { mx[i] };
            }
        }
        for i in 0..BQ {
            let m_new = if mx[i] > m[i] { mx[i] } else { m[i] };
            sub[i] = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
            corr[i] = math::exp(m[i] - sub[i]);
            m[i] = m_new;
        }
        let mut sum = [0f32; BQ];
        for r in st.chunks_exact_mut(BQ) {
            for i in 0..BQ {
                r[i] = math::exp(r[i] - sub[i]);
                sum[i] += r[i];
            }
        }
        for i in 0..BQ {
            l[i] = l[i] * corr[i] + sum[i];
        }
    }
}
