//! Row kernels over the last dim: softmax, layer norm, RMS norm, fused adaLN (layer norm + modulate).
//! Each row is streamed into a local f32 buffer, reduced with f64 accumulators, and written back.

use super::Operand;
use crate::par::par_for;

fn grain(row_len: usize) -> usize {
    (8192 / row_len.max(1)).max(1)
}

/// Run `f(row_index, row)` on each row of `x` loaded as f32, then store the row into `out`.
fn for_each_row(x: &Operand, out: &Operand, f: impl Fn(usize, &mut [f32]) + Sync) {
    let d = out.row_len();
    let (xs, os) = (x.row_stride(), out.row_stride());
    par_for(out.rows(), grain(d), |range| {
        let mut row = vec![0f32; d];
        for r in range {
            let (xb, ob) = (x.row_base(r), out.row_base(r));
            // SAFETY: bounds-checked views; rows are split between threads.
            unsafe {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = x.load(xb + j * xs);
                }
                f(r, &mut row);
                for (j, &v) in row.iter().enumerate() {
                    out.store(ob + j * os, v);
                }
            }
        }
    });
}

/// Load a rank-1 parameter (`[D]`) as f32.
pub fn load_vec(p: &Operand) -> Vec<f32> {
    let n = p.row_len();
    let (b, s) = (p.row_base(0), p.row_stride());
    // SAFETY: bounds-checked view of n elements.
    (0..n).map(|j| unsafe { p.load(b + j * s) }).collect()
}

/// `(x - mean) / sqrt(var + eps)` in place (biased variance).
pub fn normalize(row: &mut [f32], eps: f32) {
    let d = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d;
    let inv = (1.0 / (var + eps as f64).sqrt()) as f32;
    let mean = mean as f32;
    row.iter_mut().for_each(|v| *v = (*v - mean) * inv);
}

/// `x / sqrt(mean(x²) + eps) · w` in place.
pub fn rms_normalize(row: &mut [f32], w: &[f32], eps: f32) {
    let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / row.len() as f64;
    let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
    row.iter_mut().zip(w).for_each(|(v, w)| *v = *v * inv * w);
}

pub fn softmax(x: &Operand, out: &Operand) {
    for_each_row(x, out, |_, row| {
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f64;
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            sum += *v as f64;
        }
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    });
}

pub fn layer_norm(x: &Operand, affine: Option<(&Operand, &Operand)>, out: &Operand, eps: f32) {
    let wb = affine.map(|(w, b)| (load_vec(w), load_vec(b)));
    for_each_row(x, out, |_, row| {
        normalize(row, eps);
        if let Some((w, b)) = &wb {
            for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
                *v = *v * w + b;
            }
        }
    });
}

pub fn rms_norm(x: &Operand, w: &Operand, out: &Operand, eps: f32) {
    let w = load_vec(w);
    for_each_row(x, out, |_, row| rms_normalize(row, &w, eps));
}

/// Fused adaLN: `LN(x)·(1 + scale) + shift`, scale and shift of x's shape (broadcast views).
pub fn layer_norm_modulate(x: &Operand, scale: &Operand, shift: &Operand, out: &Operand, eps: f32) {
    let (ss, hs) = (scale.row_stride(), shift.row_stride());
    for_each_row(x, out, |r, row| {
        normalize(row, eps);
        let (sb, hb) = (scale.row_base(r), shift.row_base(r));
        for (j, v) in row.iter_mut().enumerate() {
            // SAFETY: bounds-checked views of x's shape.
            unsafe { *v = *v * (1.0 + scale.load(sb + j * ss)) + shift.load(hb + j * hs) };
        }
    });
}
