//! Cases of the compute-bound ops: matmul (with mixed-precision weights), attention, conv2d.

use super::t::{b, c, p, s, tr};
use super::Case;
use crate::conformance::spec::TensorSpec;
use crate::{DType, Layout, Op, UnaryOp};

/// Matmul in one dtype, plus f32 activations with `d` weights (and bias) when `d` is a half type and the
/// device also computes in f32.
pub fn matmul_cases(d: DType, floats: &[DType]) -> Vec<Case> {
    let mm = |bias| Op::Matmul { bias, act: None };
    let act = |bias, u| Op::Matmul { bias, act: Some(u) };
    let mut cases = vec![
        Case::new(mm(false), vec![c(d, &[1, 64]), c(d, &[64, 37])], c(d, &[1, 37])),
        Case::new(mm(false), vec![c(d, &[17, 33]), c(d, &[33, 29])], c(d, &[17, 29])),
        Case::new(mm(false), vec![c(d, &[17, 33]), tr(d, &[33, 29])], c(d, &[17, 29])),
        Case::new(mm(false), vec![tr(d, &[17, 33]), c(d, &[33, 29])], c(d, &[17, 29])),
        Case::new(mm(false), vec![s(d, &[13, 21]), s(d, &[21, 9])], s(d, &[13, 9])),
        Case::new(mm(false), vec![c(d, &[3, 19, 24]), c(d, &[3, 24, 11])], c(d, &[3, 19, 11])),
        Case::new(mm(false), vec![c(d, &[2, 3, 8, 16]), b(d, &[2, 3, 16, 5], &[0, 1])], c(d, &[2, 3, 8, 5])),
        Case::new(mm(true), vec![c(d, &[17, 33]), tr(d, &[33, 29]), c(d, &[29])], c(d, &[17, 29])),
        Case::new(mm(false), vec![c(d, &[8, 1031]), c(d, &[1031, 16])], c(d, &[8, 16])),
        Case::new(mm(false), vec![c(d, &[5, 1]), c(d, &[1, 7])], c(d, &[5, 7])),
        Case::new(mm(false), vec![c(d, &[9, 20]), c(d, &[20, 1])], c(d, &[9, 1])),
        // A linear layer writing rows of a bigger buffer: rank 3, weight broadcast over the batch, output rows
        // strided with a gap between batches.
        Case::new(mm(true), vec![c(d, &[2, 7, 16]), linear_weight(d, 2, 16, 24), c(d, &[24])], s(d, &[2, 7, 24])),
        // Activation epilogues: GELU (tanh) after a linear layer, others batched and into a strided output.
        Case::new(act(true, UnaryOp::GeluTanh), vec![c(d, &[17, 33]), tr(d, &[33, 29]), c(d, &[29])], c(d, &[17, 29])),
        Case::new(act(false, UnaryOp::Silu), vec![c(d, &[3, 19, 24]), c(d, &[3, 24, 11])], c(d, &[3, 19, 11])),
        Case::new(act(true, UnaryOp::GeluErf), vec![s(d, &[13, 21]), tr(d, &[21, 9]), c(d, &[9])], s(d, &[13, 9])),
        // The gated residual as a linear's epilogue, one gate row per batch element (the MM-DiT's): small, then on
        // the whole-tile shader's terms (f16: K a multiple of 64) with partial last row and column tiles, then one
        // whole tile without bias.
        residual(d, true, 2, 9, 16, 24),
        residual(d, true, 2, 130, 64, 136),
        residual(d, false, 1, 128, 128, 128),
    ];
    if d != DType::F32 && floats.contains(&DType::F32) {
        let f = DType::F32;
        cases.extend([
            Case::new(mm(false), vec![c(f, &[17, 33]), c(d, &[33, 29])], c(f, &[17, 29])),
            Case::new(mm(true), vec![c(f, &[17, 33]), tr(d, &[33, 29]), c(d, &[29])], c(f, &[17, 29])),
            Case::new(mm(false), vec![c(f, &[3, 19, 24]), b(d, &[3, 24, 11], &[0])], c(f, &[3, 19, 11])),
            Case::new(
                act(true, UnaryOp::GeluTanh),
                vec![c(f, &[17, 33]), tr(d, &[33, 29]), c(d, &[29])],
                c(f, &[17, 29]),
            ),
        ]);
    }
    cases
}

/// `x + gate·(a·Wᵀ (+ bias))` with `a [batch, m, k]`, an `nn.Linear` weight, `x [batch, m, n]` and a gate of one
/// row per batch element.
fn residual(d: DType, bias: bool, batch: usize, m: usize, k: usize, n: usize) -> Case {
    let mut ins = vec![c(d, &[batch, m, k]), linear_weight(d, batch, k, n)];
    if bias {
        ins.push(c(d, &[n]));
    }
    ins.extend([c(d, &[batch, m, n]), b(d, &[batch, m, n], &[1])]);
    Case::new(Op::MatmulGatedResidual { bias }, ins, c(d, &[batch, m, n]))
}

/// An `nn.Linear` weight `[N, K]` viewed as the right operand `[batch, K, N]`: transposed, batch stride 0.
fn linear_weight(d: DType, batch: usize, k: usize, n: usize) -> TensorSpec {
    let layout = Layout { shape: vec![batch, k, n], strides: vec![0, 1, k], offset: 0 };
    TensorSpec { tag: "TB", layout, buffer_elems: k * n, ..c(d, &[k, n]) }
}

/// q, k, v as the MM-DiT's joint attention reads them: views `[B, H, N, Dh]` of one `[B, N, 3, H, Dh]` buffer (token
/// stride 3·H·Dh, k and v at offsets H·Dh and 2·H·Dh), the output written through a `[B, N, H, Dh]` view.
fn joint_qkv_case(d: DType) -> Case {
    let (bs, h, n, dh) = (2, 3, 9, 16);
    let dim = h * dh;
    let view = |part: usize| {
        let layout =
            Layout { shape: vec![bs, h, n, dh], strides: vec![n * 3 * dim, dh, 3 * dim, 1], offset: part * dim };
        TensorSpec { tag: "J", layout, buffer_elems: bs * n * 3 * dim, ..c(d, &[bs, h, n, dh]) }
    };
    let op = Op::Attention { scale: 0.25, causal: false, bias: false, qk_norm: false, norm_eps: 0.0 };
    Case::new(op, vec![view(0), view(1), view(2)], p(d, &[bs, h, n, dh], &[0, 2, 1, 3])).note("joint qkv")
}

/// How an attention case's bias is laid out.
#[derive(Clone, Copy, PartialEq)]
enum Bias {
    None,
    /// A full `[B,H,Nq,Nk]` bias.
    Full,
    /// One `[Nq,Nk]` mask shared by every batch and head (stride 0 over B, H).
    PerQueryKey,
    /// A key-padding bias `[B,1,1,Nk]` (stride 0 over H, Nq).
    PerKey,
}

struct Attn {
    b: usize,
    h: usize,
    nq: usize,
    nk: usize,
    dh: usize,
    dv: usize,
    causal: bool,
    bias: Bias,
    qk_norm: bool,
    /// q, k, v stored `[B,N,H,D]` (as a linear layer writes them) and viewed as `[B,H,N,D]`.
    permuted: bool,
    sliced_out: bool,
}

const BASE: Attn = Attn {
    b: 1,
    h: 2,
    nq: 7,
    nk: 7,
    dh: 16,
    dv: 16,
    causal: false,
    bias: Bias::None,
    qk_norm: false,
    permuted: false,
    sliced_out: false,
};

fn attention_case(d: DType, a: Attn) -> Case {
    let qkv = |n: usize, dim: usize| -> TensorSpec {
        let shape = [a.b, a.h, n, dim];
        if a.permuted {
            p(d, &shape, &[0, 2, 1, 3])
        } else {
            c(d, &shape)
        }
    };
    let full = [a.b, a.h, a.nq, a.nk];
    let mut inputs = vec![qkv(a.nq, a.dh), qkv(a.nk, a.dh), qkv(a.nk, a.dv)];
    match a.bias {
        Bias::None => {}
        Bias::Full => inputs.push(c(d, &full)),
        Bias::PerQueryKey => inputs.push(b(d, &full, &[0, 1])),
        Bias::PerKey => inputs.push(b(d, &full, &[1, 2])),
    }
    if a.qk_norm {
        inputs.extend([c(d, &[a.dh]), c(d, &[a.dh])]);
    }
    let out_shape = [a.b, a.h, a.nq, a.dv];
    let out = if a.sliced_out { s(d, &out_shape) } else { c(d, &out_shape) };
    let op = Op::Attention {
        scale: 1.0 / (a.dh as f32).sqrt(),
        causal: a.causal,
        bias: a.bias != Bias::None,
        qk_norm: a.qk_norm,
        norm_eps: if a.qk_norm { 1e-6 } else { 0.0 },
    };
    let mut note = Vec::new();
    if a.causal {
        note.push("causal");
    }
    if a.qk_norm {
        note.push("qk_norm");
    }
    Case::new(op, inputs, out).note(note.join("+"))
}

pub fn attention_cases(d: DType) -> Vec<Case> {
    let cases = [
        BASE,
        Attn { b: 2, h: 3, nq: 5, nk: 11, dh: 24, dv: 40, ..BASE },
        Attn { nq: 33, nk: 1027, dh: 64, dv: 64, ..BASE },
        Attn { nq: 33, nk: 1027, dh: 64, dv: 64, bias: Bias::Full, qk_norm: true, ..BASE },
        Attn { h: 1, nq: 1030, nk: 1030, dh: 32, dv: 32, causal: true, ..BASE },
        Attn { b: 2, nq: 9, nk: 9, causal: true, bias: Bias::PerQueryKey, qk_norm: true, ..BASE },
        Attn { b: 2, h: 3, nq: 6, nk: 13, dh: 32, dv: 32, bias: Bias::PerKey, ..BASE },
        Attn { h: 3, nq: 17, nk: 17, dh: 32, dv: 32, qk_norm: true, permuted: true, ..BASE },
        // Causal with fewer queries than keys pins the convention: query i sees keys 0..=i.
        Attn { h: 1, nq: 5, nk: 9, causal: true, ..BASE },
        Attn { h: 4, nq: 1, nk: 1001, dh: 64, dv: 64, ..BASE },
        Attn { b: 2, nq: 6, nk: 10, sliced_out: true, ..BASE },
    ];
    let mut cases: Vec<Case> = cases.into_iter().map(|a| attention_case(d, a)).collect();
    cases.push(joint_qkv_case(d));
    cases
}

/// The attention's backward: `[B,H,N,D]` operands, the `[3,B,H,N,D]` output. Small and causal; then the MM-DiT's
/// case (head dim 64, tokens-first views as a linear layer writes them, N not a multiple of a 64-row tile, the
/// gradients written tokens first).
pub fn attention_backward_cases(d: DType) -> Vec<Case> {
    let op = |causal| Op::AttentionBackward { scale: 0.25, causal };
    let plain = |shape: &[usize]| vec![c(d, shape); 5];
    let tokens_first = |shape: &[usize]| vec![p(d, shape, &[0, 2, 1, 3]); 5];
    let grads = |shape: &[usize]| [&[3][..], shape].concat();
    let (small, mmdit) = ([1, 2, 7, 16], [2, 3, 130, 64]);
    vec![
        Case::new(op(false), plain(&small), c(d, &grads(&small))),
        Case::new(op(true), plain(&[2, 1, 9, 16]), c(d, &grads(&[2, 1, 9, 16]))).note("causal"),
        Case::new(op(false), tokens_first(&mmdit), p(d, &grads(&mmdit), &[0, 1, 3, 2, 4])).note("tokens first"),
        Case::new(op(false), plain(&[1, 1, 64, 64]), c(d, &grads(&[1, 1, 64, 64]))),
    ]
}

fn conv_case(
    d: DType,
    x: TensorSpec,
    w: [usize; 4],
    stride: [usize; 2],
    padding: [usize; 2],
    bias: bool,
    sliced_out: bool,
) -> Case {
    let xs = x.shape().to_vec();
    let oh = (xs[2] + 2 * padding[0] - w[2]) / stride[0] + 1;
    let ow = (xs[3] + 2 * padding[1] - w[3]) / stride[1] + 1;
    let out_shape = [xs[0], w[0], oh, ow];
    let mut inputs = vec![x, c(d, &w)];
    if bias {
        inputs.push(c(d, &[w[0]]));
    }
    let out = if sliced_out { s(d, &out_shape) } else { c(d, &out_shape) };
    let note = format!("k{}x{} s{},{} p{},{}", w[2], w[3], stride[0], stride[1], padding[0], padding[1]);
    Case::new(Op::Conv2d { stride, padding, bias }, inputs, out).note(note)
}

pub fn conv2d_cases(d: DType) -> Vec<Case> {
    vec![
        conv_case(d, c(d, &[1, 3, 9, 11]), [5, 3, 3, 3], [1, 1], [1, 1], true, false),
        conv_case(d, c(d, &[1, 3, 9, 11]), [5, 3, 3, 3], [2, 2], [1, 1], true, false),
        conv_case(d, c(d, &[2, 8, 7, 5]), [6, 8, 1, 1], [1, 1], [0, 0], false, false),
        conv_case(d, c(d, &[2, 8, 7, 5]), [6, 8, 1, 1], [2, 2], [0, 0], true, false),
        conv_case(d, c(d, &[1, 4, 10, 9]), [3, 4, 3, 3], [2, 1], [0, 1], false, false),
        conv_case(d, s(d, &[1, 4, 6, 7]), [4, 4, 3, 3], [1, 1], [1, 1], true, true),
        conv_case(d, c(d, &[1, 32, 16, 16]), [16, 32, 3, 3], [1, 1], [1, 1], true, false),
        conv_case(d, c(d, &[1, 3, 6, 8]), [5, 3, 2, 3], [1, 1], [0, 0], false, false),
    ]
}
