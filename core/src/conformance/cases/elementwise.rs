//! Cases of the data-movement and elementwise ops: copy/cast, fill, unary, binary, affine, upsample, gather.

use super::t::{b, c, p, s, tr, uni};
use super::Case;
use crate::conformance::spec::Values;
use crate::{BinaryOp, DType, Op, UnaryOp};

/// Copy between every ordered pair of the device's dtypes, plus layout variants within each float dtype.
pub fn copy_cases(dtypes: &[DType]) -> Vec<Case> {
    let mut cases = Vec::new();
    for &from in dtypes {
        for &to in dtypes {
            // Values every dtype of the pair holds exactly enough; float→int conversion truncates toward zero,
            // and out-of-range conversions are undefined, so they are not tested.
            let v = if from == DType::U8 || to == DType::U8 {
                uni(0.0, 100.0)
            } else if !from.is_float() || !to.is_float() {
                uni(-100.0, 100.0)
            } else {
                uni(-1.0, 1.0)
            };
            cases.push(Case::new(Op::Copy, vec![c(from, &[7, 13]).with_values(v)], c(to, &[7, 13])));
            cases.push(Case::new(Op::Copy, vec![p(from, &[3, 5, 17], &[1, 0, 2]).with_values(v)], c(to, &[3, 5, 17])));
            cases.push(Case::new(Op::Copy, vec![s(from, &[5, 31]).with_values(v)], s(to, &[5, 31])));
            if from == to && from.is_float() {
                cases.push(Case::new(Op::Copy, vec![b(from, &[7, 13], &[0])], c(to, &[7, 13])));
                cases.push(Case::new(Op::Copy, vec![tr(from, &[17, 9])], s(to, &[17, 9])));
                cases.push(Case::new(Op::Copy, vec![c(from, &[1, 9, 1])], c(to, &[1, 9, 1])));
            }
        }
    }
    cases
}

pub fn fill_cases(d: DType) -> Vec<Case> {
    vec![
        Case::new(Op::Fill { value: 0.7 }, vec![], c(d, &[1023])),
        Case::new(Op::Fill { value: -3.25 }, vec![], s(d, &[5, 31])),
        Case::new(Op::Fill { value: 1.5 }, vec![], c(d, &[1])),
    ]
}

/// The input range of a unary op: the usual `[-1, 1)`, and a wide one that reaches the tails.
fn unary_ranges(f: UnaryOp) -> (Values, Values, &'static str) {
    match f {
        UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt => (uni(0.05, 2.0), uni(0.01, 100.0), "x∈[0.01,100)"),
        UnaryOp::Recip => (Values::AwayFromZero(0.1, 2.0), Values::AwayFromZero(0.01, 100.0), "|x|∈[0.01,100)"),
        UnaryOp::Sin | UnaryOp::Cos => (uni(-1.0, 1.0), uni(-100.0, 100.0), "x∈[-100,100)"),
        _ => (uni(-1.0, 1.0), uni(-10.0, 10.0), "x∈[-10,10)"),
    }
}

pub fn unary_cases(d: DType) -> Vec<Case> {
    let mut cases = Vec::new();
    for f in UnaryOp::ALL {
        let (v, wide, wide_note) = unary_ranges(f);
        let op = Op::Unary(f);
        cases.push(Case::new(op, vec![c(d, &[1023]).with_values(v)], c(d, &[1023])));
        cases.push(Case::new(op, vec![c(d, &[3, 1, 65]).with_values(v)], c(d, &[3, 1, 65])));
        cases.push(Case::new(op, vec![tr(d, &[17, 9]).with_values(v)], c(d, &[17, 9])));
        cases.push(Case::new(op, vec![s(d, &[5, 31]).with_values(v)], s(d, &[5, 31])));
        cases.push(Case::new(op, vec![c(d, &[4, 257]).with_values(wide)], c(d, &[4, 257])).note(wide_note));
    }
    cases
}

pub fn binary_cases(d: DType) -> Vec<Case> {
    let mut cases = Vec::new();
    for f in BinaryOp::ALL {
        let op = Op::Binary(f);
        // Divisors stay away from zero so the quotient is well conditioned in every dtype.
        let rhs = if f == BinaryOp::Div { Values::AwayFromZero(0.25, 2.0) } else { uni(-1.0, 1.0) };
        let shapes = [
            (c(d, &[37, 65]), c(d, &[37, 65]), c(d, &[37, 65])),
            (c(d, &[37, 65]), b(d, &[37, 65], &[0]), c(d, &[37, 65])),
            (b(d, &[37, 65], &[1]), c(d, &[37, 65]), c(d, &[37, 65])),
            (b(d, &[4, 5, 9], &[1]), b(d, &[4, 5, 9], &[0]), c(d, &[4, 5, 9])),
            (tr(d, &[17, 9]), s(d, &[17, 9]), s(d, &[17, 9])),
            (c(d, &[1, 1, 7]), c(d, &[1, 1, 7]), c(d, &[1, 1, 7])),
        ];
        for (a, bb, y) in shapes {
            cases.push(Case::new(op, vec![a, bb.with_values(rhs)], y));
        }
    }
    cases
}

pub fn affine_cases(d: DType) -> Vec<Case> {
    let op = Op::Affine { mul: 1.5, add: -0.25 };
    vec![
        Case::new(op, vec![c(d, &[1023])], c(d, &[1023])),
        Case::new(op, vec![tr(d, &[17, 9])], s(d, &[17, 9])),
        Case::new(op, vec![c(d, &[1, 1])], c(d, &[1, 1])),
        Case::new(Op::Affine { mul: -0.125, add: 3.0 }, vec![c(d, &[3, 77])], c(d, &[3, 77])),
    ]
}

pub fn upsample_cases(d: DType) -> Vec<Case> {
    let up = |f| Op::UpsampleNearest2d { factor: f };
    vec![
        Case::new(up(2), vec![c(d, &[1, 3, 5, 7])], c(d, &[1, 3, 10, 14])),
        Case::new(up(3), vec![c(d, &[2, 2, 3, 4])], c(d, &[2, 2, 9, 12])),
        Case::new(up(2), vec![s(d, &[1, 4, 5, 6])], s(d, &[1, 4, 10, 12])),
        Case::new(up(2), vec![c(d, &[1, 1, 1, 1])], c(d, &[1, 1, 2, 2])),
    ]
}

/// Gather with i32 and i64 ids (every id drawn uniformly from the table's rows, so repeats occur).
pub fn gather_cases(d: DType) -> Vec<Case> {
    let mut cases = Vec::new();
    for ids in [DType::I32, DType::I64] {
        let id = |n: usize, v: usize| c(ids, &[n]).with_values(Values::Ids(v));
        cases.push(Case::new(Op::Gather, vec![c(d, &[50, 33]), id(17, 50)], c(d, &[17, 33])));
        cases.push(Case::new(Op::Gather, vec![c(d, &[50, 33]), id(1, 50)], c(d, &[1, 33])));
        cases.push(Case::new(Op::Gather, vec![s(d, &[40, 24]), id(300, 40)], s(d, &[300, 24])));
    }
    cases
}
