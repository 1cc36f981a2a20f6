//! Attention with head dims beyond the fused kernels (above 256: the VAE's single 512-wide head), which this
//! backend runs as matmuls and a softmax per chunk of query rows (src/ops/attention_matmul.rs), against
//! `ReferenceDevice`. Skips, with the reason printed, only on a machine without an OpenCL platform.

mod common;

use sd3_core::testing::{tol_for, Spec};
use sd3_core::DType::{BF16, F16, F32};
use sd3_core::{BufferId, Device, Layout, Op, OpCall, TensorDesc};

fn attention(bias: bool) -> Op {
    Op::Attention { scale: 0.06, causal: false, bias, qk_norm: false, norm_eps: 0.0 }
}

#[test]
fn wide_heads_match_the_reference() {
    let Some(dev) = common::device() else { return };
    // Different q/k and v widths, strided (head-interleaved) q, a bias broadcast over heads.
    let (b, h, nq, nk, dh, dv) = (2, 2, 37, 50, 320, 272);
    let q = Spec::permuted(&[b, h, nq, dh], &[0, 2, 1, 3], F32);
    let (k, v) = (Spec::new(&[b, h, nk, dh], F32), Spec::new(&[b, h, nk, dv], F32));
    let out = Spec::new(&[b, h, nq, dv], F32);
    common::check("wide f32", attention(false), &[q.clone(), k.clone(), v.clone()], &out, tol_for(F32, 2e-4));
    let bias = Spec::strided(&[b, h, nq, nk], &[nq * nk, 0, nk, 1], 0, F32);
    common::check("wide f32 bias", attention(true), &[q, k, v, bias], &out, tol_for(F32, 2e-4));
    // The VAE's shape class: one head of 512, f16 and bf16 (the tensor-core matmuls where there are some).
    for dt in [F16, BF16] {
        let s = || Spec::new(&[1, 1, 300, 512], dt);
        common::check(&format!("vae-like {dt}"), attention(false), &[s(), s(), s()], &s(), tol_for(dt, 0.0));
    }
    // A causal mask with a wide head is declined (the host runs it), not mis-computed.
    let desc = |shape: &[usize]| TensorDesc { buffer: BufferId(1), dtype: F32, layout: Layout::contiguous(shape) };
    let qkv = [desc(&[1, 1, 4, 300]), desc(&[1, 1, 4, 300]), desc(&[1, 1, 4, 300])];
    let causal = Op::Attention { scale: 1.0, causal: true, bias: false, qk_norm: false, norm_eps: 0.0 };
    let out = [desc(&[1, 1, 4, 300])];
    assert!(!dev.supports(&OpCall { op: causal, inputs: &qkv, outputs: &out }));
    assert!(dev.supports(&OpCall { op: attention(false), inputs: &qkv, outputs: &out }));
}

/// Chunks of query rows (the temporaries hold at most `SD3_OPENCL_ATTN_CHUNK` scores): 7 rows per chunk here,
/// with a last partial chunk.
#[test]
fn wide_heads_in_chunks() {
    if common::device().is_none() {
        return;
    }
    std::env::set_var("SD3_OPENCL_ATTN_CHUNK", (2 * 3 * 40 * 7).to_string());
    let (b, h, nq, nk, d) = (2, 3, 45, 40, 288);
    let (q, k, v) = (Spec::new(&[b, h, nq, d], F16), Spec::new(&[b, h, nk, d], F16), Spec::new(&[b, h, nk, d], F16));
    common::check("wide chunked", attention(false), &[q, k, v], &Spec::new(&[b, h, nq, d], F16), tol_for(F16, 0.0));
    std::env::remove_var("SD3_OPENCL_ATTN_CHUNK");
}
