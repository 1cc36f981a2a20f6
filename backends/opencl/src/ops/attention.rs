//! Fused attention (kernels/attention.cl), built per (head dim, value dim) so each work-item keeps its
//! query and output rows in registers.

use super::args::{Args, ClView};
use super::{Ctx, MAX_HEAD_DIM};
use crate::kernels::ProgramKind;
use sd3_core::{DType, Error, Op, OpCall, Result};

/// Keys per local-memory tile: as many as fit 16 KiB of K and V rows, a power of two in 4..=32.
fn key_tile(dh: usize, dv: usize) -> usize {
    let fit = 16384 / (4 * (dh + dv)).max(1);
    let mut bk = 4;
    while bk * 2 <= fit.min(32) {
        bk *= 2;
    }
    bk
}

pub fn run(cx: &mut Ctx, call: &OpCall) -> Result<()> {
    let Op::Attention { scale, causal, bias, qk_norm, norm_eps } = call.op else {
        unreachable!("attention::run called for {}", call.op.name())
    };
    let (q, k, v, o) = (&call.inputs[0], &call.inputs[1], &call.inputs[2], &call.outputs[0]);
    let (b, h, nq, dh) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (nk, dv) = (k.shape()[2], v.shape()[3]);
    let shapes_ok = k.shape() == [b, h, nk, dh] && v.shape()[..3] == [b, h, nk] && o.shape() == [b, h, nq, dv];
    if !shapes_ok {
        let msg = format!("q {:?}, k {:?}, v {:?} into {:?}", q.shape(), k.shape(), v.shape(), o.shape());
        return Err(Error::shape("attention", msg));
    }
    if dh > MAX_HEAD_DIM || dv > MAX_HEAD_DIM {
        if !super::attention_matmul::applies(&call.op) {
            let msg = format!("head dims {dh}/{dv} above {MAX_HEAD_DIM} with a causal mask or q/k norm");
            return Err(Error::Unsupported { backend: "opencl".into(), op: "attention".into(), detail: msg });
        }
        return super::attention_matmul::run(cx, call, scale, bias);
    }
    if !causal && !bias && !qk_norm && dh == dv && dh % 16 == 0 && dh <= 64 {
        let same = |d: DType| q.dtype == d && k.dtype == d && v.dtype == d;
        let variant = if same(DType::F16) {
            Some(0)
        } else if same(DType::BF16) {
            Some(1)
        } else {
            None
        };
        if let (Some(bf16), true) = (variant, cx.mma_enabled()) {
            // For measuring: `SD3_OPENCL_ATTN_PREFETCH=0` stages each K/V tile after the barrier instead;
            // `SD3_OPENCL_ATTN_WARPS=8` gives work-groups of 8 warps (128 query rows) where the head dim allows.
            let prefetch = std::env::var("SD3_OPENCL_ATTN_PREFETCH").map_or(true, |v| v != "0");
            let eight = std::env::var("SD3_OPENCL_ATTN_WARPS").is_ok_and(|v| v == "8") && dh % 32 == 0;
            let warps: usize = if eight { 8 } else { 4 };
            let options = format!("-DMMA_BF16={bf16} -DD={dh} -DATTN_PREFETCH={} -DATT_WARPS={warps}", prefetch as u32);
            match cx.kernel(ProgramKind::AttentionMma, "attention_mma", &options) {
                Ok(kern) => {
                    Args::new(&kern)
                        .u32(h as u32)
                        .u32(nq as u32)
                        .u32(nk as u32)
                        .f32(scale)
                        .operand(&cx.mem(q)?, q.dtype, &ClView::of(q))
                        .operand(&cx.mem(k)?, k.dtype, &ClView::of(k))
                        .operand(&cx.mem(v)?, v.dtype, &ClView::of(v))
                        .operand(&cx.mem(o)?, o.dtype, &ClView::of(o))
                        .done()?;
                    let threads = 32 * warps;
                    return cx.launch(&kern, [nq.div_ceil(16 * warps) * threads, b * h, 1], [threads, 1, 1]);
                }
                // The SIMT kernel below runs it instead.
                Err(e) => cx.mma_failed(e),
            }
        }
    }
    let bq = cx.dev.tuning.attn_bq;
    let bk = key_tile(dh, dv);
    let options = format!("-DDH={dh} -DDV={dv} -DBQ={bq} -DBK={bk}");
    let kern = cx.kernel(ProgramKind::Attention, "attention", &options)?;
    let flags = causal as u32 | (bias as u32) << 1 | (qk_norm as u32) << 2;
    // Optional operands are bound to q (never read when their flag is off).
    let bias_t = if bias { &call.inputs[3] } else { q };
    let norm_base = if bias { 4 } else { 3 };
    let (qn, kn) = if qk_norm { (&call.inputs[norm_base], &call.inputs[norm_base + 1]) } else { (q, q) };
    Args::new(&kern)
        .u32(h as u32)
        .u32(nq as u32)
        .u32(nk as u32)
        .f32(scale)
        .u32(flags)
        .f32(norm_eps)
        .operand(&cx.mem(q)?, q.dtype, &ClView::of(q))
        .operand(&cx.mem(k)?, k.dtype, &ClView::of(k))
        .operand(&cx.mem(v)?, v.dtype, &ClView::of(v))
        .operand(&cx.mem(bias_t)?, bias_t.dtype, &ClView::of(bias_t))
        .operand(&cx.mem(qn)?, qn.dtype, &ClView::of(qn))
        .operand(&cx.mem(kn)?, kn.dtype, &ClView::of(kn))
        .operand(&cx.mem(o)?, o.dtype, &ClView::of(o))
        .done()?;
    cx.launch(&kern, [nq, b * h, 1], [bq, 1, 1])
}
