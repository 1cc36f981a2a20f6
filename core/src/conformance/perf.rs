//! `--perf` mode: SD3-sized shapes, timed on the device alone (no reference), with flop and byte counts.

use super::cases::t::{b, c, p, tr};
use super::cases::Case;
use super::spec::{TensorSpec, Values};
use crate::{BinaryOp, DType, Op, UnaryOp};

/// One case per op at the sizes SD3 medium runs at 512² (1024 image tokens, hidden 1536, 24 heads of 64),
/// for every float dtype the device claims.
pub fn perf_cases(dtypes: &[DType]) -> Vec<Case> {
    let mut cases = Vec::new();
    for d in DType::FLOATS.into_iter().filter(|d| dtypes.contains(d)) {
        let (n, hid) = (1024, 1536);
        let x = || c(d, &[1, n, hid]);
        let vec_b = || b(d, &[1, n, hid], &[1]);
        cases.extend([
            Case::new(
                Op::Matmul { bias: true, act: None },
                vec![c(d, &[n, hid]), tr(d, &[hid, hid]), c(d, &[hid])],
                c(d, &[n, hid]),
            )
            .note("linear"),
            Case::new(
                Op::Attention { scale: 0.125, causal: false, bias: false, qk_norm: false, norm_eps: 0.0 },
                vec![c(d, &[1, 24, n, 64]), c(d, &[1, 24, n, 64]), c(d, &[1, 24, n, 64])],
                c(d, &[1, 24, n, 64]),
            ),
            Case::new(
                Op::Conv2d { stride: [1, 1], padding: [1, 1], bias: true },
                vec![c(d, &[1, 128, 128, 128]), c(d, &[128, 128, 3, 3]), c(d, &[128])],
                c(d, &[1, 128, 128, 128]),
            )
            .note("k3x3 s1,1 p1,1"),
            Case::new(Op::LayerNormModulate { eps: 1e-6 }, vec![x(), vec_b(), vec_b()], x()),
            Case::new(Op::GatedResidual, vec![x(), vec_b(), x()], x()),
            Case::new(Op::Modulate, vec![x(), vec_b(), vec_b()], x()),
            Case::new(Op::LayerNorm { eps: 1e-6, affine: false }, vec![x()], x()),
            Case::new(Op::RmsNorm { eps: 1e-6 }, vec![c(d, &[24 * n, 64]), c(d, &[64])], c(d, &[24 * n, 64])),
            Case::new(Op::Softmax, vec![c(d, &[4096, n])], c(d, &[4096, n])),
            Case::new(Op::Unary(UnaryOp::GeluTanh), vec![c(d, &[n, 4 * hid])], c(d, &[n, 4 * hid])),
            Case::new(Op::Unary(UnaryOp::Silu), vec![x()], x()),
            Case::new(Op::Binary(BinaryOp::Add), vec![x(), x()], x()),
            Case::new(Op::Affine { mul: 0.5, add: 0.25 }, vec![x()], x()),
            Case::new(
                Op::GroupNorm { groups: 32, eps: 1e-6, affine: true },
                vec![c(d, &[1, 128, 128, 128]), c(d, &[128]), c(d, &[128])],
                c(d, &[1, 128, 128, 128]),
            ),
            Case::new(Op::UpsampleNearest2d { factor: 2 }, vec![c(d, &[1, 128, 64, 64])], c(d, &[1, 128, 128, 128])),
            Case::new(Op::Copy, vec![p(d, &[1, 24, n, 64], &[0, 2, 1, 3])], c(d, &[1, 24, n, 64])).note("head split"),
            Case::new(
                Op::Gather,
                vec![c(d, &[49408, 768]), c(DType::I32, &[77]).with_values(Values::Ids(49408))],
                c(d, &[77, 768]),
            ),
        ]);
        if d != DType::F32 {
            cases.push(Case::new(Op::Copy, vec![c(DType::F32, &[n, hid])], c(d, &[n, hid])).note("cast"));
        }
    }
    cases
}

/// Floating-point operations of one execution (a multiply-add counts 2), for the compute-bound ops.
pub fn flops(case: &Case) -> Option<f64> {
    let sh = |i: usize| case.inputs[i].shape();
    let out = case.output.shape();
    let prod = |s: &[usize]| s.iter().product::<usize>() as f64;
    match case.op {
        Op::Matmul { .. } => Some(2.0 * prod(out) * *sh(0).last()? as f64),
        Op::Conv2d { .. } => Some(2.0 * prod(out) * prod(&sh(1)[1..])),
        Op::Attention { .. } => {
            let (q, k, v) = (sh(0), sh(1), sh(2));
            Some(2.0 * (q[0] * q[1] * q[2] * k[2]) as f64 * (q[3] + v[3]) as f64)
        }
        _ => None,
    }
}

/// Bytes moved by one execution: each input's distinct elements read once, the output written once
/// (gather reads only the rows it copies).
pub fn bytes(case: &Case) -> f64 {
    let size = |t: &TensorSpec| t.dtype.size_in_bytes() as f64;
    let out = case.output.layout.elem_count() as f64 * size(&case.output);
    let ins: f64 = match case.op {
        Op::Gather => out + case.inputs[1].layout.elem_count() as f64 * size(&case.inputs[1]),
        _ => case.inputs.iter().map(|t| t.layout.elem_count().min(t.buffer_elems) as f64 * size(t)).sum(),
    };
    ins + out
}
