//! Matmul and conv2d (as an implicit GEMM): the two instantiations of kernels/gemm_tile.cl.

use super::args::{collapse, Args, ClView};
use super::Ctx;
use crate::kernels::ProgramKind;
use ocl::core::Kernel;
use sd3_core::{DType, Error, OpCall, Result, TensorDesc};

fn batch_view(t: &TensorDesc, r: usize) -> (&[usize], usize) {
    (&t.strides()[..r - 2], t.layout.offset)
}

/// A GEMM kernel with its launch shape: the tensor-core one (128 threads per 64x64 or 128x128 tile) where the device has
/// tensor cores and both operands are f16 or both bf16, else the SIMT one (16x16 threads per 16·rm x 16·rn tile).
struct GemmKernel {
    kernel: Kernel,
    /// The tensor-core kernel's work-group tile (rows, columns), or `None` for the SIMT kernel.
    mma_tile: Option<(usize, usize)>,
}

/// MMA tiles per warp (rows of 16, columns of 8) for an M x N output. 2 x 4 (64x64 work-group tiles) measured
/// fastest on an H200 for SD3's linears (4 x 8 spills registers). `SD3_OPENCL_MMA_TILE=MIxNJ` overrides it, for
/// tuning, on outputs of at least 512 x 512.
fn mma_tiles(m: usize, n: usize) -> (usize, usize) {
    let custom = std::env::var("SD3_OPENCL_MMA_TILE").ok().and_then(|v| {
        let (mi, nj) = v.split_once('x')?;
        let (mi, nj) = (mi.parse().ok()?, nj.parse().ok()?);
        ([1, 2, 4].contains(&mi) && [2, 4, 8].contains(&nj)).then_some((mi, nj))
    });
    match custom {
        Some(t) if m >= 512 && n >= 512 => t,
        _ => (2, 4),
    }
}

impl GemmKernel {
    fn pick(cx: &mut Ctx, name: &'static str, a: DType, b: DType, m: usize, n: usize) -> Result<GemmKernel> {
        let variant = match (a, b) {
            (DType::F16, DType::F16) => Some(0),
            (DType::BF16, DType::BF16) => Some(1),
            _ => None,
        };
        if let (Some(bf16), true) = (variant, cx.mma_enabled()) {
            let (mi, nj) = mma_tiles(m, n);
            let options = format!("-DMMA_BF16={bf16} -DMMA_MI={mi} -DMMA_NJ={nj}");
            match cx.kernel(ProgramKind::GemmMma, name, &options) {
                Ok(kernel) => return Ok(GemmKernel { kernel, mma_tile: Some((32 * mi, 16 * nj)) }),
                // A driver that rejects the inline PTX still runs every GEMM, on the SIMT kernel.
                Err(e) => cx.mma_failed(e),
            }
        }
        Ok(GemmKernel { kernel: cx.kernel(ProgramKind::Gemm, name, "")?, mma_tile: None })
    }

    fn launch(&self, cx: &Ctx, m: usize, n: usize, batch: usize) -> Result<()> {
        if let Some((bm, bn)) = self.mma_tile {
            return cx.launch(&self.kernel, [n.div_ceil(bn) * 128, m.div_ceil(bm), batch], [128, 1, 1]);
        }
        let t = &cx.dev.tuning;
        let global = [n.div_ceil(16 * t.gemm_rn) * 16, m.div_ceil(16 * t.gemm_rm) * 16, batch];
        cx.launch(&self.kernel, global, [16, 16, 1])
    }
}

pub fn matmul(cx: &mut Ctx, call: &OpCall, has_bias: bool) -> Result<()> {
    let (a, b, y) = (&call.inputs[0], &call.inputs[1], &call.outputs[0]);
    let r = y.rank();
    let (m, n, k) = (y.shape()[r - 2], y.shape()[r - 1], a.shape()[r - 1]);
    if a.rank() != r || b.rank() != r || a.shape()[r - 2] != m || b.shape()[r - 2] != k || b.shape()[r - 1] != n {
        return Err(Error::shape("matmul", format!("{:?} x {:?} into {:?}", a.shape(), b.shape(), y.shape())));
    }
    let batch_shape = &y.shape()[..r - 2];
    let batch: usize = batch_shape.iter().product();
    let (bsh, v, _) = collapse(batch_shape, &[batch_view(a, r), batch_view(b, r), batch_view(y, r)]);
    let bias = if has_bias { &call.inputs[2] } else { y };
    let (bias_off, bias_st) = if has_bias { (bias.layout.offset, bias.strides()[0]) } else { (0, 0) };
    let gk = GemmKernel::pick(cx, "matmul", a.dtype, b.dtype, m, n)?;
    let kern = &gk.kernel;
    let (ast, bst, yst) = (a.strides(), b.strides(), y.strides());
    Args::new(kern)
        .u32(m as u32)
        .u32(n as u32)
        .u32(k as u32)
        .shape(&bsh)
        .u32(has_bias as u32)
        .operand(&cx.mem(a)?, a.dtype, &v[0])
        .u64(ast[r - 2] as u64)
        .u64(ast[r - 1] as u64)
        .operand(&cx.mem(b)?, b.dtype, &v[1])
        .u64(bst[r - 2] as u64)
        .u64(bst[r - 1] as u64)
        .mem(&cx.mem(bias)?)
        .u32(super::args::dt(bias.dtype))
        .u64(bias_off as u64)
        .u64(bias_st as u64)
        .operand(&cx.mem(y)?, y.dtype, &v[2])
        .u64(yst[r - 2] as u64)
        .u64(yst[r - 1] as u64)
        .done()?;
    gk.launch(cx, m, n, batch)
}

pub fn conv2d(cx: &mut Ctx, call: &OpCall, stride: [usize; 2], padding: [usize; 2], has_bias: bool) -> Result<()> {
    let (x, w, y) = (&call.inputs[0], &call.inputs[1], &call.outputs[0]);
    let (xs, ws, ys) = (x.shape(), w.shape(), y.shape());
    let (nb, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (o, kh, kw) = (ws[0], ws[2], ws[3]);
    let (oh, ow) = (ys[2], ys[3]);
    let expected_oh = (h + 2 * padding[0]).checked_sub(kh).map(|v| v / stride[0].max(1) + 1);
    let expected_ow = (wd + 2 * padding[1]).checked_sub(kw).map(|v| v / stride[1].max(1) + 1);
    if ws[1] != c
        || ys[0] != nb
        || ys[1] != o
        || expected_oh != Some(oh)
        || expected_ow != Some(ow)
        || stride.contains(&0)
    {
        let msg = format!("x {xs:?}, w {ws:?}, stride {stride:?}, padding {padding:?} into {ys:?}");
        return Err(Error::shape("conv2d", msg));
    }
    let (m, n, k) = (o, nb * oh * ow, c * kh * kw);
    let bias = if has_bias { &call.inputs[2] } else { y };
    let (bias_off, bias_st) = if has_bias { (bias.layout.offset, bias.strides()[0]) } else { (0, 0) };
    let gk = GemmKernel::pick(cx, "conv2d", x.dtype, w.dtype, o, nb * oh * ow)?;
    let kern = &gk.kernel;
    let mut a = Args::new(kern);
    a.u32(m as u32).u32(n as u32).u32(k as u32).u32(has_bias as u32);
    for v in [h, wd, kh, kw, oh, ow, stride[0], stride[1], padding[0], padding[1]] {
        a.u32(v as u32);
    }
    a.operand(&cx.mem(x)?, x.dtype, &ClView::of(x))
        .operand(&cx.mem(w)?, w.dtype, &ClView::of(w))
        .mem(&cx.mem(bias)?)
        .u32(super::args::dt(bias.dtype))
        .u64(bias_off as u64)
        .u64(bias_st as u64)
        .operand(&cx.mem(y)?, y.dtype, &ClView::of(y))
        .done()?;
    gk.launch(cx, m, n, 1)
}
