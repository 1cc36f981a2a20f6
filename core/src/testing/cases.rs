//! The op test cases every backend runs (through [`backend_tests!`](crate::backend_tests)): each op of the
//! core's op set on the device under test against [`ReferenceDevice`](crate::reference::ReferenceDevice), on
//! random inputs, odd sizes, strided and broadcast views, f32 and f16 (some bf16, integer copies). Each case
//! panics on the first mismatch, naming the check and the element.

use super::{check, run_on, tol_for, Gen, Spec, EXACT};
use crate::{BinaryOp, DType, Device, Op, UnaryOp};

const F32: DType = DType::F32;
const F16: DType = DType::F16;
const BF16: DType = DType::BF16;

pub fn copy_casts_and_views(dev: &dyn Device) {
    // Transposed f32 -> f16 (through f32, rounded once).
    check(
        dev,
        "copy t f32->f16",
        Op::Copy,
        &[Spec::permuted(&[7, 9, 5], &[2, 0, 1], F32)],
        &Spec::new(&[7, 9, 5], F16),
        EXACT,
    );
    // Same dtype, bit exact, into a narrowed output view (row stride 11, offset 3).
    let out = Spec::strided(&[6, 8], &[11, 1], 3, BF16);
    check(dev, "copy bf16 view", Op::Copy, &[Spec::permuted(&[6, 8], &[1, 0], BF16)], &out, EXACT);
    // Broadcast source.
    check(dev, "copy bcast", Op::Copy, &[Spec::strided(&[4, 6], &[0, 1], 2, F16)], &Spec::new(&[4, 6], F32), EXACT);
    // Integers: exact between integer types (bit exact for equal ones, beyond f32's 2^24), truncating
    // float -> int, int -> float.
    let ids = Spec::new(&[5, 7], DType::I64).gen(Gen::Ids(100_000));
    check(dev, "copy i64->i32", Op::Copy, std::slice::from_ref(&ids), &Spec::new(&[5, 7], DType::I32), EXACT);
    check(dev, "copy i64->f32", Op::Copy, &[ids], &Spec::new(&[5, 7], F32), EXACT);
    check(
        dev,
        "copy f32->i32",
        Op::Copy,
        &[Spec::new(&[33], F32).range(-50.0, 50.0)],
        &Spec::new(&[33], DType::I32),
        EXACT,
    );
    check(
        dev,
        "copy u8->bf16",
        Op::Copy,
        &[Spec::new(&[19], DType::U8).gen(Gen::Ids(256))],
        &Spec::new(&[19], BF16),
        EXACT,
    );
    check(
        dev,
        "copy f32->i64",
        Op::Copy,
        &[Spec::new(&[21], F32).range(-1e6, 1e6)],
        &Spec::new(&[21], DType::I64),
        EXACT,
    );
    // Beyond 32 bits, both signs (two's complement across both words).
    let wide = Spec::new(&[37], F32).range(-1e12, 1e12);
    check(dev, "copy f32->i64 wide", Op::Copy, &[wide], &Spec::new(&[37], DType::I64), EXACT);
    let wide_ids = Spec::new(&[37], DType::I64).gen(Gen::Ids(1 << 40));
    check(dev, "copy i64->f32 wide", Op::Copy, &[wide_ids], &Spec::new(&[37], F32), EXACT);
    let big = Spec::permuted(&[6, 9], &[1, 0], DType::I32).gen(Gen::Ids(2_000_000_000));
    check(dev, "copy i32 view bit exact", Op::Copy, &[big], &Spec::strided(&[6, 9], &[11, 1], 2, DType::I32), EXACT);
    let u8s = Spec::strided(&[5, 7], &[9, 1], 1, DType::U8).gen(Gen::Ids(256));
    check(dev, "copy u8 view", Op::Copy, &[u8s], &Spec::strided(&[5, 7], &[8, 1], 3, DType::U8), EXACT);
}

pub fn fill(dev: &dyn Device) {
    check(dev, "fill view", Op::Fill { value: -1.25 }, &[], &Spec::strided(&[5, 3], &[7, 2], 1, F32), EXACT);
    check(dev, "fill i64", Op::Fill { value: 123456.0 }, &[], &Spec::new(&[9], DType::I64), EXACT);
    check(dev, "fill f16", Op::Fill { value: 0.1 }, &[], &Spec::new(&[3, 3], F16), EXACT);
    check(dev, "fill u8 view", Op::Fill { value: 77.0 }, &[], &Spec::strided(&[3, 5], &[7, 1], 2, DType::U8), EXACT);
}

/// Inputs inside each function's domain.
fn unary_input(f: UnaryOp, shape: &[usize], dtype: DType) -> Spec {
    let s = Spec::permuted(shape, &[1, 0], dtype);
    match f {
        UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt => s.range(0.1, 4.0),
        UnaryOp::Recip => s.range(0.5, 3.0),
        UnaryOp::Exp => s.range(-3.0, 3.0),
        _ => s.range(-4.0, 4.0),
    }
}

pub fn unary_all(dev: &dyn Device) {
    for f in UnaryOp::ALL {
        let tol = tol_for(F32, 2e-5);
        check(
            dev,
            &format!("unary {}", f.name()),
            Op::Unary(f),
            &[unary_input(f, &[13, 7], F32)],
            &Spec::new(&[13, 7], F32),
            tol,
        );
    }
    for f in [UnaryOp::GeluTanh, UnaryOp::Silu, UnaryOp::Exp] {
        let s = unary_input(f, &[9, 17], F16);
        check(
            dev,
            &format!("unary f16 {}", f.name()),
            Op::Unary(f),
            &[s],
            &Spec::new(&[9, 17], F16),
            tol_for(F16, 0.0),
        );
    }
}

pub fn binary_broadcast_and_maps(dev: &dyn Device) {
    let shape = [3, 5, 11];
    for f in BinaryOp::ALL {
        let a = Spec::new(&shape, F32);
        // b: a [5, 1] column broadcast over dims 0 and 2.
        let b = Spec::strided(&shape, &[0, 1, 0], 2, F32).range(0.5, 2.0);
        check(
            dev,
            &format!("binary {}", f.name()),
            Op::Binary(f),
            &[a, b],
            &Spec::new(&shape, F32),
            tol_for(F32, 1e-6),
        );
    }
    let a = Spec::permuted(&shape, &[2, 1, 0], F16);
    let b = Spec::strided(&shape, &[0, 0, 1], 0, BF16);
    check(dev, "binary mixed dtypes", Op::Binary(BinaryOp::Mul), &[a, b], &Spec::new(&shape, F16), tol_for(F16, 0.0));
    let x = Spec::new(&shape, F32);
    check(
        dev,
        "affine",
        Op::Affine { mul: 0.75, add: -0.5 },
        std::slice::from_ref(&x),
        &Spec::new(&shape, F32),
        tol_for(F32, 1e-6),
    );
    // adaLN forms with [B, 1, D] conditioning broadcast over tokens.
    let cond = Spec::strided(&shape, &[11, 0, 1], 0, F32);
    check(
        dev,
        "modulate",
        Op::Modulate,
        &[x.clone(), cond.clone(), cond.clone()],
        &Spec::new(&shape, F32),
        tol_for(F32, 1e-6),
    );
    let r = Spec::permuted(&shape, &[1, 0, 2], F32);
    check(dev, "gated residual", Op::GatedResidual, &[x, cond, r], &Spec::new(&shape, F32), tol_for(F32, 1e-6));
}

pub fn matmul_shapes_layouts_dtypes(dev: &dyn Device) {
    let tol = tol_for(F32, 1e-4);
    // Odd sizes, batch, row-major.
    let (a, b) = (Spec::new(&[3, 37, 53], F32), Spec::new(&[3, 53, 29], F32));
    check(dev, "matmul batch", Op::Matmul { bias: false, act: None }, &[a, b], &Spec::new(&[3, 37, 29], F32), tol);
    // b column-major (a linear layer's transposed weight), bias, larger than one tile.
    let a = Spec::new(&[130, 70], F32);
    let b = Spec::permuted(&[70, 150], &[1, 0], F32);
    let bias = Spec::new(&[150], F32);
    check(dev, "matmul linear", Op::Matmul { bias: true, act: None }, &[a, b, bias], &Spec::new(&[130, 150], F32), tol);
    // a column-major, b batch-broadcast (stride 0), output a strided view.
    let a = Spec::strided(&[2, 19, 23], &[23 * 19, 1, 19], 0, F32);
    let b = Spec::strided(&[2, 23, 17], &[0, 17, 1], 0, F32);
    let y = Spec::strided(&[2, 19, 17], &[19 * 20, 20, 1], 1, F32);
    check(dev, "matmul strided", Op::Matmul { bias: false, act: None }, &[a, b], &y, tol);
    // f16 storage (f32 accumulation), and bf16 weights.
    let (a, b) = (Spec::new(&[33, 64], F16), Spec::permuted(&[64, 40], &[1, 0], F16));
    check(
        dev,
        "matmul f16",
        Op::Matmul { bias: true, act: None },
        &[a.clone(), b, Spec::new(&[40], F16)],
        &Spec::new(&[33, 40], F16),
        tol_for(F16, 0.0),
    );
    let b = Spec::new(&[64, 40], BF16);
    check(dev, "matmul bf16 weight", Op::Matmul { bias: false, act: None }, &[a, b], &Spec::new(&[33, 40], F32), tol);
}

/// Shapes that exercise the tensor-core GEMM where the device has one (NVIDIA sm_80+; elsewhere the SIMT one):
/// 16-bit rows copied raw with a k tail (K = 72), unaligned rows converted one by one (K = 53), several tiles.
pub fn matmul_half_precision_tiles(dev: &dyn Device) {
    for (dt, k) in [(F16, 72), (BF16, 72), (F16, 53), (BF16, 53)] {
        let a = Spec::new(&[2, 130, k], dt);
        let b = Spec::strided(&[2, k, 150], &[0, 1, k], 0, dt);
        let bias = Spec::new(&[150], dt);
        let y = Spec::new(&[2, 130, 150], F32);
        check(
            dev,
            &format!("matmul {dt} k={k}"),
            Op::Matmul { bias: true, act: None },
            &[a, b, bias],
            &y,
            tol_for(F32, 1e-4),
        );
    }
    // Large enough for the 128x128 tensor-core tiles, with partial tiles on both sides and a k tail.
    let (a, b) = (Spec::new(&[520, 136], F16), Spec::permuted(&[136, 530], &[1, 0], F16));
    check(
        dev,
        "matmul f16 large tiles",
        Op::Matmul { bias: false, act: None },
        &[a, b],
        &Spec::new(&[520, 530], F16),
        tol_for(F16, 0.0),
    );
    // conv2d with dense f16 weights (raw A rows) and K = C·KH·KW = 144.
    let x = Spec::new(&[1, 16, 12, 10], F16);
    let (w, b) = (Spec::new(&[40, 16, 3, 3], F16), Spec::new(&[40], F16));
    let op = Op::Conv2d { stride: [1, 1], padding: [1, 1], bias: true };
    check(dev, "conv f16 dense weights", op, &[x, w, b], &Spec::new(&[1, 40, 12, 10], F32), tol_for(F32, 1e-4));
}

pub fn softmax_and_norms(dev: &dyn Device) {
    let tol = tol_for(F32, 2e-5);
    // Rows longer than a work-group, and odd ones.
    check(
        dev,
        "softmax long",
        Op::Softmax,
        &[Spec::new(&[3, 1000], F32).range(-8.0, 8.0)],
        &Spec::new(&[3, 1000], F32),
        tol,
    );
    check(
        dev,
        "softmax strided",
        Op::Softmax,
        &[Spec::permuted(&[5, 37], &[1, 0], F16)],
        &Spec::new(&[5, 37], F16),
        tol_for(F16, 0.0),
    );
    let x = Spec::new(&[2, 7, 333], F32).range(-3.0, 5.0);
    let w = Spec::strided(&[333], &[2], 1, F32);
    let b = Spec::new(&[333], F32);
    check(
        dev,
        "layer norm",
        Op::LayerNorm { eps: 1e-6, affine: false },
        std::slice::from_ref(&x),
        &Spec::new(&[2, 7, 333], F32),
        tol,
    );
    let y = Spec::new(&[2, 7, 333], F32);
    check(dev, "layer norm affine", Op::LayerNorm { eps: 1e-5, affine: true }, &[x.clone(), w.clone(), b], &y, tol);
    check(dev, "rms norm", Op::RmsNorm { eps: 1e-6 }, &[Spec::permuted(&[2, 7, 333], &[0, 2, 1], F32), w], &y, tol);
    let cond = Spec::strided(&[2, 7, 333], &[333, 0, 1], 0, F32);
    let op = Op::LayerNormModulate { eps: 1e-6 };
    check(dev, "layer norm modulate", op, &[x, cond.clone(), cond], &y, tol);
    let x = Spec::new(&[2, 6, 5, 7], F16);
    let (w, b) = (Spec::new(&[6], F32), Spec::new(&[6], F32));
    let op = Op::GroupNorm { groups: 3, eps: 1e-5, affine: true };
    check(dev, "group norm f16", op, &[x, w, b], &Spec::new(&[2, 6, 5, 7], F16), tol_for(F16, 0.0));
    let x = Spec::new(&[1, 8, 40, 40], F32);
    check(
        dev,
        "group norm",
        Op::GroupNorm { groups: 2, eps: 1e-6, affine: false },
        &[x],
        &Spec::new(&[1, 8, 40, 40], F32),
        tol,
    );
}

pub fn attention_long_masked_normed(dev: &dyn Device) {
    let tol = tol_for(F32, 2e-4);
    // SD3's layout: q, k, v are [B, N, H, Dh] in memory, seen as [B, H, N, Dh]; 1030 keys.
    let (b, h, nq, nk, dh) = (1, 2, 37, 1030, 64);
    let q = Spec::permuted(&[b, h, nq, dh], &[0, 2, 1, 3], F32);
    let k = Spec::permuted(&[b, h, nk, dh], &[0, 2, 1, 3], F32);
    let v = Spec::permuted(&[b, h, nk, dh], &[0, 2, 1, 3], F32);
    let op = Op::Attention { scale: 0.125, causal: false, bias: false, qk_norm: false, norm_eps: 0.0 };
    check(dev, "attention long", op, &[q.clone(), k.clone(), v.clone()], &Spec::new(&[b, h, nq, dh], F32), tol);
    // qk RMS norm (SD3.5), and an additive bias broadcast over heads and queries.
    let bias = Spec::strided(&[b, h, nq, nk], &[nk, 0, 0, 1], 0, F32);
    let (qn, kn) = (Spec::new(&[dh], F32).range(0.5, 1.5), Spec::new(&[dh], F32).range(0.5, 1.5));
    let op = Op::Attention { scale: 0.125, causal: false, bias: true, qk_norm: true, norm_eps: 1e-6 };
    check(dev, "attention bias qk-norm", op, &[q, k, v, bias, qn, kn], &Spec::new(&[b, h, nq, dh], F32), tol);
    // Causal (CLIP), odd head dims, f16.
    let (b, h, n, dh, dv) = (2, 3, 45, 40, 24);
    let (q, k, v) = (Spec::new(&[b, h, n, dh], F16), Spec::new(&[b, h, n, dh], F16), Spec::new(&[b, h, n, dv], F16));
    let op = Op::Attention { scale: 0.158, causal: true, bias: false, qk_norm: false, norm_eps: 0.0 };
    check(dev, "attention causal f16", op, &[q, k, v], &Spec::new(&[b, h, n, dv], F16), tol_for(F16, 0.0));
    // Head dims above 64 (the 128-wide shader), qk norm, bias over keys only, a long key sequence.
    let (b, h, nq, nk, dh) = (1, 2, 40, 700, 128);
    let q = Spec::permuted(&[b, h, nq, dh], &[0, 2, 1, 3], F32);
    let k = Spec::new(&[b, h, nk, dh], F32);
    let v = Spec::new(&[b, h, nk, 80], BF16);
    let bias = Spec::strided(&[b, h, nq, nk], &[nk, 0, 0, 1], 0, F32);
    let (qn, kn) = (Spec::new(&[dh], F32).range(0.5, 1.5), Spec::new(&[dh], F32).range(0.5, 1.5));
    let op = Op::Attention { scale: 0.088, causal: false, bias: true, qk_norm: true, norm_eps: 1e-6 };
    check(dev, "attention dh 128", op, &[q, k, v, bias, qn, kn], &Spec::new(&[b, h, nq, 80], F32), tol_for(F32, 2e-4));
}

/// Shapes of the tensor-core attention where the device has one (f16/bf16, no mask or norm, head dim <= 64):
/// partial query and key tiles, SD3's [B, N, H, D] memory layout, a small head dim.
pub fn attention_half_precision_tiles(dev: &dyn Device) {
    let op = Op::Attention { scale: 0.125, causal: false, bias: false, qk_norm: false, norm_eps: 0.0 };
    for dt in [F16, BF16] {
        let (b, h, nq, nk, d) = (2, 3, 100, 1030, 64);
        let q = Spec::permuted(&[b, h, nq, d], &[0, 2, 1, 3], dt);
        let k = Spec::permuted(&[b, h, nk, d], &[0, 2, 1, 3], dt);
        let v = Spec::permuted(&[b, h, nk, d], &[0, 2, 1, 3], dt);
        check(dev, &format!("attention {dt} d64"), op, &[q, k, v], &Spec::new(&[b, h, nq, d], F32), tol_for(dt, 0.0));
        let (q, k, v) =
            (Spec::new(&[1, 2, 37, 32], dt), Spec::new(&[1, 2, 45, 32], dt), Spec::new(&[1, 2, 45, 32], dt));
        check(dev, &format!("attention {dt} d32"), op, &[q, k, v], &Spec::new(&[1, 2, 37, 32], dt), tol_for(dt, 0.0));
    }
}

pub fn conv2d_and_upsample(dev: &dyn Device) {
    let tol = tol_for(F32, 1e-4);
    let x = Spec::new(&[2, 5, 11, 13], F32);
    let (w, b) = (Spec::new(&[7, 5, 3, 3], F32), Spec::new(&[7], F32));
    let op = Op::Conv2d { stride: [1, 1], padding: [1, 1], bias: true };
    check(dev, "conv 3x3 pad", op, &[x.clone(), w.clone(), b], &Spec::new(&[2, 7, 11, 13], F32), tol);
    let op = Op::Conv2d { stride: [2, 2], padding: [0, 0], bias: false };
    check(dev, "conv stride 2", op, &[x, w], &Spec::new(&[2, 7, 5, 6], F32), tol);
    // SD3's patch embedding: 2x2 stride 2, f16, strided input.
    let x = Spec::permuted(&[1, 16, 8, 10], &[0, 2, 3, 1], F16);
    let (w, b) = (Spec::new(&[24, 16, 2, 2], F16), Spec::new(&[24], F16));
    let op = Op::Conv2d { stride: [2, 2], padding: [0, 0], bias: true };
    check(dev, "conv patch f16", op, &[x, w, b], &Spec::new(&[1, 24, 4, 5], F16), tol_for(F16, 0.0));
    let x = Spec::permuted(&[2, 3, 5, 7], &[0, 2, 1, 3], F32);
    check(dev, "upsample x2", Op::UpsampleNearest2d { factor: 2 }, &[x], &Spec::new(&[2, 3, 10, 14], F32), EXACT);
}

pub fn gather_rows(dev: &dyn Device) {
    let table = Spec::new(&[50, 19], F16);
    for idt in [DType::I32, DType::I64] {
        let ids = Spec::new(&[23], idt).gen(Gen::Ids(50));
        check(dev, "gather", Op::Gather, &[table.clone(), ids], &Spec::new(&[23, 19], F16), EXACT);
    }
}

/// An id outside the table is an error from the device itself (the reference, which would fail too, is not
/// run), naming the table's range.
pub fn gather_bad_ids(dev: &dyn Device) {
    let table = Spec::new(&[50, 19], F16);
    let ids = Spec::new(&[4], DType::I64).gen(Gen::Ids(60)); // some ids >= 50
    let mut failed = false;
    for seed in 0..8 {
        if let Err(e) = run_on(dev, Op::Gather, &[table.clone(), ids.clone()], &Spec::new(&[4, 19], F16), seed) {
            let msg = e.to_string();
            assert!(msg.contains("gather") && msg.contains("outside") && msg.contains("0..50"), "{msg}");
            failed = true;
            break;
        }
    }
    assert!(failed, "an out-of-range id was not reported");
}
