//! 2-D convolution (NCHW, OIHW) as im2col + gemm over blocks of output rows, so the column matrix stays
//! cache-sized. 1×1 stride-1 unpadded convolutions skip im2col (the input rows are the column matrix).

use crate::matmul::{gemm_f32, Mat};
use crate::norm::param;
use crate::strided::{Scalar, View};
use gemm::Parallelism;
use rayon::prelude::*;
use sd3_core::{DType, Layout};

/// Target size of one block's column matrix, in f32 elements (2 MiB).
const COL_ELEMS: usize = 512 * 1024;

pub struct ConvArgs<'a, 'b> {
    pub x: View<'a>,
    pub xl: &'b Layout,
    pub w: View<'a>,
    pub bias: Option<View<'a>>,
    pub y: View<'a>,
    pub yl: &'b Layout,
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    /// Kernel height and width.
    pub kernel: [usize; 2],
}

pub fn conv2d(a: &ConvArgs) {
    let (n, c, h, w) = (a.xl.shape[0], a.xl.shape[1], a.xl.shape[2], a.xl.shape[3]);
    let (o, oh, ow) = (a.yl.shape[1], a.yl.shape[2], a.yl.shape[3]);
    let [kh, kw] = a.kernel;
    let ckk = c * kh * kw;
    if n * o * oh * ow == 0 {
        return;
    }
    let weights = param(&a.w); // [O, C·KH·KW] row-major, transient f32
    let bias = a.bias.as_ref().map(param);
    let threads = rayon::current_num_threads();
    let mut rows = (COL_ELEMS / (ckk * ow).max(1)).clamp(1, oh);
    // Enough blocks for every thread when the image is small.
    rows = rows.min((n * oh).div_ceil(2 * threads).max(1));
    let blocks = oh.div_ceil(rows);
    let tasks = n * blocks;
    let par = if tasks >= threads { Parallelism::None } else { Parallelism::Rayon(0) };
    let run = |t: usize| {
        let (ni, y0) = (t / blocks, (t % blocks) * rows);
        let nr = rows.min(oh - y0);
        conv_block(a, &weights, bias.as_deref(), ni, y0, nr, par, [c, h, w, o, oh, ow]);
    };
    if tasks >= threads {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// Output rows `y0..y0+nr` of sample `ni`.
#[allow(clippy::too_many_arguments)]
fn conv_block(
    a: &ConvArgs,
    weights: &[f32],
    bias: Option<&[f32]>,
    ni: usize,
    y0: usize,
    nr: usize,
    par: Parallelism,
    [c, h, w, o, oh, ow]: [usize; 6],
) {
    let [kh, kw] = a.kernel;
    let [sy, sx] = a.stride;
    let [py, px] = a.padding;
    let cols = nr * ow;
    // Input rows this block reads, clamped to the image.
    let iy_lo = (y0 * sy).saturating_sub(py);
    let iy_hi = ((y0 + nr - 1) * sy + kh).saturating_sub(py).min(h);
    let in_rows = iy_hi.saturating_sub(iy_lo);
    let xs = &a.xl.strides;
    let mut xin = vec![0f32; c * in_rows * w];
    for ci in 0..c {
        for r in 0..in_rows {
            let start = a.xl.offset + ni * xs[0] + ci * xs[1] + (iy_lo + r) * xs[2];
            let dst = &mut xin[(ci * in_rows + r) * w..(ci * in_rows + r + 1) * w];
            // SAFETY: the row lies inside the validated input view.
            unsafe { f32::load_run(a.x.dtype, a.x.base(), start, xs[3], dst) };
        }
    }
    let pointwise = kh == 1 && kw == 1 && sy == 1 && sx == 1 && py == 0 && px == 0;
    let col = if pointwise { xin } else { im2col(&xin, in_rows, iy_lo, y0, nr, [c, h, w, ow], a) };

    // Output block [O, nr·OW]: straight into y when its rows are contiguous f32, else via scratch.
    let ys = &a.yl.strides;
    let y_start = a.yl.offset + ni * ys[0] + y0 * ys[2];
    let direct = a.y.dtype == DType::F32 && ys[3] == 1 && (ys[2] == ow || nr == 1);
    let mut tmp = Vec::new();
    let dst = if direct {
        Mat { ptr: a.y.elem_ptr::<f32>(y_start), rs: ys[1] as isize, cs: 1 }
    } else {
        tmp.resize(o * cols, 0f32);
        Mat { ptr: tmp.as_mut_ptr(), rs: cols as isize, cs: 1 }
    };
    // SAFETY: dst is this task's block of y (or scratch); weights and col are scratch of these shapes.
    unsafe {
        if let Some(b) = bias {
            for (oi, &bv) in b.iter().enumerate() {
                let row = std::slice::from_raw_parts_mut((dst.ptr as *mut f32).offset(oi as isize * dst.rs), cols);
                row.fill(bv);
            }
        }
        let wm = Mat { ptr: weights.as_ptr(), rs: (c * kh * kw) as isize, cs: 1 };
        let cm = Mat { ptr: col.as_ptr(), rs: cols as isize, cs: 1 };
        gemm_f32(o, cols, c * kh * kw, dst, bias.is_some(), wm, cm, par);
    }
    if !direct {
        for (oi, row) in tmp.chunks_exact(cols).enumerate() {
            a.y.scatter(((ni * o + oi) * oh + y0) * ow, row);
        }
    }
}

/// Column matrix `[C·KH·KW, nr·OW]` of output rows `y0..y0+nr` from the staged input rows.
fn im2col(
    xin: &[f32],
    in_rows: usize,
    iy_lo: usize,
    y0: usize,
    nr: usize,
    [c, h, w, ow]: [usize; 4],
    a: &ConvArgs,
) -> Vec<f32> {
    let [kh, kw] = a.kernel;
    let [sy, sx] = a.stride;
    let [py, px] = a.padding;
    let cols = nr * ow;
    let mut col = vec![0f32; c * kh * kw * cols];
    for ci in 0..c {
        for ky in 0..kh {
            for kx in 0..kw {
                let crow = &mut col[((ci * kh + ky) * kw + kx) * cols..][..cols];
                // Output columns whose input column is inside the image: ix = ox·sx + kx - px in 0..w.
                let ox_lo = px.saturating_sub(kx).div_ceil(sx);
                let ox_hi = if w + px > kx { ((w + px - kx - 1) / sx + 1).min(ow) } else { 0 };
                for r in 0..nr {
                    let iy = (y0 + r) * sy + ky;
                    if iy < py || iy - py >= h {
                        continue;
                    }
                    let src = &xin[(ci * in_rows + (iy - py - iy_lo)) * w..][..w];
                    let dst = &mut crow[r * ow..(r + 1) * ow];
                    if ox_lo >= ox_hi {
                        continue;
                    }
                    if sx == 1 {
                        let ix0 = ox_lo + kx - px;
                        dst[ox_lo..ox_hi].copy_from_slice(&src[ix0..ix0 + (ox_hi - ox_lo)]);
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate().take(ox_hi).skip(ox_lo) {
                            *d = src[ox * sx + kx - px];
                        }
                    }
                }
            }
        }
    }
    col
}
