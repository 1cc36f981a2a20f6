//! Fused multi-head attention, flash style: for each block of queries, walk the keys block by block keeping a
//! running max and denominator per row (online softmax), so only a `BQ×BK` tile of scores ever exists.
//! Tile products go through gemm. Parallel over batch×heads, and over query blocks within a head.
//! This is the portable path; where the AVX-512 kernel is enabled, [`attention`] hands over to [`crate::flash`].

use crate::math;
use crate::matmul::{gemm_f32, Mat};
use crate::norm::{param, rms_norm_row};
use crate::strided::{Scalar, View};
use gemm::Parallelism;
use rayon::prelude::*;
use sd3_core::Layout;

/// Queries per tile.
const BQ: usize = 64;
/// Keys per tile.
const BK: usize = 256;

/// One strided `[B, H, N, D]` operand.
pub struct Heads<'a, 'b> {
    pub view: View<'a>,
    pub layout: &'b Layout,
}

impl Heads<'_, '_> {
    pub(crate) fn row_start(&self, b: usize, h: usize, i: usize) -> usize {
        let s = &self.layout.strides;
        self.layout.offset + b * s[0] + h * s[1] + i * s[2]
    }
    /// Row `i` of head (b, h) as f32.
    pub(crate) fn load_row(&self, b: usize, h: usize, i: usize, out: &mut [f32]) {
        // SAFETY: the row lies inside the validated view.
        unsafe {
            f32::load_run(self.view.dtype, self.view.base(), self.row_start(b, h, i), self.layout.strides[3], out)
        }
    }
    pub(crate) fn store_row(&self, b: usize, h: usize, i: usize, vals: &[f32]) {
        // SAFETY: as `load_row`; each output row is written by exactly one task.
        unsafe {
            f32::store_run(self.view.dtype, self.view.base(), self.row_start(b, h, i), self.layout.strides[3], vals)
        }
    }
}

pub struct AttentionArgs<'a, 'b> {
    pub q: Heads<'a, 'b>,
    pub k: Heads<'a, 'b>,
    pub v: Heads<'a, 'b>,
    pub bias: Option<Heads<'a, 'b>>,
    /// RMS-norm weights for q and k, with epsilon.
    pub qk_norm: Option<(View<'a>, View<'a>, f32)>,
    pub out: Heads<'a, 'b>,
    pub scale: f32,
    pub causal: bool,
}

pub fn attention(args: &AttentionArgs) {
    if crate::sgemm::enabled() {
        return crate::flash::attention(args);
    }
    let qs = &args.q.layout.shape;
    let (nb, nh, nq, dh) = (qs[0], qs[1], qs[2], qs[3]);
    let nk = args.k.layout.shape[2];
    let dv = args.v.layout.shape[3];
    let norms = args.qk_norm.as_ref().map(|(qn, kn, eps)| (param(qn), param(kn), *eps));
    let q_blocks = nq.div_ceil(BQ);
    (0..nb * nh).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / nh, bh % nh);
        // This head's keys (normed) and values as contiguous f32 rows.
        let mut k = vec![0f32; nk * dh];
        let mut row = vec![0f32; dh];
        for (j, kr) in k.chunks_exact_mut(dh.max(1)).enumerate().take(nk) {
            match &norms {
                Some((_, kn, eps)) => {
                    args.k.load_row(b, h, j, &mut row);
                    rms_norm_row(&row, kn, *eps, kr);
                }
                None => args.k.load_row(b, h, j, kr),
            }
        }
        let mut v = vec![0f32; nk * dv];
        for (j, vr) in v.chunks_exact_mut(dv.max(1)).enumerate().take(nk) {
            args.v.load_row(b, h, j, vr);
        }
        (0..q_blocks).into_par_iter().for_each(|qb| {
            let i0 = qb * BQ;
            let rows = BQ.min(nq - i0);
            query_block(args, b, h, i0, rows, &k, &v, norms.as_ref(), (nk, dh, dv));
        });
    });
}

/// Attention of queries `i0..i0+rows` of head (b, h) against the prepared keys and values.
#[allow(clippy::too_many_arguments)]
fn query_block(
    args: &AttentionArgs,
    b: usize,
    h: usize,
    i0: usize,
    rows: usize,
    k: &[f32],
    v: &[f32],
    norms: Option<&(Vec<f32>, Vec<f32>, f32)>,
    (nk, dh, dv): (usize, usize, usize),
) {
    let mut q = vec![0f32; rows * dh];
    let mut tmp = vec![0f32; dh];
    for (i, qr) in q.chunks_exact_mut(dh.max(1)).enumerate().take(rows) {
        match norms {
            Some((qn, _, eps)) => {
                args.q.load_row(b, h, i0 + i, &mut tmp);
                rms_norm_row(&tmp, qn, *eps, qr);
            }
            None => args.q.load_row(b, h, i0 + i, qr),
        }
        math::scale_in_place(qr, args.scale);
    }
    let mut o = vec![0f32; rows * dv];
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut l = vec![0f64; rows];
    let mut s = vec![0f32; rows * BK];
    let mut bias_row = vec![0f32; BK];
    let last_query = i0 + rows - 1;
    let mut j0 = 0;
    while j0 < nk && !(args.causal && j0 > last_query) {
        let bk = BK.min(nk - j0);
        let s = &mut s[..rows * bk];
        // SAFETY: scratch and prepared matrices of exactly these shapes.
        unsafe {
            let qm = Mat { ptr: q.as_ptr(), rs: dh as isize, cs: 1 };
            let kt = Mat { ptr: k[j0 * dh..].as_ptr(), rs: 1, cs: dh as isize };
            gemm_f32(
                rows,
                bk,
                dh,
                Mat { ptr: s.as_mut_ptr(), rs: bk as isize, cs: 1 },
                false,
                qm,
                kt,
                Parallelism::None,
            );
        }
        for (i, sr) in s.chunks_exact_mut(bk).enumerate() {
            let qi = i0 + i;
            if let Some(bias) = &args.bias {
                let bs = bias.layout.strides.clone();
                let start = bias.layout.offset + b * bs[0] + h * bs[1] + qi * bs[2] + j0 * bs[3];
                // SAFETY: inside the validated bias view.
                unsafe { f32::load_run(bias.view.dtype, bias.view.base(), start, bs[3], &mut bias_row[..bk]) };
                sr.iter_mut().zip(&bias_row).for_each(|(s, &b)| *s += b);
            }
            if args.causal && j0 + bk > qi + 1 {
                sr[(qi + 1).saturating_sub(j0)..].fill(f32::NEG_INFINITY);
            }
            let mut mx = 0.0;
            math::max_of(sr, &mut mx);
            let m_new = m[i].max(mx);
            let orow = &mut o[i * dv..(i + 1) * dv];
            if m_new == f32::NEG_INFINITY {
                // Every key so far is masked: nothing to add yet.
                sr.fill(0.0);
                continue;
            }
            let corr = math::exp(m[i] - m_new);
            let mut sum = 0.0;
            math::exp_sub_sum(sr, m_new, &mut sum);
            l[i] = l[i] * corr as f64 + sum;
            m[i] = m_new;
            if corr != 1.0 {
                math::scale_in_place(orow, corr);
            }
        }
        // SAFETY: as above.
        unsafe {
            let p = Mat { ptr: s.as_ptr(), rs: bk as isize, cs: 1 };
            let vm = Mat { ptr: v[j0 * dv..].as_ptr(), rs: dv as isize, cs: 1 };
            gemm_f32(rows, dv, bk, Mat { ptr: o.as_mut_ptr(), rs: dv as isize, cs: 1 }, true, p, vm, Parallelism::None);
        }
        j0 += bk;
    }
    for (i, orow) in o.chunks_exact_mut(dv.max(1)).enumerate().take(rows) {
        math::scale_in_place(orow, (1.0 / l[i]) as f32);
        args.out.store_row(b, h, i0 + i, orow);
    }
}
