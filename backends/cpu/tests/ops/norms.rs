//! Softmax, layer norm, RMS norm, fused LN + modulate, group norm.

use crate::*;
use sd3_core::{DType, Op};

/// f32 row reductions: statistics in f64, the rest f32.
const NORM: f64 = 1e-10;

#[test]
fn softmax_rows() {
    for dt in FLOATS {
        for d in [1, 7, 129, 1100] {
            let x = spec(dt, &[3, d]).gen(Gen::Uniform(-8.0, 8.0));
            check(&format!("softmax {dt} {d}"), Op::Softmax, &[x], &spec(dt, &[3, d]), NORM);
        }
        let x = spec(dt, &[5, 33]).transposed();
        check(&format!("softmax strided {dt}"), Op::Softmax, &[x], &spec(dt, &[5, 33]).sliced(), NORM);
    }
}

#[test]
fn layer_norm_plain_and_affine() {
    for dt in FLOATS {
        for d in [1, 7, 33, 1536] {
            let shape = [2, 5, d];
            let x = spec(dt, &shape).gen(Gen::Uniform(-3.0, 5.0));
            let op = Op::LayerNorm { eps: 1e-6, affine: false };
            check(&format!("ln {dt} {d}"), op, std::slice::from_ref(&x), &spec(dt, &shape), NORM);
            let (w, b) = (spec(dt, &[d]), spec(DType::F32, &[d]));
            let op = Op::LayerNorm { eps: 1e-5, affine: true };
            check(&format!("ln affine {dt} {d}"), op, &[x, w, b], &spec(dt, &shape).sliced(), NORM);
        }
    }
}

#[test]
fn rms_norm_rows() {
    for dt in FLOATS {
        for d in [1, 7, 64, 129] {
            let x = spec(dt, &[4, 3, d]).permuted(&[1, 0, 2]);
            let w = spec(dt, &[d]).sliced();
            check(&format!("rms {dt} {d}"), Op::RmsNorm { eps: 1e-6 }, &[x, w], &spec(dt, &[4, 3, d]), NORM);
        }
    }
}

#[test]
fn layer_norm_modulate_broadcast_scale_shift() {
    for dt in FLOATS {
        for d in [7, 129, 1536] {
            let shape = [2, 9, d];
            let x = spec(dt, &shape);
            // adaLN: per-sample scale/shift broadcast over the tokens.
            let s = spec(dt, &shape).broadcast(&[1]).gen(Gen::Uniform(-0.5, 0.5));
            let h = spec(DType::F32, &shape).broadcast(&[1]);
            let op = Op::LayerNormModulate { eps: 1e-6 };
            check(&format!("lnmod {dt} {d}"), op, &[x, s, h], &spec(dt, &shape).sliced(), NORM);
        }
    }
}

#[test]
fn group_norm_shapes() {
    for dt in FLOATS {
        for (shape, groups) in [(vec![2, 8, 5, 7], 4), (vec![1, 6, 33], 3), (vec![2, 4, 3, 3], 1), (vec![3, 5], 5)] {
            let x = spec(dt, &shape).gen(Gen::Uniform(-1.0, 3.0));
            let op = Op::GroupNorm { groups, eps: 1e-6, affine: false };
            check(&format!("gn {dt} {shape:?}"), op, std::slice::from_ref(&x), &spec(dt, &shape), NORM);
            let c = shape[1];
            let op = Op::GroupNorm { groups, eps: 1e-5, affine: true };
            let xs = spec(dt, &shape).sliced();
            check(
                &format!("gn affine {dt} {shape:?}"),
                op,
                &[xs, spec(dt, &[c]), spec(dt, &[c])],
                &spec(dt, &shape),
                NORM,
            );
        }
    }
}

#[test]
fn norms_keep_precision_when_the_mean_is_large() {
    // Values near 1000 with a spread of 2: the deviation from the mean must not lose digits to f32 rounding.
    let shape = [3, 7, 1536];
    let x = spec(DType::F32, &shape).gen(Gen::Uniform(1000.0, 1002.0));
    let op = Op::LayerNorm { eps: 1e-6, affine: false };
    check("ln large mean", op, std::slice::from_ref(&x), &spec(DType::F32, &shape), NORM);
    let (s, h) = (spec(DType::F32, &shape).broadcast(&[1]), spec(DType::F32, &shape).broadcast(&[1]));
    check("lnmod large mean", Op::LayerNormModulate { eps: 1e-6 }, &[x, s, h], &spec(DType::F32, &shape), NORM);
    let shape = [2, 8, 33, 5];
    let x = spec(DType::F32, &shape).gen(Gen::Uniform(1000.0, 1002.0));
    let op = Op::GroupNorm { groups: 4, eps: 1e-6, affine: false };
    check("gn large mean", op, &[x], &spec(DType::F32, &shape), NORM);
}
