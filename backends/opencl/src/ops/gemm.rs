//! Matmul and conv2d (as an implicit GEMM): the two instantiations of kernels/gemm_tile.cl.

use super::args::{collapse, Args, ClView};
use super::Ctx;
use crate::kernels::ProgramKind;
use ocl::core::Kernel;
use sd3_core::{DType, Error, OpCall, Result, TensorDesc, UnaryOp};

fn batch_view(t: &TensorDesc, r: usize) -> (&[usize], usize) {
    (&t.strides()[..r - 2], t.layout.offset)
}

/// A GEMM kernel with its launch shape: the tensor-core one where the device has tensor cores and both operands
/// are f16 or both bf16, else the SIMT one (16x16 threads per 16·rm x 16·rn tile).
struct GemmKernel {
    kernel: Kernel,
    /// The tensor-core kernel's shape, or `None` for the SIMT kernel.
    mma: Option<MmaShape>,
}

/// The tensor-core GEMM's work-group: `wm x wn` warps, each computing `mi x nj` MMA tiles of 16x8.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MmaShape {
    /// k per local-memory slice (32 or 64).
    bk: usize,
    mi: usize,
    nj: usize,
    wm: usize,
    wn: usize,
}

impl MmaShape {
    /// 2 x 4 tiles on 2 x 2 warps (64x64 work-group tiles, 128 threads), 32 deep: on an H200 no other shape
    /// tried was more than 1.1% faster for SD3's linears in f16 and bf16 together (docs/opencl.md). For tuning:
    /// `SD3_OPENCL_MMA_TILE=MIxNJ` and `SD3_OPENCL_MMA_WARPS=WMxWN` (each a power of two, 1..=8),
    /// `SD3_OPENCL_MMA_BK=64`.
    fn configured() -> MmaShape {
        let default = MmaShape { bk: 32, mi: 2, nj: 4, wm: 2, wn: 2 };
        let pair = |var: &str| -> Option<(usize, usize)> {
            let v = std::env::var(var).ok()?;
            let (a, b) = v.split_once('x')?;
            let (a, b) = (a.parse().ok()?, b.parse().ok()?);
            ([1, 2, 4, 8].contains(&a) && [1, 2, 4, 8].contains(&b)).then_some((a, b))
        };
        let (mi, nj) = pair("SD3_OPENCL_MMA_TILE").unwrap_or((default.mi, default.nj));
        let (wm, wn) = pair("SD3_OPENCL_MMA_WARPS").unwrap_or((default.wm, default.wn));
        let bk = match std::env::var("SD3_OPENCL_MMA_BK").as_deref() {
            Ok("64") => 64,
            _ => default.bk,
        };
        let shape = MmaShape { bk, mi, nj, wm, wn };
        if shape.valid() {
            shape
        } else {
            default
        }
    }

    fn threads(&self) -> usize {
        32 * self.wm * self.wn
    }
    fn tile(&self) -> (usize, usize) {
        (16 * self.mi * self.wm, 8 * self.nj * self.wn)
    }
    /// What mma.cl requires: whole 8-element chunks of both tiles' slices per thread, whole B columns per
    /// thread (conv2d), at most 1024 threads.
    fn valid(&self) -> bool {
        let (bm, bn) = self.tile();
        let (t, chunks) = (self.threads(), self.bk / 8);
        t <= 1024 && (bm * chunks) % t == 0 && (bn * chunks) % t == 0 && t % bn == 0
    }
}

impl GemmKernel {
    fn pick(cx: &mut Ctx, name: &'static str, a: DType, b: DType) -> Result<GemmKernel> {
        let variant = match (a, b) {
            (DType::F16, DType::F16) => Some(0),
            (DType::BF16, DType::BF16) => Some(1),
            _ => None,
        };
        if let (Some(bf16), true) = (variant, cx.mma_enabled()) {
            let s = MmaShape::configured();
            let options = format!(
                "-DMMA_BF16={bf16} -DMMA_BK={} -DMMA_MI={} -DMMA_NJ={} -DMMA_WM={} -DMMA_WN={}",
                s.bk, s.mi, s.nj, s.wm, s.wn
            );
            match cx.kernel(ProgramKind::GemmMma, name, &options) {
                Ok(kernel) => return Ok(GemmKernel { kernel, mma: Some(s) }),
                // A driver that rejects the inline PTX still runs every GEMM, on the SIMT kernel.
                Err(e) => cx.mma_failed(e),
            }
        }
        Ok(GemmKernel { kernel: cx.kernel(ProgramKind::Gemm, name, "")?, mma: None })
    }

    fn launch(&self, cx: &Ctx, m: usize, n: usize, batch: usize) -> Result<()> {
        if let Some(s) = self.mma {
            let ((bm, bn), t) = (s.tile(), s.threads());
            return cx.launch(&self.kernel, [n.div_ceil(bn) * t, m.div_ceil(bm), batch], [t, 1, 1]);
        }
        let t = &cx.dev.tuning;
        let global = [n.div_ceil(16 * t.gemm_rn) * 16, m.div_ceil(16 * t.gemm_rm) * 16, batch];
        cx.launch(&self.kernel, global, [16, 16, 1])
    }
}

/// `y = act(a·b (+ bias))`, the activation applied in the store (no extra pass).
pub fn matmul(cx: &mut Ctx, call: &OpCall, has_bias: bool, act: Option<UnaryOp>) -> Result<()> {
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
    let gk = GemmKernel::pick(cx, "matmul", a.dtype, b.dtype)?;
    let kern = &gk.kernel;
    let (ast, bst, yst) = (a.strides(), b.strides(), y.strides());
    Args::new(kern)
        .u32(m as u32)
        .u32(n as u32)
        .u32(k as u32)
        .shape(&bsh)
        .u32(has_bias as u32)
        .u32(act.map_or(0, |u| u as u32 + 1))
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
    let gk = GemmKernel::pick(cx, "conv2d", x.dtype, w.dtype)?;
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
