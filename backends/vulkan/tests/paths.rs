//! Cases for the Vulkan backend's own kernel choices, beyond the op cases every backend runs (`tests/ops.rs`):
//! the matvec shader (few rows against a transposed weight), the cooperative-matrix shaders' gathered (not
//! vector) loads, and f16 attention with qk norm and bias in SD3's layout. On a device without cooperative
//! matrices (lavapipe) the f16 cases run the scalar shaders; on NVIDIA they run the tensor-core ones.

mod common;

use sd3_core::testing::{check, tol_for, Spec, EXACT};
use sd3_core::DType::{BF16, F16, F32};
use sd3_core::{Op, UnaryOp};

macro_rules! device_or_skip {
    () => {
        match common::device() {
            Some(d) => d,
            None => return,
        }
    };
}

#[test]
fn matvec_rows() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    let op = Op::Matmul { bias: true, act: None };
    let (a, w, bias) = (Spec::new(&[2, 1536], F16), Spec::permuted(&[1536, 300], &[1, 0], F16), Spec::new(&[300], F16));
    check(dev, "matvec f16", op, &[a, w, bias], &Spec::new(&[2, 300], F16), tol_for(F16, 0.0));
    let (a, w) = (Spec::strided(&[8, 77], &[1, 8], 0, F32), Spec::permuted(&[77, 45], &[1, 0], F32));
    let op = Op::Matmul { bias: false, act: None };
    check(dev, "matvec f32 odd k", op, &[a, w], &Spec::new(&[8, 45], F32), tol_for(F32, 1e-4));
}

#[test]
fn f16_matmul_unaligned_and_row_major() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    let op = Op::Matmul { bias: false, act: None };
    // K not a multiple of 8, rows not 16-byte aligned: gathered loads; more than one 128x128 tile.
    let (a, w) = (Spec::new(&[150, 61], F16), Spec::permuted(&[61, 139], &[1, 0], F16));
    check(dev, "matmul f16 unaligned", op, &[a, w], &Spec::new(&[150, 139], F16), tol_for(F16, 0.0));
    // b contiguous along N (not K), batched.
    let (a, w) = (Spec::new(&[3, 130, 96], F16), Spec::new(&[3, 96, 140], F16));
    check(dev, "matmul f16 row-major b", op, &[a, w], &Spec::new(&[3, 130, 140], F32), tol_for(F16, 0.0));
}

/// Whole 128x128 output tiles with 16-byte aligned rows: the cooperative shaders store fragments straight to y
/// (f16 and f32 outputs), their accumulators starting from the bias. K 96 runs the general shader, K 128 and 64 the
/// whole-tile one; a weight broadcast over the batch, an f32 bias.
#[test]
fn f16_matmul_whole_tiles_with_bias() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    let op = Op::Matmul { bias: true, act: None };
    for k in [96, 128] {
        let (a, w) = (Spec::new(&[256, k], F16), Spec::permuted(&[k, 384], &[1, 0], F16));
        let (bias, y) = (Spec::new(&[384], F16), Spec::new(&[256, 384], F16));
        check(dev, &format!("matmul f16 whole tiles k {k}"), op, &[a, w, bias], &y, tol_for(F16, 0.0));
    }
    let (a, w) = (Spec::new(&[2, 128, 64], F16), Spec::strided(&[2, 64, 256], &[0, 1, 64], 0, F16));
    let bias = Spec::new(&[256], F32);
    check(dev, "matmul f32 out whole tiles", op, &[a, w, bias], &Spec::new(&[2, 128, 256], F32), tol_for(F16, 0.0));
}

/// M and N not multiples of 128 with K a multiple of 64: the whole-tile shader's partial last row and column tiles
/// (the context stream's 2 x 333 rows), fragments straddling the edge (M 200: rows 192..199 of a 16-row
/// fragment) and tiles of fewer rows than a fragment (M 130), f16 and f32 outputs and biases, batched.
#[test]
fn f16_matmul_partial_tiles_with_bias() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    let op = Op::Matmul { bias: true, act: None };
    for (m, n, out) in [(200, 384, F16), (130, 200, F32), (666, 136, F16)] {
        let (a, w) = (Spec::new(&[m, 128], F16), Spec::permuted(&[128, n], &[1, 0], F16));
        let bias = Spec::new(&[n], if out == F16 { F16 } else { F32 });
        let what = format!("matmul f16 partial tiles {m}x{n} -> {out:?}");
        check(dev, &what, op, &[a, w, bias], &Spec::new(&[m, n], out), tol_for(F16, 0.0));
    }
    let (a, w) = (Spec::new(&[2, 150, 64], F16), Spec::strided(&[2, 64, 256], &[0, 1, 64], 0, F16));
    let bias = Spec::new(&[256], F32);
    check(dev, "matmul batched partial tiles", op, &[a, w, bias], &Spec::new(&[2, 150, 256], F32), tol_for(F16, 0.0));
}

/// The cooperative matmuls' GELU epilogue (tanh form, the MM-DiT's feed-forward): on the accumulators of whole
/// tiles, in the element-wise write of a partial last tile, in the general shader (K not a multiple of 64, with
/// unaligned and aligned tiles), each after the bias; f16 and f32 outputs. Other activations on f16 products are
/// declined on such a device and split by the core (`Backend`), as the conformance suite checks.
#[test]
fn f16_matmul_gelu_epilogue() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    let op = Op::Matmul { bias: true, act: Some(UnaryOp::GeluTanh) };
    for (m, k, n, out) in
        [(256, 128, 384, F16), (200, 128, 136, F16), (130, 64, 200, F32), (256, 96, 256, F16), (70, 40, 50, F16)]
    {
        let (a, w) = (Spec::new(&[m, k], F16), Spec::permuted(&[k, n], &[1, 0], F16));
        let bias = Spec::new(&[n], if out == F16 { F16 } else { F32 });
        let what = format!("matmul f16 gelu {m}x{k}x{n} -> {out:?}");
        check(dev, &what, op, &[a, w, bias], &Spec::new(&[m, n], out), tol_for(F16, 0.0));
    }
}

/// Layer norm and layer-norm-modulate over f16 rows in registers (`rows_vec8.comp`, where the device has subgroup
/// arithmetic): the MM-DiT's `[B, N, D]` rows with `[B, 1, D]` scale and shift broadcast over them, an affine layer
/// norm, a plain one, rows of one to 8 vectors per invocation (D 1536 on NVIDIA, 512 on lavapipe with its
/// 8-wide subgroups); and beside them rows too long for it (D 4104), a D not a multiple of 8 and f32 operands,
/// which take rows.comp.
#[test]
fn f16_layer_norm_rows_in_registers() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    for (n, d) in [(70, 1536), (20, 512), (33, 8), (5, 4104), (9, 100)] {
        let x = Spec::new(&[2, n, d], F16).range(-3.0, 5.0);
        let cond = Spec::strided(&[2, n, d], &[d, 0, 1], 0, F16);
        let y = Spec::new(&[2, n, d], F16);
        let op = Op::LayerNormModulate { eps: 1e-6 };
        check(
            dev,
            &format!("layer norm modulate f16 {n}x{d}"),
            op,
            &[x.clone(), cond.clone(), cond],
            &y,
            tol_for(F16, 0.0),
        );
        let (w, b) = (Spec::new(&[d], F16), Spec::new(&[d], F16));
        let op = Op::LayerNorm { eps: 1e-5, affine: true };
        check(dev, &format!("layer norm affine f16 {n}x{d}"), op, &[x.clone(), w, b], &y, tol_for(F16, 0.0));
        let op = Op::LayerNorm { eps: 1e-6, affine: false };
        check(dev, &format!("layer norm f16 {n}x{d}"), op, std::slice::from_ref(&x), &y, tol_for(F16, 0.0));
    }
    let x = Spec::new(&[3, 40, 256], F32);
    let cond = Spec::strided(&[3, 40, 256], &[256, 0, 1], 0, F32);
    let op = Op::LayerNormModulate { eps: 1e-6 };
    check(
        dev,
        "layer norm modulate f32",
        op,
        &[x, cond.clone(), cond],
        &Spec::new(&[3, 40, 256], F32),
        tol_for(F32, 2e-5),
    );
}

/// Group norm's vector mode (contiguous f16, spatial sizes a multiple of 8: the VAE's activations): groups of one
/// chunk and of several (8 channels × 64² = 4 chunks of 8192), affine with f16 and f32 parameters, and plain.
#[test]
fn f16_group_norm_vector_mode() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    let x = Spec::new(&[2, 64, 16, 24], F16).range(-3.0, 5.0);
    let (w, b) = (Spec::new(&[64], F16), Spec::new(&[64], F32));
    let op = Op::GroupNorm { groups: 32, eps: 1e-6, affine: true };
    check(dev, "group norm f16 vector", op, &[x, w, b], &Spec::new(&[2, 64, 16, 24], F16), tol_for(F16, 0.0));
    let x = Spec::new(&[1, 64, 64, 64], F16);
    let op = Op::GroupNorm { groups: 8, eps: 1e-5, affine: false };
    check(dev, "group norm f16 vector, 4 chunks", op, &[x], &Spec::new(&[1, 64, 64, 64], F16), tol_for(F16, 0.0));
}

/// The elementwise shader's vector mode (8 elements per invocation): modulate and the gated residual with
/// `[B, 1, D]` operands broadcast over the rows, GELU, casts between f32 and f16, a bf16 binary op, an output view
/// with padded rows; and beside them a last dim not a multiple of 8 (the generic path).
#[test]
fn elementwise_vector_mode_with_broadcast() {
    use sd3_core::{BinaryOp, UnaryOp};
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    for d in [64, 20] {
        let x = || Spec::new(&[2, 40, d], F16);
        let row = || Spec::strided(&[2, 40, d], &[d, 0, 1], 0, F16);
        let y = Spec::new(&[2, 40, d], F16);
        check(dev, &format!("modulate d {d}"), Op::Modulate, &[x(), row(), row()], &y, tol_for(F16, 0.0));
        check(dev, &format!("gated residual d {d}"), Op::GatedResidual, &[x(), row(), x()], &y, tol_for(F16, 0.0));
    }
    let x = Spec::new(&[3, 5, 48], F16);
    let gelu = Op::Unary(UnaryOp::GeluTanh);
    check(dev, "gelu tanh f16", gelu, std::slice::from_ref(&x), &Spec::new(&[3, 5, 48], F16), tol_for(F16, 1e-5));
    let padded = Spec::strided(&[3, 5, 48], &[5 * 56, 56, 1], 8, F16);
    check(dev, "copy into padded rows", Op::Copy, std::slice::from_ref(&x), &padded, EXACT);
    check(dev, "cast f16 -> f32", Op::Copy, &[x], &Spec::new(&[3, 5, 48], F32), EXACT);
    let x32 = Spec::new(&[4, 32], F32);
    check(dev, "cast f32 -> f16", Op::Copy, &[x32], &Spec::new(&[4, 32], F16), tol_for(F16, 0.0));
    let (p, q) = (Spec::new(&[2, 3, 16], BF16), Spec::strided(&[2, 3, 16], &[0, 16, 1], 0, F32));
    let mul = Op::Binary(BinaryOp::Mul);
    check(dev, "bf16 * broadcast f32", mul, &[p, q], &Spec::new(&[2, 3, 16], BF16), tol_for(BF16, 0.0));
    // A per-row value broadcast along the last dim (a convolution's bias over its pixels): f16 and f32, and as
    // the first operand.
    let (y, bias) = (Spec::new(&[24, 64], F16), Spec::strided(&[24, 64], &[1, 0], 3, F16));
    let add = Op::Binary(BinaryOp::Add);
    check(dev, "f16 + per-row bias", add, &[y.clone(), bias.clone()], &Spec::new(&[24, 64], F16), tol_for(F16, 0.0));
    let bias32 = Spec::strided(&[2, 24, 64], &[24, 1, 0], 0, F32);
    let y3 = Spec::new(&[2, 24, 64], F16);
    check(dev, "f16 + per-row f32 bias", add, &[y3, bias32], &Spec::new(&[2, 24, 64], F16), tol_for(F16, 0.0));
    check(
        dev,
        "per-row bias - f16",
        Op::Binary(BinaryOp::Sub),
        &[bias, y],
        &Spec::new(&[24, 64], F16),
        tol_for(F16, 0.0),
    );
}

#[test]
fn f16_attention_qk_norm_bias_and_odd_head_dims() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    let (b, h, nq, nk, dh) = (2, 3, 70, 1030, 64);
    let q = Spec::permuted(&[b, h, nq, dh], &[0, 2, 1, 3], F16);
    let k = Spec::permuted(&[b, h, nk, dh], &[0, 2, 1, 3], F16);
    let v = Spec::permuted(&[b, h, nk, dh], &[0, 2, 1, 3], F16);
    let bias = Spec::strided(&[b, h, nq, nk], &[nk, 0, 0, 1], 0, F16);
    let (qn, kn) = (Spec::new(&[dh], F16).range(0.5, 1.5), Spec::new(&[dh], F16).range(0.5, 1.5));
    let op = Op::Attention { scale: 0.125, causal: false, bias: true, qk_norm: true, norm_eps: 1e-6 };
    check(
        dev,
        "attention f16 qk-norm",
        op,
        &[q, k, v, bias, qn, kn],
        &Spec::new(&[b, h, nq, dh], F16),
        tol_for(F16, 0.0),
    );
    let (q, k, v) = (Spec::new(&[1, 2, 50, 36], F16), Spec::new(&[1, 2, 77, 36], F16), Spec::new(&[1, 2, 77, 20], F16));
    let op = Op::Attention { scale: 0.16, causal: true, bias: false, qk_norm: false, norm_eps: 0.0 };
    check(dev, "attention f16 dh 36", op, &[q, k, v], &Spec::new(&[1, 2, 50, 20], F16), tol_for(F16, 0.0));
}

/// Plain softmax attention in f16 at head dim 64 in SD3's layout (`[B, N, H, D]` views): on a device with
/// `VK_NV_cooperative_matrix2` the workgroup-scope shader (`attention_cm2.comp`), with query rows past its 64-row
/// tiles and keys past its 32-key tiles, and scores large enough for the running maximum to move.
#[test]
fn f16_attention_sd3_layout_partial_tiles() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    for (b, h, nq, nk) in [(2, 3, 200, 333), (1, 2, 64, 32), (1, 1, 1, 1)] {
        let q = Spec::permuted(&[b, h, nq, 64], &[0, 2, 1, 3], F16).range(-3.0, 3.0);
        let k = Spec::permuted(&[b, h, nk, 64], &[0, 2, 1, 3], F16).range(-3.0, 3.0);
        let v = Spec::permuted(&[b, h, nk, 64], &[0, 2, 1, 3], F16);
        let y = Spec::permuted(&[b, h, nq, 64], &[0, 2, 1, 3], F16);
        let op = Op::Attention { scale: 0.125, causal: false, bias: false, qk_norm: false, norm_eps: 0.0 };
        check(dev, &format!("attention f16 sd3 layout {nq}x{nk}"), op, &[q, k, v], &y, tol_for(F16, 0.0));
    }
}

/// Head dims above the fused shaders' 128 (the VAE's single-head attention, head dim 512): matmul, softmax and
/// matmul on the device, with an additive bias; f16 (P in f16) and f32.
#[test]
fn wide_head_dim_attention() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    let op = Op::Attention { scale: 512f32.powf(-0.5), causal: false, bias: false, qk_norm: false, norm_eps: 0.0 };
    let (q, k, v) =
        (Spec::new(&[1, 1, 300, 512], F32), Spec::new(&[1, 1, 300, 512], F32), Spec::new(&[1, 1, 300, 512], F32));
    check(dev, "attention d512 f32", op, &[q, k, v], &Spec::new(&[1, 1, 300, 512], F32), tol_for(F32, 2e-4));
    let op = Op::Attention { scale: 0.0625, causal: false, bias: true, qk_norm: false, norm_eps: 0.0 };
    let q = Spec::permuted(&[2, 2, 130, 256], &[0, 2, 1, 3], F16);
    let (k, v) = (Spec::new(&[2, 2, 77, 256], F16), Spec::new(&[2, 2, 77, 200], F16));
    let bias = Spec::strided(&[2, 2, 130, 77], &[77, 0, 0, 1], 0, F16);
    check(dev, "attention d256 f16 bias", op, &[q, k, v, bias], &Spec::new(&[2, 2, 130, 200], F16), tol_for(F16, 0.0));
}

/// Convolution as an implicit GEMM: several 64x64 tiles each way, padding and stride, a batch, weights contiguous
/// per output channel and not, f32 and f16 (a VAE-like 3x3 with 64 → 128 channels).
#[test]
fn convolution_tiles() {
    let dev = device_or_skip!();
    let dev = dev.as_ref();
    let op = Op::Conv2d { stride: [2, 2], padding: [1, 1], bias: true };
    let x = Spec::new(&[2, 20, 19, 23], F32);
    let (w, b) = (Spec::permuted(&[70, 20, 3, 3], &[1, 0, 2, 3], F32), Spec::new(&[70], F32));
    check(
        dev,
        "conv stride 2 pad 1 strided weights",
        op,
        &[x, w, b],
        &Spec::new(&[2, 70, 10, 12], F32),
        tol_for(F32, 1e-4),
    );
    let op = Op::Conv2d { stride: [1, 1], padding: [1, 1], bias: true };
    let (x, w, b) = (Spec::new(&[1, 64, 40, 40], F16), Spec::new(&[128, 64, 3, 3], F16), Spec::new(&[128], F16));
    check(dev, "conv 3x3 64->128 f16", op, &[x, w, b], &Spec::new(&[1, 128, 40, 40], F16), tol_for(F16, 0.0));
}

/// The feed-forward output projection with the block's gated residual (`Tensor::linear_gated_residual`): on a
/// device with the whole-tile cooperative shader and `SD3_VULKAN_FUSED_RESIDUAL=1`, one `MatmulGatedResidual`
/// call (x as fragments, the gate as a broadcast tile; partial last row and column tiles in the element-wise path),
/// elsewhere the linear and the gated residual. Against the reference device, in f16 (one rounding at the end
/// against two).
#[test]
fn f16_linear_with_gated_residual() {
    let dev = device_or_skip!();
    let be = sd3_core::Backend::new("vulkan", dev.clone());
    let reference =
        sd3_core::Backend::new("reference", std::sync::Arc::new(sd3_core::reference::ReferenceDevice::new()));
    for (b, m, k, n) in [(2, 130, 192, 136), (2, 256, 128, 256)] {
        let run = |be: &sd3_core::Backend| {
            let t = |shape: &[usize], seed: u32| {
                let len: usize = shape.iter().product();
                let v: Vec<f32> = (0..len)
                    .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0 - 0.5)
                    .collect();
                be.from_f32(&v, shape, F16).unwrap()
            };
            let (h, w, bias, x, gate) =
                (t(&[b, m, k], 1), t(&[n, k], 2), t(&[n], 3), t(&[b, m, n], 4), t(&[b, 1, n], 5));
            h.linear_gated_residual(&w, Some(&bias), &x, &gate).unwrap().to_f32_vec().unwrap()
        };
        let (got, want) = (run(&be), run(&reference));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 4e-3 * (1.0 + w.abs()), "{b}x{m}x{k}x{n}: element {i}: got {g}, want {w}");
        }
    }
    eprintln!("ops: {:?}", be.op_counts());
}
