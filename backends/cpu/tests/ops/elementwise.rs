//! Elementwise ops, copy/cast, fill, upsample, gather.

use crate::*;
use sd3_backend_cpu::CpuDevice;
use sd3_core::{BinaryOp, DType, Device, Layout, Op, OpCall, TensorDesc, UnaryOp};

/// f32 elementwise results: only f32 rounding separates them from the f64 reference.
const EW: f64 = 1e-10;

fn unary_gen(f: UnaryOp) -> Gen {
    match f {
        UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt => Gen::Uniform(0.05, 4.0),
        UnaryOp::Recip => Gen::AwayFromZero(0.25, 4.0),
        UnaryOp::Exp => Gen::Uniform(-8.0, 8.0),
        UnaryOp::Sin | UnaryOp::Cos => Gen::Uniform(-10.0, 10.0),
        _ => Gen::Uniform(-6.0, 6.0),
    }
}

#[test]
fn unary_all_functions_dtypes_and_views() {
    for f in UnaryOp::ALL {
        for dt in FLOATS {
            let g = unary_gen(f);
            for shape in [vec![1], vec![7], vec![33, 129]] {
                let x = spec(dt, &shape).gen(g);
                check(
                    &format!("{} {dt} {shape:?}", f.name()),
                    Op::Unary(f),
                    std::slice::from_ref(&x),
                    &spec(dt, &shape),
                    EW,
                );
            }
            // Transposed input into a sliced output, mixed dtypes (f32 in, dt out).
            let x = spec(DType::F32, &[7, 33]).gen(g).transposed();
            check(&format!("{} strided {dt}", f.name()), Op::Unary(f), &[x], &spec(dt, &[7, 33]).sliced(), EW);
        }
    }
}

#[test]
fn unary_large_parallel() {
    // Larger than one parallel chunk, odd length.
    let n = 100_003;
    for f in [UnaryOp::Silu, UnaryOp::GeluTanh, UnaryOp::GeluErf, UnaryOp::Exp] {
        check(f.name(), Op::Unary(f), &[spec(DType::F32, &[n]).gen(unary_gen(f))], &spec(DType::F32, &[n]), EW);
    }
}

#[test]
fn binary_with_broadcasts_and_views() {
    for f in BinaryOp::ALL {
        for dt in FLOATS {
            let g = if f == BinaryOp::Div { Gen::AwayFromZero(0.25, 4.0) } else { Gen::Uniform(-3.0, 3.0) };
            let shape = [3, 7, 129];
            let a = spec(dt, &shape);
            let b = spec(dt, &shape).gen(g);
            check(&format!("{} {dt}", f.name()), Op::Binary(f), &[a.clone(), b.clone()], &spec(dt, &shape), EW);
            // b broadcast over the first two dims (a bias row), a transposed in its last two dims.
            let a_t = spec(dt, &shape).permuted(&[0, 2, 1]);
            let b_row = spec(DType::F32, &shape).gen(g).broadcast(&[0, 1]);
            check(&format!("{} bcast {dt}", f.name()), Op::Binary(f), &[a_t, b_row], &spec(dt, &shape).sliced(), EW);
            // a broadcast in the middle dim, mixed dtypes.
            let a_mid = spec(DType::BF16, &shape).broadcast(&[1]);
            check(&format!("{} mid {dt}", f.name()), Op::Binary(f), &[a_mid, b], &spec(dt, &shape), EW);
        }
    }
}

#[test]
fn affine_modulate_gated_residual() {
    for dt in FLOATS {
        let shape = [2, 33, 129];
        let x = spec(dt, &shape);
        check(
            &format!("affine {dt}"),
            Op::Affine { mul: 1.7, add: -0.3 },
            std::slice::from_ref(&x),
            &spec(dt, &shape),
            EW,
        );
        let scale = spec(dt, &shape).broadcast(&[1]);
        let shift = spec(DType::F32, &shape).broadcast(&[1]);
        check(&format!("modulate {dt}"), Op::Modulate, &[x.clone(), scale.clone(), shift], &spec(dt, &shape), EW);
        let r = spec(dt, &shape).permuted(&[1, 0, 2]);
        check(&format!("gated {dt}"), Op::GatedResidual, &[x, scale, r], &spec(dt, &shape).sliced(), EW);
    }
}

#[test]
fn copy_every_dtype_pair_is_exact() {
    for src in DType::ALL {
        for dst in DType::ALL {
            let shape = [5, 33];
            // Values every destination can hold (ints and u8 truncate/saturate the same way on both devices).
            let g = if src.is_float() { Gen::Uniform(-300.0, 300.0) } else { Gen::Ints(0, 255) };
            let x = spec(src, &shape).gen(g).transposed();
            check_exact(&format!("copy {src}->{dst}"), Op::Copy, std::slice::from_ref(&x), &spec(dst, &shape).sliced());
            check_exact(&format!("copy {src}->{dst} c"), Op::Copy, &[spec(src, &shape).gen(g)], &spec(dst, &shape));
        }
    }
    // Large contiguous and broadcast sources.
    check_exact("copy big", Op::Copy, &[spec(DType::F16, &[70_001])], &spec(DType::F32, &[70_001]));
    check_exact("copy bcast", Op::Copy, &[spec(DType::F32, &[9, 130]).broadcast(&[0])], &spec(DType::F32, &[9, 130]));
}

#[test]
fn fill_every_dtype() {
    for dt in DType::ALL {
        for value in [3.75f32, -2.5, 0.1] {
            check_exact(&format!("fill {dt} {value}"), Op::Fill { value }, &[], &spec(dt, &[7, 9]).sliced());
        }
    }
}

#[test]
fn upsample_nearest() {
    for dt in FLOATS {
        for factor in [1, 2, 3] {
            let x = spec(dt, &[2, 3, 5, 7]).permuted(&[1, 0, 2, 3]);
            let y = spec(dt, &[2, 3, 5 * factor, 7 * factor]);
            check_exact(&format!("upsample {dt} x{factor}"), Op::UpsampleNearest2d { factor }, &[x], &y);
        }
    }
}

#[test]
fn gather_rows() {
    for dt in FLOATS {
        for ids_dt in [DType::I32, DType::I64] {
            let table = spec(dt, &[11, 33]);
            let ids = spec(ids_dt, &[7]).gen(Gen::Ints(0, 11));
            check_exact(&format!("gather {dt} {ids_dt}"), Op::Gather, &[table, ids], &spec(dt, &[7, 33]));
            let table_t = spec(DType::F32, &[11, 33]).transposed();
            let ids = spec(ids_dt, &[9]).gen(Gen::Ints(0, 11)).sliced();
            check_exact(
                &format!("gather strided {dt} {ids_dt}"),
                Op::Gather,
                &[table_t, ids],
                &spec(dt, &[9, 33]).sliced(),
            );
        }
    }
}

#[test]
fn gather_out_of_range_id_is_a_clear_error() {
    let d = CpuDevice::new();
    let table = d.alloc(4 * 3 * 2).unwrap();
    let ids = d.alloc(8 * 2).unwrap();
    let out = d.alloc(4 * 2 * 2).unwrap();
    d.upload(ids, 0, &[1i64.to_le_bytes(), 3i64.to_le_bytes()].concat()).unwrap();
    let ins = [
        TensorDesc { buffer: table, dtype: DType::F32, layout: Layout::contiguous(&[3, 2]) },
        TensorDesc { buffer: ids, dtype: DType::I64, layout: Layout::contiguous(&[2]) },
    ];
    let outs = [TensorDesc { buffer: out, dtype: DType::F32, layout: Layout::contiguous(&[2, 2]) }];
    let err = d.execute(&OpCall { op: Op::Gather, inputs: &ins, outputs: &outs }).unwrap_err().to_string();
    assert!(err.contains("id 3") && err.contains("position 1") && err.contains("0..3"), "{err}");
}

#[test]
fn views_overflowing_their_buffer_are_rejected() {
    let d = CpuDevice::new();
    let small = d.alloc(16).unwrap();
    let out = d.alloc(64).unwrap();
    let ins = [TensorDesc { buffer: small, dtype: DType::F32, layout: Layout::contiguous(&[8]) }];
    let outs = [TensorDesc { buffer: out, dtype: DType::F32, layout: Layout::contiguous(&[8]) }];
    let err = d.execute(&OpCall { op: Op::Unary(UnaryOp::Neg), inputs: &ins, outputs: &outs }).unwrap_err();
    assert!(err.to_string().contains("overflows"), "{err}");
}

#[test]
fn self_overlapping_output_is_written_in_logical_order() {
    // An output with a stride-0 dim: every row lands on the same memory, the last one written wins (as in the
    // reference, which writes in logical order).
    for dt in FLOATS {
        let x = spec(dt, &[3, 33]);
        let y = spec(dt, &[3, 33]).broadcast(&[0]);
        check(&format!("overlap {dt}"), Op::Unary(UnaryOp::Neg), &[x], &y, EW);
    }
}
