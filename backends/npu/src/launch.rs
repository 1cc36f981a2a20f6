//! Running one op: resolve operands to arena views, apply the flags around the kernel, dispatch.
//!
//! - `FLAGS_use_stride_kernel=0`: every non-contiguous operand (transposed, sliced, broadcast) is first copied
//!   into a contiguous workspace, and a non-contiguous output is computed into one and copied back; each copy
//!   is counted. `=1`: kernels read and write views through their strides, no copy.
//! - `FLAGS_npu_storage_format=1`: the `b` operand of a matmul that is shared by every batch (a weight) is
//!   converted once to FRACTAL_NZ and the copy kept until its buffer changes; conv activations go through
//!   NC1HWC0 (input converted before, output converted after). Padded sizes are real arena allocations.
//! - `FLAGS_npu_scale_aclnn=1`: the scale op (`Affine`) runs as `aclnnMuls` into an f32 workspace then
//!   `aclnnAdds`; `=0`: the legacy fused single op.

use crate::alloc::Allocation;
use crate::device::{NpuDevice, NzEntry, State};
use crate::kernels::conv::{self, Activation};
use crate::kernels::matmul::{self, BSource};
use crate::kernels::{attention, elementwise as ew, format, rows, Operand};
use sd3_core::{DType, Op, OpCall, Result};

pub(crate) fn launch(dev: &NpuDevice, st: &mut State, call: &OpCall, ws: &mut Vec<Allocation>) -> Result<()> {
    let flags = dev.config().flags;
    let mut ins = call.inputs.iter().map(|t| dev.operand(st, t)).collect::<Result<Vec<_>>>()?;
    let target = dev.operand(st, &call.outputs[0])?;
    // A weight whose FRACTAL_NZ copy may be cached is not materialised here: on a cache hit it is not read.
    let nz_weight = flags.storage_format && matches!(call.op, Op::Matmul { .. }) && shared_matrix(&ins[1]);
    for (i, x) in ins.iter_mut().enumerate() {
        if x.layout.is_contiguous() || (nz_weight && i == 1) {
            continue;
        }
        if flags.use_stride_kernel {
            st.counters.strided_operands += 1;
        } else {
            *x = materialise(dev, st, ws, x)?;
        }
    }
    let out_copy = !target.layout.is_contiguous() && !flags.use_stride_kernel;
    let out = if out_copy {
        dev.workspace(st, ws, target.layout.elem_count(), target.mem.dtype, target.shape())?
    } else {
        if !target.layout.is_contiguous() {
            st.counters.strided_operands += 1;
        }
        target.clone()
    };
    dispatch(dev, st, ws, call, &ins, &out, nz_weight)?;
    if out_copy {
        ew::copy(&out, &target);
        st.counters.contiguous_copies += 1;
        st.counters.contiguous_copy_bytes += (out.layout.elem_count() * out.mem.dtype.size_in_bytes()) as u64;
    }
    Ok(())
}

/// Whether the last two dims of a matmul operand are the same matrix for every batch (a weight).
fn shared_matrix(b: &Operand) -> bool {
    let r = b.layout.rank();
    b.layout.shape[..r - 2].iter().zip(&b.layout.strides[..r - 2]).all(|(&d, &s)| d == 1 || s == 0)
}

/// Copy a view into a contiguous workspace (the `contiguous` kernel Paddle runs when stride kernels are off).
fn materialise(dev: &NpuDevice, st: &mut State, ws: &mut Vec<Allocation>, x: &Operand) -> Result<Operand> {
    let tmp = dev.workspace(st, ws, x.layout.elem_count(), x.mem.dtype, x.shape())?;
    ew::copy(x, &tmp);
    st.counters.contiguous_copies += 1;
    st.counters.contiguous_copy_bytes += (x.layout.elem_count() * x.mem.dtype.size_in_bytes()) as u64;
    Ok(tmp)
}

fn dispatch(
    dev: &NpuDevice,
    st: &mut State,
    ws: &mut Vec<Allocation>,
    call: &OpCall,
    ins: &[Operand],
    out: &Operand,
    nz_weight: bool,
) -> Result<()> {
    let flags = dev.config().flags;
    match call.op {
        Op::Copy => ew::copy(&ins[0], out),
        Op::Fill { value } => ew::fill(out, value),
        Op::Unary(f) => ew::map([&ins[0]], out, |[x]| ew::unary_f32(f, x)),
        Op::Binary(f) => ew::map([&ins[0], &ins[1]], out, |[a, b]| ew::binary_f32(f, a, b)),
        Op::Affine { mul, add } => {
            if flags.scale_aclnn {
                let tmp = dev.workspace(st, ws, out.layout.elem_count(), DType::F32, out.shape())?;
                ew::muls(&ins[0], &tmp, mul);
                ew::adds(&tmp, out, add);
                st.counters.affine_aclnn += 1;
            } else {
                ew::affine_fused(&ins[0], out, mul, add);
                st.counters.affine_legacy += 1;
            }
        }
        Op::Matmul { bias, act } => {
            // With an activation epilogue: the product into an f32 workspace, then the activation into the output
            // (one rounding, as the reference).
            let product = match act {
                Some(_) => dev.workspace(st, ws, out.layout.elem_count(), DType::F32, out.shape())?,
                None => out.clone(),
            };
            matmul_into(dev, st, ws, call, ins, bias, nz_weight, &product)?;
            if let Some(f) = act {
                ew::map([&product], out, |[x]| ew::unary_f32(f, x));
            }
        }
        Op::MatmulGatedResidual { bias } => {
            // The product into an f32 workspace, then x + gate·product into the output (one rounding).
            let product = dev.workspace(st, ws, out.layout.elem_count(), DType::F32, out.shape())?;
            matmul_into(dev, st, ws, call, ins, bias, nz_weight, &product)?;
            let r = 2 + bias as usize;
            ew::map([&ins[r], &ins[r + 1], &product], out, |[x, g, p]| x + g * p);
        }
        Op::Softmax => rows::softmax(&ins[0], out),
        Op::LayerNorm { eps, affine } => rows::layer_norm(&ins[0], affine.then(|| (&ins[1], &ins[2])), out, eps),
        Op::RmsNorm { eps } => rows::rms_norm(&ins[0], &ins[1], out, eps),
        Op::LayerNormModulate { eps } => rows::layer_norm_modulate(&ins[0], &ins[1], &ins[2], out, eps),
        Op::Modulate => ew::map([&ins[0], &ins[1], &ins[2]], out, |[x, s, h]| x * (1.0 + s) + h),
        Op::GatedResidual => ew::map([&ins[0], &ins[1], &ins[2]], out, |[x, g, r]| x + g * r),
        Op::Attention { scale, causal, bias, qk_norm, norm_eps } => {
            let i = 3 + bias as usize;
            attention::attention(&attention::AttentionArgs {
                q: &ins[0],
                k: &ins[1],
                v: &ins[2],
                bias: bias.then(|| &ins[3]),
                qk_norm: qk_norm.then(|| (&ins[i], &ins[i + 1], norm_eps)),
                out,
                scale,
                causal,
            });
        }
        Op::Conv2d { stride, padding, bias } => {
            let bias = bias.then(|| &ins[2]);
            if flags.storage_format {
                conv_nc1hwc0(dev, st, ws, &ins[0], &ins[1], bias, out, stride, padding)?;
            } else {
                conv::conv2d(&Activation::Nchw(&ins[0]), &ins[1], bias, &Activation::Nchw(out), stride, padding);
            }
        }
        Op::GroupNorm { groups, eps, affine } => {
            conv::group_norm(&ins[0], affine.then(|| (&ins[1], &ins[2])), out, groups, eps)
        }
        Op::UpsampleNearest2d { factor } => ew::upsample_nearest2d(&ins[0], out, factor),
        Op::Gather => ew::gather(&ins[0], &ins[1], out)?,
        Op::AttentionBackward { scale, causal } => {
            attention::attention_backward([&ins[0], &ins[1], &ins[2], &ins[3], &ins[4]], out, scale, causal)
        }
    }
    Ok(())
}

/// `a·b (+ bias)` of a matmul-shaped call into `product`, b from its FRACTAL_NZ copy when the flag says so.
#[allow(clippy::too_many_arguments)]
fn matmul_into(
    dev: &NpuDevice,
    st: &mut State,
    ws: &mut Vec<Allocation>,
    call: &OpCall,
    ins: &[Operand],
    bias: bool,
    nz_weight: bool,
    product: &Operand,
) -> Result<()> {
    let bias = bias.then(|| &ins[2]);
    if nz_weight {
        let (mem, k) = nz_weight_copy(dev, st, ws, &call.inputs[1], &ins[1])?;
        matmul::matmul(&ins[0], BSource::Nz { mem, k }, bias, product);
    } else {
        matmul::matmul(&ins[0], BSource::Strided(&ins[1]), bias, product);
    }
    Ok(())
}

/// The FRACTAL_NZ copy of a matmul weight: from the cache when its buffer is unchanged, else converted now
/// (after a contiguous copy when stride kernels are off and the view is not contiguous) and cached.
fn nz_weight_copy(
    dev: &NpuDevice,
    st: &mut State,
    ws: &mut Vec<Allocation>,
    desc: &sd3_core::TensorDesc,
    b: &Operand,
) -> Result<(crate::arena::Mem, usize)> {
    let r = b.layout.rank();
    let (k, n) = (b.shape()[r - 2], b.shape()[r - 1]);
    let dtype = b.mem.dtype;
    let generation = st.buffers.get(&desc.buffer.0).map_or(0, |e| e.generation);
    let key = (desc.buffer.0, desc.layout.clone(), dtype);
    if let Some(e) = st.nz.get(&key) {
        if e.generation == generation {
            st.counters.nz_cache_hits += 1;
            let mem = crate::arena::Mem { ptr: dev.arena().ptr(e.alloc.offset), dtype };
            return Ok((mem, k));
        }
        let stale = st.nz.remove(&key).expect("present");
        st.alloc.free(stale.alloc.offset);
    }
    let src = if b.layout.is_contiguous() || dev.config().flags.use_stride_kernel {
        b.clone()
    } else {
        materialise(dev, st, ws, b)?
    };
    let physical = format::nz_elems(k, n) * dtype.size_in_bytes();
    let alloc = st.alloc_block(physical)?;
    let mem = crate::arena::Mem { ptr: dev.arena().ptr(alloc.offset), dtype };
    format::nd_to_nz(&src, mem);
    st.counters.nz_conversions += 1;
    st.nz.insert(
        key,
        NzEntry { alloc, generation, logical_bytes: k * n * dtype.size_in_bytes(), physical_bytes: physical },
    );
    Ok((mem, k))
}

/// Convolution with activations in NC1HWC0: convert x in, convolve, convert y out.
#[allow(clippy::too_many_arguments)]
fn conv_nc1hwc0(
    dev: &NpuDevice,
    st: &mut State,
    ws: &mut Vec<Allocation>,
    x: &Operand,
    w: &Operand,
    bias: Option<&Operand>,
    y: &Operand,
    stride: [usize; 2],
    padding: [usize; 2],
) -> Result<()> {
    let d = |t: &Operand| [t.shape()[0], t.shape()[1], t.shape()[2], t.shape()[3]];
    let (xd, yd) = (d(x), d(y));
    let (xe, ye) =
        (format::nc1hwc0_elems(xd[0], xd[1], xd[2], xd[3]), format::nc1hwc0_elems(yd[0], yd[1], yd[2], yd[3]));
    let xb = dev.workspace(st, ws, xe, x.mem.dtype, &[xe])?;
    let yb = dev.workspace(st, ws, ye, y.mem.dtype, &[ye])?;
    format::nchw_to_nc1hwc0(x, xb.mem);
    let xa = Activation::Nc1hwc0 { mem: xb.mem, dims: xd };
    let ya = Activation::Nc1hwc0 { mem: yb.mem, dims: yd };
    conv::conv2d(&xa, w, bias, &ya, stride, padding);
    format::nc1hwc0_to_nchw(yb.mem, y);
    let c = &mut st.counters;
    c.nc1hwc0_conversions += 2;
    let physical = (xe * x.mem.dtype.size_in_bytes() + ye * y.mem.dtype.size_in_bytes()) as u64;
    let logical = (x.layout.elem_count() * x.mem.dtype.size_in_bytes()
        + y.layout.elem_count() * y.mem.dtype.size_in_bytes()) as u64;
    c.nc1hwc0_peak_bytes = c.nc1hwc0_peak_bytes.max(physical);
    c.nc1hwc0_padding_bytes += physical - logical;
    Ok(())
}
