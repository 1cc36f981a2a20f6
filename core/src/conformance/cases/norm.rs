//! Cases of the row-reduction and modulation ops: softmax, layer/RMS norm, adaLN modulate, gated residual,
//! group norm.

use super::t::{b, c, s, tr, uni};
use super::Case;
use crate::{DType, Op};

pub fn softmax_cases(d: DType) -> Vec<Case> {
    let op = Op::Softmax;
    vec![
        Case::new(op, vec![c(d, &[7, 1001])], c(d, &[7, 1001])),
        Case::new(op, vec![c(d, &[1, 1])], c(d, &[1, 1])),
        Case::new(op, vec![s(d, &[3, 5, 64])], s(d, &[3, 5, 64])),
        Case::new(op, vec![tr(d, &[33, 17])], c(d, &[33, 17])),
        // exp(100) overflows f32: a softmax that skips the max subtraction fails here.
        Case::new(op, vec![c(d, &[4, 300]).with_values(uni(-100.0, 100.0))], c(d, &[4, 300])).note("x∈[-100,100)"),
    ]
}

pub fn layer_norm_cases(d: DType) -> Vec<Case> {
    let mut cases = Vec::new();
    for (affine, eps) in [(false, 1e-6), (true, 1e-5)] {
        let op = Op::LayerNorm { eps, affine };
        let case = |x: crate::conformance::spec::TensorSpec, y| {
            let dim = *x.shape().last().unwrap();
            let mut ins = vec![x];
            if affine {
                ins.extend([c(d, &[dim]), c(d, &[dim])]);
            }
            Case::new(op, ins, y)
        };
        cases.push(case(c(d, &[9, 77]), c(d, &[9, 77])));
        cases.push(case(c(d, &[2, 3, 1024]), c(d, &[2, 3, 1024])));
        cases.push(case(s(d, &[5, 31]), s(d, &[5, 31])));
        cases.push(case(tr(d, &[16, 24]), c(d, &[16, 24])));
        // A large mean with a small spread: E[x²]−E[x]² in f32 cancels catastrophically here.
        cases.push(case(c(d, &[8, 256]).with_values(uni(5.0, 7.0)), c(d, &[8, 256])).note("x∈[5,7)"));
    }
    cases
}

pub fn rms_norm_cases(d: DType) -> Vec<Case> {
    let op = Op::RmsNorm { eps: 1e-6 };
    let case = |x: crate::conformance::spec::TensorSpec, y| {
        let dim = *x.shape().last().unwrap();
        Case::new(op, vec![x, c(d, &[dim])], y)
    };
    vec![
        case(c(d, &[9, 77]), c(d, &[9, 77])),
        case(s(d, &[2, 5, 64]), s(d, &[2, 5, 64])),
        case(tr(d, &[16, 24]), c(d, &[16, 24])),
        case(c(d, &[6, 1]), c(d, &[6, 1])),
        case(c(d, &[1, 3072]), c(d, &[1, 3072])),
    ]
}

/// Layer-norm-modulate, modulate and gated residual share their operand shapes: `x`, and two per-sample
/// vectors broadcast over the tokens (as adaLN uses them), or full tensors.
pub fn modulate_cases(d: DType) -> Vec<Case> {
    let mut cases = Vec::new();
    for op in [Op::LayerNormModulate { eps: 1e-6 }, Op::Modulate, Op::GatedResidual] {
        let gated = op == Op::GatedResidual;
        // For the gated residual the operands are (x, gate, r): r is a full tensor, gate is broadcast.
        let third = |shape: &[usize], dims: &[usize]| if gated { c(d, shape) } else { b(d, shape, dims) };
        let sh = [2, 9, 64];
        cases.push(Case::new(op, vec![c(d, &sh), b(d, &sh, &[1]), third(&sh, &[1])], c(d, &sh)));
        let sh = [3, 5, 32];
        cases.push(Case::new(op, vec![c(d, &sh), c(d, &sh), c(d, &sh)], c(d, &sh)));
        let sh = [2, 7, 40];
        let last = if gated { tr(d, &sh) } else { b(d, &sh, &[1]) };
        cases.push(Case::new(op, vec![s(d, &sh), b(d, &sh, &[1]), last], s(d, &sh)));
        let sh = [1, 1, 1];
        cases.push(Case::new(op, vec![c(d, &sh), c(d, &sh), c(d, &sh)], c(d, &sh)));
    }
    cases
}

pub fn group_norm_cases(d: DType) -> Vec<Case> {
    let gn = |groups, eps, affine| Op::GroupNorm { groups, eps, affine };
    let affine_case = |op, x: crate::conformance::spec::TensorSpec, y| {
        let ch = x.shape()[1];
        Case::new(op, vec![x, c(d, &[ch]), c(d, &[ch])], y)
    };
    vec![
        affine_case(gn(3, 1e-5, true), c(d, &[2, 6, 5, 7]), c(d, &[2, 6, 5, 7])),
        affine_case(gn(32, 1e-6, true), c(d, &[1, 32, 8, 8]), c(d, &[1, 32, 8, 8])),
        affine_case(gn(32, 1e-6, true), c(d, &[2, 64, 4, 4]), c(d, &[2, 64, 4, 4])),
        Case::new(gn(1, 1e-5, false), vec![c(d, &[2, 4, 9])], c(d, &[2, 4, 9])),
        affine_case(gn(4, 1e-6, true), s(d, &[1, 8, 6, 6]), s(d, &[1, 8, 6, 6])),
        affine_case(gn(4, 1e-6, true), c(d, &[1, 16, 8, 8]).with_values(uni(5.0, 7.0)), c(d, &[1, 16, 8, 8]))
            .note("x∈[5,7)"),
    ]
}
