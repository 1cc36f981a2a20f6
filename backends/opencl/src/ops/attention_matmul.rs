//! Attention whose head dims are beyond the fused kernels (the VAE's mid-block attention: one head of 512), as
//! this backend's own kernels in sequence, per chunk of query rows: S = q·kᵀ (f32, in a temporary), S·scale
//! (+ bias), P = softmax(S) in v's dtype, o = P·v. The chunk bounds the temporaries (at most [`chunk_scores`] scores);
//! q·kᵀ and P·v are matmuls, so f16/bf16 inputs run on the tensor cores where the device has them.

use super::{elementwise, gemm, reduce, Ctx};
use sd3_core::{BinaryOp, DType, Layout, Op, OpCall, Result, TensorDesc};

/// Scores per chunk (256 MiB of f32); `SD3_OPENCL_ATTN_CHUNK` sets another count (the tests use it to
/// exercise the chunking on small shapes).
fn chunk_scores() -> usize {
    std::env::var("SD3_OPENCL_ATTN_CHUNK").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(1 << 26)
}

/// A view of `t` restricted to rows `r0..r0 + rows` of dim 2.
fn rows_of(t: &TensorDesc, r0: usize, rows: usize) -> TensorDesc {
    let mut d = t.clone();
    d.layout.shape[2] = rows;
    d.layout.offset += r0 * t.strides()[2];
    d
}

/// Whether this path takes the call: no causal mask and no q/k norm (those only exist with small heads).
pub fn applies(op: &Op) -> bool {
    matches!(op, Op::Attention { causal: false, qk_norm: false, .. })
}

pub fn run(cx: &mut Ctx, call: &OpCall, scale: f32, bias: bool) -> Result<()> {
    let (q, k, v, o) = (&call.inputs[0], &call.inputs[1], &call.inputs[2], &call.outputs[0]);
    let (b, h, nq, dh) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let nk = k.shape()[2];
    let rows = (chunk_scores() / (b * h * nk).max(1)).clamp(1, nq);
    let mem = &cx.dev.memory;
    let s_buf = mem.alloc(&cx.dev.context, b * h * rows * nk * 4)?;
    let p_buf = match mem.alloc(&cx.dev.context, b * h * rows * nk * v.dtype.size_in_bytes()) {
        Ok(p) => p,
        Err(e) => {
            mem.free(s_buf);
            return Err(e);
        }
    };
    // kᵀ as a [b, h, dh, nk] view.
    let ks = k.strides();
    let kt = TensorDesc {
        buffer: k.buffer,
        dtype: k.dtype,
        layout: Layout {
            shape: vec![b, h, dh, nk],
            strides: vec![ks[0], ks[1], ks[3], ks[2]],
            offset: k.layout.offset,
        },
    };
    let result = (|| {
        for r0 in (0..nq).step_by(rows) {
            let n = rows.min(nq - r0);
            let s = [TensorDesc { buffer: s_buf, dtype: DType::F32, layout: Layout::contiguous(&[b, h, n, nk]) }];
            let p = TensorDesc { buffer: p_buf, dtype: v.dtype, layout: Layout::contiguous(&[b, h, n, nk]) };
            let matmul = Op::Matmul { bias: false, act: None };
            let qc = rows_of(q, r0, n);
            gemm::matmul(cx, &OpCall { op: matmul, inputs: &[qc, kt.clone()], outputs: &s }, false, None)?;
            let affine = Op::Affine { mul: scale, add: 0.0 };
            elementwise::map(cx, &OpCall { op: affine, inputs: &s, outputs: &s })?;
            if bias {
                let with_bias = [s[0].clone(), rows_of(&call.inputs[3], r0, n)];
                elementwise::map(cx, &OpCall { op: Op::Binary(BinaryOp::Add), inputs: &with_bias, outputs: &s })?;
            }
            reduce::run(cx, &OpCall { op: Op::Softmax, inputs: &s, outputs: std::slice::from_ref(&p) })?;
            let oc = rows_of(o, r0, n);
            gemm::matmul(cx, &OpCall { op: matmul, inputs: &[p, v.clone()], outputs: &[oc] }, false, None)?;
        }
        Ok(())
    })();
    // Released now; OpenCL keeps the memory until the queued kernels that use it are done.
    mem.free(s_buf);
    mem.free(p_buf);
    result
}
