//! Row-wise ops over the last dim (softmax, layer norm, RMS norm, fused LN + modulate) and group norm.
//! Statistics are accumulated in f64, the rest is f32.

use crate::elementwise::CHUNK;
use crate::math;
use crate::math::simd_fn;
use crate::par_ranges;
use crate::strided::View;

/// Run `f(row_inputs, row_output)` on every row of length `d` (parallel over blocks of rows).
fn map_rows(ins: &[View], out: &View, d: usize, f: impl Fn(&[&[f32]], &mut [f32]) + Sync) {
    if d == 0 {
        return;
    }
    let rows = out.len() / d;
    par_ranges(rows, (CHUNK / d).max(1), |r0, nr| {
        let mut scratch: Vec<Vec<f32>> = vec![Vec::new(); ins.len()];
        let mut tmp = Vec::new();
        for r in r0..r0 + nr {
            let slices: Vec<&[f32]> =
                ins.iter().zip(scratch.iter_mut()).map(|(v, s)| v.read_f32(r * d, d, s)).collect();
            // SAFETY: each row of the output is written by one task only; outputs never alias inputs.
            match unsafe { out.f32_slice_mut(r * d, d) } {
                Some(o) => f(&slices, o),
                None => {
                    tmp.resize(d, 0.0);
                    f(&slices, &mut tmp);
                    out.scatter(r * d, &tmp);
                }
            }
        }
    });
}

/// A 1-D parameter (norm weight or bias) as f32.
pub fn param(v: &View) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    v.gather(0, &mut out);
    out
}

pub fn softmax(x: &View, y: &View, d: usize) {
    map_rows(&[*x], y, d, |i, o| {
        o.copy_from_slice(i[0]);
        let mut mx = 0.0;
        math::max_of(o, &mut mx);
        let mut sum = 0.0;
        math::exp_sub_sum(o, mx, &mut sum);
        math::scale_in_place(o, (1.0 / sum) as f32);
    });
}

/// `(x - mean) / sqrt(var + eps)` into `o`.
fn normalize(x: &[f32], eps: f32, o: &mut [f32]) {
    let (mean, var) = math::mean_var(x);
    let inv = (1.0 / (var + eps as f64).sqrt()) as f32;
    let (hi, lo) = math::split(mean);
    shift_scale(x, hi, lo, inv, o);
}

simd_fn! {
    /// `o = ((x - hi) - lo) · scale`.
    fn shift_scale(x: &[f32], hi: f32, lo: f32, scale: f32, o: &mut [f32]) {
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = ((x - hi) - lo) * scale);
    }
}

simd_fn! {
    /// `o = ((x - hi) - lo) · inv · (1 + s) + h`.
    fn normalize_modulate(x: &[f32], hi: f32, lo: f32, inv: f32, s: &[f32], h: &[f32], o: &mut [f32]) {
        for (o, (&x, (&s, &h))) in o.iter_mut().zip(x.iter().zip(s.iter().zip(h))) {
            *o = ((x - hi) - lo) * inv * (1.0 + s) + h;
        }
    }
}

pub fn layer_norm(x: &View, wb: Option<(&View, &View)>, y: &View, d: usize, eps: f32) {
    let wb = wb.map(|(w, b)| (param(w), param(b)));
    map_rows(&[*x], y, d, |i, o| {
        normalize(i[0], eps, o);
        if let Some((w, b)) = &wb {
            o.iter_mut().zip(w.iter().zip(b)).for_each(|(o, (&w, &b))| *o = *o * w + b);
        }
    });
}

pub fn rms_norm(x: &View, w: &View, y: &View, d: usize, eps: f32) {
    let w = param(w);
    map_rows(&[*x], y, d, |i, o| rms_norm_row(i[0], &w, eps, o));
}

/// `x / sqrt(mean(x²) + eps) · w` into `o` (also attention's qk-norm).
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, o: &mut [f32]) {
    let (_, sq) = math::sum_and_sq(x);
    let inv = (1.0 / (sq / x.len().max(1) as f64 + eps as f64).sqrt()) as f32;
    o.iter_mut().zip(x.iter().zip(w)).for_each(|(o, (&x, &w))| *o = x * inv * w);
}

pub fn layer_norm_modulate(x: &View, scale: &View, shift: &View, y: &View, d: usize, eps: f32) {
    map_rows(&[*x, *scale, *shift], y, d, |i, o| {
        let (mean, var) = math::mean_var(i[0]);
        let inv = (1.0 / (var + eps as f64).sqrt()) as f32;
        let (hi, lo) = math::split(mean);
        normalize_modulate(i[0], hi, lo, inv, i[1], i[2], o);
    });
}

/// Group norm of `x [N, C, spatial...]`: each (sample, group) is a contiguous range of the logical order.
pub fn group_norm(x: &View, wb: Option<(&View, &View)>, y: &View, shape: &[usize], groups: usize, eps: f32) {
    let wb = wb.map(|(w, b)| (param(w), param(b)));
    let (n, c) = (shape[0], shape[1]);
    let spatial: usize = shape[2..].iter().product();
    let per_group = c / groups;
    let len = per_group * spatial;
    if len == 0 {
        return;
    }
    par_ranges(n * groups, 1, |q0, nq| {
        let mut buf = vec![0f32; len];
        let mut out = vec![0f32; len];
        for q in q0..q0 + nq {
            x.gather(q * len, &mut buf);
            normalize(&buf, eps, &mut out);
            if let Some((w, b)) = &wb {
                let c0 = (q % groups) * per_group;
                for (j, chunk) in out.chunks_exact_mut(spatial).enumerate() {
                    let (w, b) = (w[c0 + j], b[c0 + j]);
                    chunk.iter_mut().for_each(|v| *v = *v * w + b);
                }
            }
            y.scatter(q * len, &out);
        }
    });
}
