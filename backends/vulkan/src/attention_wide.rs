//! Attention with head dims above the fused shaders' 128 (the VAE decoder's single-head mid-block attention has
//! head dim 512), in three steps on the device instead of on the host:
//! 1. scores `S = scale·q·kᵀ (+ bias)` in f32, as a matmul and an affine (and an add);
//! 2. `P = softmax(S)` by rows, in f16 when q and v are f16 (so the last product can run on cooperative matrices),
//!    else in f32;
//! 3. `o = P·v`, as a matmul.
//!
//! Unlike the fused shaders, this materialises the score matrix: B·H·Nq·Nk·4 bytes for S plus P (1.5 GiB for the
//! VAE at 1024²), freed when the op is recorded. Causal masks and the q/k norm are declined (no model uses them with
//! such head dims); the core runs those on the host.

use crate::device::VulkanDevice;
use sd3_core::{BinaryOp, DType, Device, Layout, Op, OpCall, Result, TensorDesc};

/// Head dims the fused attention shaders take (`ATTN_MAX_D` in ops.rs).
const FUSED_MAX_D: usize = 128;

/// Attention too wide for the fused shaders.
pub fn is_wide(call: &OpCall) -> bool {
    matches!(call.op, Op::Attention { .. })
        && call.inputs.len() >= 3
        && call.inputs[..3].iter().all(|t| t.rank() == 4)
        && (call.inputs[0].shape()[3] > FUSED_MAX_D || call.inputs[2].shape()[3] > FUSED_MAX_D)
}

/// Whether this path takes the (wide) call: no causal mask, no q/k norm.
pub fn supported(call: &OpCall) -> bool {
    matches!(call.op, Op::Attention { causal: false, qk_norm: false, .. })
}

/// Bytes of the score matrix S (f32) and of P.
pub fn scratch_bytes(call: &OpCall) -> (u64, u64) {
    let (q, k, v) = (&call.inputs[0], &call.inputs[1], &call.inputs[2]);
    let n = (q.shape()[0] * q.shape()[1] * q.shape()[2] * k.shape()[2]) as u64;
    (n * 4, n * p_dtype(q, v).size_in_bytes() as u64)
}

fn p_dtype(q: &TensorDesc, v: &TensorDesc) -> DType {
    if q.dtype == DType::F16 && v.dtype == DType::F16 {
        DType::F16
    } else {
        DType::F32
    }
}

pub fn execute(dev: &VulkanDevice, call: &OpCall) -> Result<()> {
    let Op::Attention { scale, bias, .. } = call.op else { unreachable!("is_wide checked the op") };
    let (q, k, v, o) = (&call.inputs[0], &call.inputs[1], &call.inputs[2], &call.outputs[0]);
    let (b, h, nq, nk) = (q.shape()[0], q.shape()[1], q.shape()[2], k.shape()[2]);
    let (s_bytes, p_bytes) = scratch_bytes(call);
    let s_buf = dev.alloc(s_bytes as usize)?;
    let p_buf = match dev.alloc(p_bytes as usize) {
        Ok(p) => p,
        Err(e) => {
            dev.free(s_buf);
            return Err(e);
        }
    };
    let scores = Layout::contiguous(&[b, h, nq, nk]);
    let s = TensorDesc { buffer: s_buf, dtype: DType::F32, layout: scores.clone() };
    let p = TensorDesc { buffer: p_buf, dtype: p_dtype(q, v), layout: scores };
    // kᵀ as a view: the last two dims swapped.
    let ks = k.strides();
    let kt = TensorDesc {
        buffer: k.buffer,
        dtype: k.dtype,
        layout: Layout {
            shape: vec![b, h, k.shape()[3], nk],
            strides: vec![ks[0], ks[1], ks[3], ks[2]],
            offset: k.layout.offset,
        },
    };
    let run = |op: Op, inputs: &[TensorDesc], output: &TensorDesc| {
        crate::ops::execute(dev, &OpCall { op, inputs, outputs: std::slice::from_ref(output) })
    };
    let matmul = Op::Matmul { bias: false, act: None };
    let result = run(matmul, &[q.clone(), kt], &s)
        .and_then(|_| run(Op::Affine { mul: scale, add: 0.0 }, std::slice::from_ref(&s), &s))
        .and_then(
            |_| if bias { run(Op::Binary(BinaryOp::Add), &[s.clone(), call.inputs[3].clone()], &s) } else { Ok(()) },
        )
        .and_then(|_| run(Op::Softmax, std::slice::from_ref(&s), &p))
        .and_then(|_| run(matmul, &[p.clone(), v.clone()], o));
    // Freed once recorded: later work is ordered after this op's dispatches.
    dev.free(s_buf);
    dev.free(p_buf);
    result
}
