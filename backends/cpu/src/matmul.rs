//! Batched matmul with f32 accumulation, bias and activation fused: [`crate::sgemm`] where the CPU has AVX-512, else
//! the `gemm` crate. The activation runs on each task's output block right after its product, while it is in cache.
//!
//! f32 operands go to the kernel in place with their strides (any strides, including batch stride 0). Other dtypes
//! are converted transiently: the left operand (activations) once per call, the right operand (weights) one
//! panel of columns at a time, so f16/bf16 weights never exist as a full f32 copy.

use crate::sgemm::{self, Strided};
use crate::strided::{Scalar, View};
use gemm::Parallelism;
use rayon::prelude::*;
use sd3_core::{DType, Layout, UnaryOp};

/// Width bounds of a converted right-hand panel (K×width f32 scratch per task).
const MIN_PANEL: usize = 128;
const MAX_PANEL: usize = 1024;

/// Element strides of one operand of `gemm::<f32>`: base pointer, row stride, column stride.
#[derive(Clone, Copy)]
pub struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a plain description of memory owned by the op's operands or a task's scratch; see `gemm_f32`.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// `dst (+)= lhs·rhs` for `m×k` by `k×n` f32 matrices; `accumulate` keeps dst's contents (alpha = 1).
///
/// # Safety
/// The matrices must be valid for their shapes and strides, dst writable and disjoint from lhs and rhs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(m: usize, n: usize, k: usize, dst: Mat, accumulate: bool, lhs: Mat, rhs: Mat, par: Parallelism) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    unsafe { *(dst.ptr as *mut f32).offset(i as isize * dst.rs + j as isize * dst.cs) = 0.0 };
                }
            }
        }
        return;
    }
    if sgemm::enabled() && m * n * k >= 32 * 32 * 32 {
        let threads = match par {
            Parallelism::None => 1,
            _ => rayon::current_num_threads(),
        };
        let s = |x: Mat| Strided { ptr: x.ptr as *mut f32, rs: x.rs, cs: x.cs };
        // SAFETY: forwarded from the caller.
        return unsafe { sgemm::sgemm(m, n, k, s(dst), accumulate, s(lhs), s(rhs), threads) };
    }
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr as *mut f32,
            dst.cs,
            dst.rs,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Offsets of each batch matrix of a `[batch.., r, c]` layout, in batch row-major order.
fn batch_offsets(l: &Layout) -> Vec<usize> {
    let r = l.rank();
    let batch = Layout { shape: l.shape[..r - 2].to_vec(), strides: l.strides[..r - 2].to_vec(), offset: l.offset };
    let mut out = Vec::with_capacity(batch.elem_count());
    batch.for_each_index(|i| out.push(i));
    out
}

/// The operands of one matmul call.
pub struct MatmulArgs<'a, 'b> {
    pub a: View<'a>,
    pub al: &'b Layout,
    pub b: View<'a>,
    pub bl: &'b Layout,
    pub bias: Option<View<'a>>,
    pub act: Option<UnaryOp>,
    pub y: View<'a>,
    pub yl: &'b Layout,
}

pub fn matmul(args: &MatmulArgs) {
    let MatmulArgs { a, al, b, bl, bias, act, y, yl } = args;
    let r = yl.rank();
    let (m, n, k) = (yl.shape[r - 2], yl.shape[r - 1], al.shape[r - 1]);
    let (ao, bo, yo) = (batch_offsets(al), batch_offsets(bl), batch_offsets(yl));
    let bias: Option<Vec<f32>> = bias.as_ref().map(crate::norm::param);
    let threads = rayon::current_num_threads();

    // Left operand as f32: in place, or converted once (row-major, batch after batch).
    let a_conv: Vec<f32>;
    let a_mats: Vec<Mat> = if a.dtype == DType::F32 {
        ao.iter()
            .map(|&o| Mat { ptr: a.elem_ptr::<f32>(o), rs: al.strides[r - 2] as isize, cs: al.strides[r - 1] as isize })
            .collect()
    } else {
        let a_view = View::from_raw(a.base(), a.dtype, &al.shape, &al.strides, al.offset);
        let mut v = vec![0f32; a_view.len()];
        v.par_chunks_mut((m * k).max(1)).enumerate().for_each(|(i, c)| a_view.gather(i * m * k, c));
        a_conv = v;
        (0..ao.len()).map(|i| Mat { ptr: a_conv[i * m * k..].as_ptr(), rs: k as isize, cs: 1 }).collect()
    };

    let direct = b.dtype == DType::F32 && y.dtype == DType::F32;
    // Converted panels: about two per thread when the matrix is large (each panel re-packs A), at least
    // MIN_PANEL wide, at most MAX_PANEL (the f32 copy of a panel is transient scratch).
    let panel = (n.div_ceil(2 * threads)).next_multiple_of(32).clamp(MIN_PANEL, MAX_PANEL);
    let panels = if direct { 1 } else { n.div_ceil(panel) };
    let tasks = yo.len() * panels;
    let per_task_flops = m * k * if direct { n } else { panel.min(n) };
    let parallel_tasks = tasks >= 2 * threads || (tasks >= threads && per_task_flops < (1 << 22));
    let par = if parallel_tasks { Parallelism::None } else { Parallelism::Rayon(0) };

    let run = |t: usize| {
        let (bi, p) = (t / panels, t % panels);
        let (n0, nb) = if direct { (0, n) } else { (p * panel, panel.min(n - p * panel)) };
        let (brs, bcs) = (bl.strides[r - 2], bl.strides[r - 1]);
        let (yrs, ycs) = (yl.strides[r - 2], yl.strides[r - 1]);
        let b_start = bo[bi] + n0 * bcs;
        let y_start = yo[bi] + n0 * ycs;
        // Right operand panel.
        let mut b_panel = Vec::new();
        let rhs = if b.dtype == DType::F32 {
            Mat { ptr: b.elem_ptr::<f32>(b_start), rs: brs as isize, cs: bcs as isize }
        } else {
            b_panel.resize(k * nb, 0f32);
            // SAFETY: the panel lies inside b's view (validated span).
            unsafe {
                if brs == 1 && k > 1 {
                    // Column-major source (e.g. a transposed [N, K] weight): pack column after column.
                    for (j, col) in b_panel.chunks_exact_mut(k).enumerate() {
                        f32::load_run(b.dtype, b.base(), b_start + j * bcs, 1, col);
                    }
                    Mat { ptr: b_panel.as_ptr(), rs: 1, cs: k as isize }
                } else {
                    for (p, row) in b_panel.chunks_exact_mut(nb).enumerate() {
                        f32::load_run(b.dtype, b.base(), b_start + p * brs, bcs, row);
                    }
                    Mat { ptr: b_panel.as_ptr(), rs: nb as isize, cs: 1 }
                }
            }
        };
        let bias_panel = bias.as_ref().map(|v| &v[n0..n0 + nb]);
        // SAFETY: all pointers address in-bounds elements of their views; each task writes its own
        // (batch, panel) block of y, which never aliases a or b.
        unsafe {
            if y.dtype == DType::F32 {
                if let Some(bp) = bias_panel {
                    for i in 0..m {
                        f32::store_run(DType::F32, y.base(), y_start + i * yrs, ycs, bp);
                    }
                }
                let dst = Mat { ptr: y.elem_ptr::<f32>(y_start), rs: yrs as isize, cs: ycs as isize };
                gemm_f32(m, nb, k, dst, bias.is_some(), a_mats[bi], rhs, par);
                if let Some(f) = *act {
                    activate_rows(m, nb, !parallel_tasks, |i, row| {
                        f32::load_run(DType::F32, y.base(), y_start + i * yrs, ycs, row);
                        crate::elementwise::unary_in_place(f, row);
                        f32::store_run(DType::F32, y.base(), y_start + i * yrs, ycs, row);
                    });
                }
            } else {
                let mut tmp = vec![0f32; m * nb];
                if let Some(bp) = bias_panel {
                    tmp.chunks_exact_mut(nb).for_each(|row| row.copy_from_slice(bp));
                }
                let dst = Mat { ptr: tmp.as_mut_ptr(), rs: nb as isize, cs: 1 };
                gemm_f32(m, nb, k, dst, bias.is_some(), a_mats[bi], rhs, par);
                if let Some(f) = *act {
                    let rows = SendPtr(tmp.as_mut_ptr());
                    activate_rows(m, nb, !parallel_tasks, |i, row| {
                        // SAFETY: row i of tmp, visited by one task only.
                        let src = std::slice::from_raw_parts(rows.get().add(i * nb), nb);
                        row.copy_from_slice(src);
                        crate::elementwise::unary_in_place(f, row);
                        std::slice::from_raw_parts_mut(rows.get().add(i * nb), nb).copy_from_slice(row);
                    });
                }
                for (i, row) in tmp.chunks_exact(nb).enumerate() {
                    f32::store_run(y.dtype, y.base(), y_start + i * yrs, ycs, row);
                }
            }
        }
    };
    if parallel_tasks {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

/// A raw pointer that tasks writing disjoint rows may share.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint rows of one buffer that outlives the tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Run `visit(row, scratch)` for the `m` rows of an output block `nb` wide, in parallel when `parallel` (the block
/// came from one multi-threaded product, so the epilogue would otherwise run on one thread).
fn activate_rows(m: usize, nb: usize, parallel: bool, visit: impl Fn(usize, &mut [f32]) + Sync) {
    let rows_per_task = if parallel { (crate::elementwise::CHUNK / nb.max(1)).max(1) } else { m.max(1) };
    crate::par_ranges(m, rows_per_task, |start, len| {
        let mut row = vec![0f32; nb];
        for i in start..start + len {
            visit(i, &mut row);
        }
    });
}
