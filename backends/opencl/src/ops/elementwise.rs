//! Copy (with casts), fill, the elementwise maps, nearest upsampling (a copy between 6-d views) and gather:
//! the kernels of kernels/elementwise.cl.

use super::args::{collapse, contig_bits, Args, ClView};
use super::{is_int, Ctx};
use crate::kernels::ProgramKind;
use ocl::core::Kernel;
use sd3_core::{BinaryOp, DType, Error, Op, OpCall, Result, TensorDesc, UnaryOp};

// `EW_*` in elementwise.cl.
const EW_COPY: u32 = 0;
const EW_FILL: u32 = 1;
const EW_UNARY: u32 = 2;
const EW_BINARY: u32 = 3;
const EW_AFFINE: u32 = 4;
const EW_MODULATE: u32 = 5;
const EW_GATED: u32 = 6;

const WG: usize = 256;

/// Launch `ew` with up to three inputs over the output's shape.
fn ew(cx: &mut Ctx, op: u32, sub: u32, p: [f32; 2], inputs: &[&TensorDesc], y: &TensorDesc) -> Result<()> {
    let views: Vec<(&[usize], usize)> = inputs.iter().chain([&y]).map(|t| (t.strides(), t.layout.offset)).collect();
    let (shape, v, contig) = collapse(y.shape(), &views);
    let bits: Vec<u32> = (0..inputs.len() as u32).chain([3]).collect();
    let k = match half_kernel(cx, op, sub, inputs, y) {
        Some(k) => k,
        None => cx.kernel(ProgramKind::Elementwise, "ew", "")?,
    };
    let ymem = cx.mem(y)?;
    let n = y.elem_count();
    let mut a = Args::new(&k);
    a.u32(n as u32).shape(&shape).u32(op).u32(sub).f32(p[0]).f32(p[1]).u32(contig_bits(&contig, &bits));
    for slot in 0..3 {
        match (inputs.get(slot), v.get(slot)) {
            (Some(t), Some(view)) if slot < inputs.len() => a.operand(&cx.mem(t)?, t.dtype, view),
            _ => a.operand(&ymem, y.dtype, &ClView::default()),
        };
    }
    a.operand(&ymem, y.dtype, &v[inputs.len()]).done()?;
    cx.launch(&k, [n, 1, 1], [WG, 1, 1])
}

/// The f16-arithmetic kernel (elementwise_half.cl) where it applies: f16 operands, an op it computes, and a
/// device that takes it. A build failure is recorded and the f32 kernel used from then on.
fn half_kernel(cx: &mut Ctx, op: u32, sub: u32, inputs: &[&TensorDesc], y: &TensorDesc) -> Option<Kernel> {
    let all_f16 = inputs.iter().all(|t| t.dtype == DType::F16) && y.dtype == DType::F16;
    let computes = match op {
        EW_UNARY => [UnaryOp::Neg, UnaryOp::Square, UnaryOp::Relu].iter().any(|&u| u as u32 == sub),
        EW_BINARY => [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul].iter().any(|&b| b as u32 == sub),
        EW_MODULATE | EW_GATED => true,
        _ => false,
    };
    if !all_f16 || !computes || !cx.half_math_enabled() {
        return None;
    }
    match cx.kernel(ProgramKind::ElementwiseHalf, "ew_half", "") {
        Ok(k) => Some(k),
        Err(e) => {
            cx.half_math_failed(e);
            None
        }
    }
}

pub fn fill(cx: &mut Ctx, value: f32, y: &TensorDesc) -> Result<()> {
    ew(cx, EW_FILL, 0, [value, 0.0], &[], y)
}

pub fn map(cx: &mut Ctx, call: &OpCall) -> Result<()> {
    let ins: Vec<&TensorDesc> = call.inputs.iter().collect();
    let y = &call.outputs[0];
    match call.op {
        Op::Unary(f) => ew(cx, EW_UNARY, f as u32, [0.0; 2], &ins, y),
        Op::Binary(f) => ew(cx, EW_BINARY, f as u32, [0.0; 2], &ins, y),
        Op::Affine { mul, add } => ew(cx, EW_AFFINE, 0, [mul, add], &ins, y),
        Op::Modulate => ew(cx, EW_MODULATE, 0, [0.0; 2], &ins, y),
        Op::GatedResidual => ew(cx, EW_GATED, 0, [0.0; 2], &ins, y),
        other => Err(Error::msg(format!("opencl: {} is not an elementwise map", other.name()))),
    }
}

/// `y = x` over the views' common shape: bit exact for equal dtypes, exact between integer types, through
/// f32 otherwise.
fn copy_views(cx: &mut Ctx, shape: &[usize], x: &TensorDesc, xs: &[usize], y: &TensorDesc, ys: &[usize]) -> Result<()> {
    let (sh, v, contig) = collapse(shape, &[(xs, x.layout.offset), (ys, y.layout.offset)]);
    let bits = contig_bits(&contig, &[0, 3]);
    let n: usize = shape.iter().product();
    let (xm, ym) = (cx.mem(x)?, cx.mem(y)?);
    let k;
    if x.dtype == y.dtype {
        k = cx.kernel(ProgramKind::Elementwise, "copy_raw", "")?;
        let es = x.dtype.size_in_bytes() as u32;
        Args::new(&k).u32(n as u32).shape(&sh).u32(es).u32(bits).mem(&xm).view(&v[0]).mem(&ym).view(&v[1]).done()?;
    } else if is_int(x.dtype) && is_int(y.dtype) {
        k = cx.kernel(ProgramKind::Elementwise, "copy_int", "")?;
        Args::new(&k)
            .u32(n as u32)
            .shape(&sh)
            .u32(bits)
            .operand(&xm, x.dtype, &v[0])
            .operand(&ym, y.dtype, &v[1])
            .done()?;
    } else {
        return ew(cx, EW_COPY, 0, [0.0; 2], &[x], y);
    }
    cx.launch(&k, [n, 1, 1], [WG, 1, 1])
}

pub fn copy(cx: &mut Ctx, x: &TensorDesc, y: &TensorDesc) -> Result<()> {
    copy_views(cx, y.shape(), x, x.strides(), y, y.strides())
}

/// Nearest upsampling by `f` as a copy: the output [N, C, H·f, W·f] seen as [N, C, H, f, W, f], the input
/// as the same shape with stride 0 over both `f` dims.
pub fn upsample(cx: &mut Ctx, f: usize, x: &TensorDesc, y: &TensorDesc) -> Result<()> {
    let (xs, ys, s) = (x.strides(), y.strides(), x.shape());
    if y.shape() != [s[0], s[1], s[2] * f, s[3] * f] {
        return Err(Error::shape("upsample_nearest2d", format!("{:?} by {f} into {:?}", s, y.shape())));
    }
    let shape = [s[0], s[1], s[2], f, s[3], f];
    let x6 = [xs[0], xs[1], xs[2], 0, xs[3], 0];
    let y6 = [ys[0], ys[1], ys[2] * f, ys[2], ys[3] * f, ys[3]];
    copy_views(cx, &shape, x, &x6, y, &y6)
}

/// Rows of `table` at `ids`. Ids are checked on the device; an id out of range is an error (this op
/// synchronises to read the flag, which is cheap for an embedding lookup).
pub fn gather(cx: &mut Ctx, call: &OpCall) -> Result<()> {
    let (table, ids, y) = (&call.inputs[0], &call.inputs[1], &call.outputs[0]);
    let (vocab, dim) = (table.shape()[0], table.shape()[1]);
    if ids.shape()[0] != y.shape()[0] || dim != y.shape()[1] {
        return Err(Error::shape(
            "gather",
            format!("table {:?}, ids {:?} into {:?}", table.shape(), ids.shape(), y.shape()),
        ));
    }
    let flag = match &cx.exec.error_flag {
        Some(m) => m.clone(),
        None => {
            let flags = ocl::core::MemFlags::new().read_write();
            let m = unsafe { ocl::core::create_buffer::<_, u8>(&cx.dev.context, flags, 4, None) }
                .map_err(|e| crate::cl_error("gather: allocating the error flag", e))?;
            cx.exec.error_flag = Some(m.clone());
            m
        }
    };
    let q = &cx.dev.queue;
    let zero = [0u8; 4];
    unsafe {
        ocl::core::enqueue_write_buffer(
            q,
            &flag,
            true,
            0,
            &zero,
            None::<&ocl::core::Event>,
            None::<&mut ocl::core::Event>,
        )
    }
    .map_err(|e| crate::cl_error("gather: clearing the error flag", e))?;
    let k = cx.kernel(ProgramKind::Elementwise, "gather", "")?;
    let n = y.elem_count();
    Args::new(&k)
        .u32(n as u32)
        .u32(dim as u32)
        .u32(vocab as u32)
        .operand(&cx.mem(table)?, table.dtype, &ClView::of(table))
        .operand(&cx.mem(ids)?, ids.dtype, &ClView::of(ids))
        .operand(&cx.mem(y)?, y.dtype, &ClView::of(y))
        .mem(&flag)
        .done()?;
    cx.launch(&k, [n, 1, 1], [WG, 1, 1])?;
    let mut out = [0u8; 4];
    unsafe {
        ocl::core::enqueue_read_buffer(
            q,
            &flag,
            true,
            0,
            &mut out,
            None::<&ocl::core::Event>,
            None::<&mut ocl::core::Event>,
        )
    }
    .map_err(|e| crate::cl_error("gather: reading the error flag", e))?;
    if i32::from_le_bytes(out) != 0 {
        return Err(Error::InvalidArgument(format!("gather: an id is outside 0..{vocab} (table {:?})", table.shape())));
    }
    Ok(())
}
