//! Every op on the NPU stub against `ReferenceDevice`, on random inputs, under the seed's flag values
//! (storage_format=0, use_stride_kernel=0, npu_scale_aclnn=True, auto_growth), under the opposite of every flag,
//! and under Paddle's defaults. Views (transposed, sliced, broadcast, permuted) and strided outputs included.

mod common;
use common::Pair;
use sd3_backend_npu::{AllocatorStrategy, NpuFlags};
use sd3_core::{BinaryOp, DType, Op, UnaryOp};

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

fn elementwise(p: &Pair) {
    for dt in FLOATS {
        let x = p.rand(&[5, 33], dt);
        let pos = p.rand_pos(&[5, 33], dt);
        for f in UnaryOp::ALL {
            let input =
                if matches!(f, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip) { &pos } else { &x };
            p.run(&format!("unary {} {dt}", f.name()), Op::Unary(f), &[input], &[5, 33], dt);
        }
        // A transposed input view.
        let xt = p.rand(&[33, 5], dt).map(|t| t.transpose(0, 1));
        p.run(&format!("unary silu on a transposed view {dt}"), Op::Unary(UnaryOp::Silu), &[&xt], &[5, 33], dt);
        // b broadcast along rows (stride 0).
        let row = p.rand(&[1, 33], dt).map(|t| t.broadcast_to(&[5, 33]));
        for f in BinaryOp::ALL {
            let b = if f == BinaryOp::Div {
                p.rand_pos(&[1, 33], dt).map(|t| t.broadcast_to(&[5, 33]))
            } else {
                row.clone()
            };
            p.run(&format!("binary {} {dt}", f.name()), Op::Binary(f), &[&x, &b], &[5, 33], dt);
        }
        p.run(&format!("affine {dt}"), Op::Affine { mul: 0.7, add: -0.3 }, &[&x], &[5, 33], dt);
        p.run(&format!("affine on a view {dt}"), Op::Affine { mul: -1.5, add: 2.0 }, &[&xt], &[5, 33], dt);
        let (s, h) = (p.rand(&[5, 33], dt), p.rand(&[2, 1, 33], dt).map(|t| t.broadcast_to(&[2, 5, 33])));
        let x3 = p.rand(&[2, 5, 33], dt);
        let s3 = s.map(|t| t.unsqueeze(0)?.broadcast_to(&[2, 5, 33]));
        p.run(&format!("modulate {dt}"), Op::Modulate, &[&x3, &s3, &h], &[2, 5, 33], dt);
        p.run(&format!("gated_residual {dt}"), Op::GatedResidual, &[&x3, &h, &s3], &[2, 5, 33], dt);
        p.run(&format!("fill {dt}"), Op::Fill { value: 1.25 }, &[], &[3, 7], dt);
    }
}

fn copies(p: &Pair) {
    // Casts between every float dtype, from a permuted view.
    for from in FLOATS {
        for to in FLOATS {
            let x = p.rand(&[4, 6, 10], from).map(|t| t.permute(&[2, 0, 1]));
            p.run(&format!("copy {from} -> {to}"), Op::Copy, &[&x], &[10, 4, 6], to);
        }
    }
    // Integers are copied exactly.
    let ids = p.ids(&[0, 5, 1 << 30, -7], DType::I64);
    p.run("copy i64 -> i32", Op::Copy, &[&ids], &[4], DType::I32);
    // Into a slice of a larger tensor (how cat writes): the rest must stay untouched.
    for dt in FLOATS {
        let whole = p.out(&[6, 20], dt);
        let slot = whole.map(|t| t.narrow(1, 7, 9));
        let src = p.rand(&[6, 9], dt);
        p.run_into(&format!("copy into a narrowed output {dt}"), Op::Copy, &[&src], &slot, &whole);
    }
}

fn rows(p: &Pair) {
    for dt in FLOATS {
        let x = p.rand(&[3, 4, 65], dt);
        let (w, b) = (p.rand(&[65], dt), p.rand(&[65], dt));
        p.run(&format!("softmax {dt}"), Op::Softmax, &[&x], &[3, 4, 65], dt);
        let xt = p.rand(&[65, 12], dt).map(|t| t.transpose(0, 1));
        p.run(&format!("softmax of a transposed view {dt}"), Op::Softmax, &[&xt], &[12, 65], dt);
        p.run(&format!("layer_norm {dt}"), Op::LayerNorm { eps: 1e-5, affine: false }, &[&x], &[3, 4, 65], dt);
        p.run(
            &format!("layer_norm affine {dt}"),
            Op::LayerNorm { eps: 1e-6, affine: true },
            &[&x, &w, &b],
            &[3, 4, 65],
            dt,
        );
        p.run(&format!("rms_norm {dt}"), Op::RmsNorm { eps: 1e-6 }, &[&x, &w], &[3, 4, 65], dt);
        let scale = p.rand(&[3, 1, 65], dt).map(|t| t.broadcast_to(&[3, 4, 65]));
        let shift = p.rand(&[3, 1, 65], dt).map(|t| t.broadcast_to(&[3, 4, 65]));
        p.run(
            &format!("layer_norm_modulate {dt}"),
            Op::LayerNormModulate { eps: 1e-6 },
            &[&x, &scale, &shift],
            &[3, 4, 65],
            dt,
        );
    }
}

fn matmuls(p: &Pair) {
    for dt in FLOATS {
        // Sizes crossing every tile edge (32 × 128 × 128) and not multiples of 16.
        for &(m, k, n) in &[(1, 1, 1), (7, 45, 19), (70, 300, 150)] {
            let a = p.rand(&[m, k], dt);
            let b = p.rand(&[k, n], dt);
            let bias = p.rand(&[n], dt);
            p.run(&format!("matmul {m}x{k}x{n} {dt}"), Op::Matmul { bias: false, act: None }, &[&a, &b], &[m, n], dt);
            p.run(
                &format!("matmul+bias {m}x{k}x{n} {dt}"),
                Op::Matmul { bias: true, act: None },
                &[&a, &b, &bias],
                &[m, n],
                dt,
            );
            // A linear layer: weight [N, K] used transposed (a column-major view), twice (the NZ copy is reused).
            let w = p.rand(&[n, k], dt).map(|t| t.transpose(0, 1));
            for round in 0..2 {
                let what = format!("linear {m}x{k}x{n} {dt} (round {round})");
                p.run(&what, Op::Matmul { bias: true, act: None }, &[&a, &w, &bias], &[m, n], dt);
            }
        }
        // Batched: a weight broadcast over the batch, and activation × activation.
        let a = p.rand(&[2, 3, 17, 40], dt);
        let w = p.rand(&[40, 24], dt).map(|t| t.broadcast_to(&[2, 3, 40, 24]));
        p.run(
            &format!("batched matmul, broadcast weight {dt}"),
            Op::Matmul { bias: false, act: None },
            &[&a, &w],
            &[2, 3, 17, 24],
            dt,
        );
        let b = p.rand(&[2, 3, 24, 40], dt).map(|t| t.transpose(2, 3));
        p.run(
            &format!("batched matmul, transposed b {dt}"),
            Op::Matmul { bias: false, act: None },
            &[&a, &b],
            &[2, 3, 17, 24],
            dt,
        );
    }
}

fn attentions(p: &Pair) {
    for dt in FLOATS {
        let (b, h, nq, nk, d) = (2, 3, 70, 90, 16);
        // q as the usual permuted view of [B, N, H, D].
        let q = p.rand(&[b, nq, h, d], dt).map(|t| t.permute(&[0, 2, 1, 3]));
        let k = p.rand(&[b, h, nk, d], dt);
        let v = p.rand(&[b, h, nk, 24], dt);
        let shape = [b, h, nq, 24];
        let plain = Op::Attention { scale: 0.25, causal: false, bias: false, qk_norm: false, norm_eps: 0.0 };
        p.run(&format!("attention {dt}"), plain, &[&q, &k, &v], &shape, dt);
        let bias = p.rand(&[b, 1, nq, nk], dt).map(|t| t.broadcast_to(&[b, h, nq, nk]));
        let with_bias = Op::Attention { scale: 0.25, causal: false, bias: true, qk_norm: false, norm_eps: 0.0 };
        p.run(&format!("attention with bias {dt}"), with_bias, &[&q, &k, &v, &bias], &shape, dt);
        let (qn, kn) = (p.rand(&[d], dt), p.rand(&[d], dt));
        let normed = Op::Attention { scale: 0.25, causal: false, bias: false, qk_norm: true, norm_eps: 1e-6 };
        p.run(&format!("attention qk_norm {dt}"), normed, &[&q, &k, &v, &qn, &kn], &shape, dt);
        let kc = p.rand(&[b, h, nq, d], dt);
        let vc = p.rand(&[b, h, nq, 24], dt);
        let causal = Op::Attention { scale: 0.3, causal: true, bias: false, qk_norm: false, norm_eps: 0.0 };
        p.run(&format!("causal attention {dt}"), causal, &[&q, &kc, &vc], &shape, dt);
    }
}

fn images(p: &Pair) {
    for dt in FLOATS {
        let x = p.rand(&[2, 20, 9, 11], dt);
        let w = p.rand(&[17, 20, 3, 3], dt);
        let bias = p.rand(&[17], dt);
        let same = Op::Conv2d { stride: [1, 1], padding: [1, 1], bias: true };
        p.run(&format!("conv2d 3x3 pad 1 {dt}"), same, &[&x, &w, &bias], &[2, 17, 9, 11], dt);
        let down = Op::Conv2d { stride: [2, 2], padding: [0, 0], bias: false };
        p.run(&format!("conv2d 3x3 stride 2 {dt}"), down, &[&x, &w], &[2, 17, 4, 5], dt);
        let w1 = p.rand(&[5, 20, 1, 1], dt);
        let xs = p.rand(&[2, 9, 11, 20], dt).map(|t| t.permute(&[0, 3, 1, 2]));
        let pointwise = Op::Conv2d { stride: [1, 1], padding: [0, 0], bias: false };
        p.run(&format!("conv2d 1x1 on an NHWC view {dt}"), pointwise, &[&xs, &w1], &[2, 5, 9, 11], dt);
        let (gw, gb) = (p.rand(&[20], dt), p.rand(&[20], dt));
        let gn = Op::GroupNorm { groups: 4, eps: 1e-6, affine: true };
        p.run(&format!("group_norm {dt}"), gn, &[&x, &gw, &gb], &[2, 20, 9, 11], dt);
        p.run(
            &format!("group_norm no affine {dt}"),
            Op::GroupNorm { groups: 5, eps: 1e-5, affine: false },
            &[&x],
            &[2, 20, 9, 11],
            dt,
        );
        p.run(&format!("upsample x2 {dt}"), Op::UpsampleNearest2d { factor: 2 }, &[&x], &[2, 20, 18, 22], dt);
        let table = p.rand(&[50, 12], dt);
        for ids_dt in [DType::I32, DType::I64] {
            let ids = p.ids(&[3, 0, 49, 3, 17], ids_dt);
            p.run(&format!("gather {dt} by {ids_dt}"), Op::Gather, &[&table, &ids], &[5, 12], dt);
        }
    }
}

fn every_op(flags: NpuFlags) -> Pair {
    let p = Pair::new(flags, 256);
    elementwise(&p);
    copies(&p);
    rows(&p);
    matmuls(&p);
    attentions(&p);
    images(&p);
    p
}

fn stat(p: &Pair, key: &str) -> u64 {
    let stats = sd3_core::Device::stats(p.dev.as_ref());
    let line =
        stats.iter().find(|l| l.starts_with(&format!("{key}="))).unwrap_or_else(|| panic!("no {key} in {stats:?}"));
    line[key.len() + 1..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn seed_flags_match_reference() {
    let p = every_op(NpuFlags::seed());
    // Stride kernels off: views were copied, never read through strides.
    assert!(stat(&p, "contiguous_copies") > 0);
    assert_eq!(stat(&p, "strided_operands"), 0);
    assert_eq!(stat(&p, "nz.conversions"), 0);
    assert_eq!(stat(&p, "nc1hwc0.conversions"), 0);
    assert!(stat(&p, "affine.aclnn_muls_adds") > 0);
    assert_eq!(stat(&p, "affine.legacy_fused"), 0);
    assert_eq!(p.npu.fallback_counts().len(), 0, "nothing may fall back (there is no fallback here)");
}

#[test]
fn opposite_flags_match_reference() {
    let p = every_op(NpuFlags::seed_opposite());
    assert_eq!(stat(&p, "contiguous_copies"), 0);
    assert!(stat(&p, "strided_operands") > 0);
    assert!(stat(&p, "nz.conversions") > 0);
    assert!(stat(&p, "nz.cache_hits") > 0, "the second use of a linear weight reuses its FRACTAL_NZ copy");
    assert!(stat(&p, "nc1hwc0.conversions") > 0);
    assert_eq!(stat(&p, "affine.aclnn_muls_adds"), 0);
    assert!(stat(&p, "affine.legacy_fused") > 0);
}

#[test]
fn paddle_default_flags_match_reference() {
    assert_eq!(NpuFlags::default().allocator_strategy, AllocatorStrategy::AutoGrowth);
    every_op(NpuFlags::default());
}

/// The cached FRACTAL_NZ copy of a weight must not outlive a change of the weight.
#[test]
fn nz_copy_follows_weight_updates() {
    let p = Pair::new(NpuFlags { storage_format: true, ..NpuFlags::default() }, 64);
    let a = p.rand(&[9, 40], DType::F32);
    let w = p.rand(&[40, 21], DType::F32);
    p.run("before", Op::Matmul { bias: false, act: None }, &[&a, &w], &[9, 21], DType::F32);
    let fresh: Vec<f32> = (0..40 * 21).map(|_| p.next()).collect();
    let bytes = DType::F32.f32_to_bytes(&fresh);
    w.n.write_bytes(&bytes).unwrap();
    w.r.write_bytes(&bytes).unwrap();
    p.run("after an upload", Op::Matmul { bias: false, act: None }, &[&a, &w], &[9, 21], DType::F32);
    // Written by an op.
    let src = p.rand(&[40, 21], DType::F32);
    p.run_into("overwrite", Op::Copy, &[&src], &w, &w);
    p.run("after an op wrote it", Op::Matmul { bias: false, act: None }, &[&a, &w], &[9, 21], DType::F32);
    assert_eq!(stat(&p, "nz.conversions"), 3);
    assert_eq!(stat(&p, "nz.cache_hits"), 0);
}

/// Physical sizes of the private formats are padded to 16 and allocated in the arena.
#[test]
fn storage_format_padding_is_accounted() {
    let p = Pair::new(NpuFlags { storage_format: true, ..NpuFlags::default() }, 64);
    let a = p.rand(&[3, 45], DType::F16);
    let w = p.rand(&[45, 19], DType::F16);
    let before = p.dev.alloc_stats().in_use;
    let _y = p.run("matmul", Op::Matmul { bias: false, act: None }, &[&a, &w], &[3, 19], DType::F16);
    // [45, 19] f16 → FRACTAL_NZ [2, 3, 16, 16] = 1536 elements = 3072 bytes (1710 logical).
    assert_eq!(stat(&p, "nz.cached_bytes"), 3072);
    assert_eq!(stat(&p, "nz.padding_bytes"), 3072 - 45 * 19 * 2);
    let output_block = sd3_backend_npu::alloc::block_size(3 * 19 * 2);
    assert_eq!(p.dev.alloc_stats().in_use - before, output_block + sd3_backend_npu::alloc::block_size(3072));
    // Dropping the weight drops its copy.
    drop(w);
    assert_eq!(stat(&p, "nz.cached"), 0);
    let x = p.rand(&[1, 20, 4, 4], DType::F32);
    let k = p.rand(&[3, 20, 1, 1], DType::F32);
    p.run("conv", Op::Conv2d { stride: [1, 1], padding: [0, 0], bias: false }, &[&x, &k], &[1, 3, 4, 4], DType::F32);
    // x: C1 = 2 → 2·16·16 elements; y: C1 = 1 → 16·16 elements; f32.
    assert_eq!(stat(&p, "nc1hwc0.peak_bytes"), (2 * 16 * 16 + 16 * 16) * 4);
    assert_eq!(stat(&p, "nc1hwc0.padding_bytes"), ((2 * 16 * 16 + 16 * 16) - (20 * 16 + 3 * 16)) * 4);
}

/// FLAGS_npu_scale_aclnn: both scale paths give the same result (and the reference's).
#[test]
fn scale_paths_agree() {
    let on = Pair::new(NpuFlags { scale_aclnn: true, ..NpuFlags::default() }, 16);
    let off = Pair::new(NpuFlags { scale_aclnn: false, ..NpuFlags::default() }, 16);
    for dt in FLOATS {
        let values: Vec<f32> = (0..999).map(|_| on.next() * 100.0).collect();
        let a = on.upload(&values, &[999], dt);
        let b = off.upload(&values, &[999], dt);
        for (mul, add) in [(0.5f32, 1.0f32), (1.0 / 3.0, -7.25), (-1.5e-3, 0.1)] {
            let op = Op::Affine { mul, add };
            let ya = on.run("aclnn path", op, &[&a], &[999], dt);
            let yb = off.run("legacy path", op, &[&b], &[999], dt);
            common::assert_close(&format!("aclnn vs legacy, {dt}, mul {mul} add {add}"), &ya.n, &yb.n);
        }
    }
    assert_eq!(stat(&on, "affine.legacy_fused"), 0);
    assert_eq!(stat(&off, "affine.aclnn_muls_adds"), 0);
}

/// FLAGS_use_stride_kernel=0 copies every non-contiguous operand and counts it; =1 copies none.
#[test]
fn stride_flag_counts_copies() {
    for stride in [false, true] {
        let p = Pair::new(NpuFlags { use_stride_kernel: stride, ..NpuFlags::default() }, 16);
        let x = p.rand(&[8, 6], DType::F32).map(|t| t.transpose(0, 1));
        let y = p.rand(&[6, 8], DType::F32);
        let whole = p.out(&[6, 16], DType::F32);
        let slot = whole.map(|t| t.narrow(1, 4, 8));
        p.run_into("add into a slice", Op::Binary(BinaryOp::Add), &[&x, &y], &slot, &whole);
        // One non-contiguous input, one non-contiguous output.
        let (copies, strided) = if stride { (0, 2) } else { (2, 0) };
        assert_eq!(stat(&p, "contiguous_copies"), copies, "use_stride_kernel={stride}");
        assert_eq!(stat(&p, "strided_operands"), strided, "use_stride_kernel={stride}");
        if !stride {
            assert_eq!(stat(&p, "contiguous_copy_bytes"), 2 * 48 * 4);
        }
    }
}

/// A fresh NPU stub under `flags`, for the op test cases every backend runs.
fn device(flags: NpuFlags) -> Option<std::sync::Arc<sd3_backend_npu::NpuDevice>> {
    let config = sd3_backend_npu::NpuConfig::new(flags, 512 << 20);
    Some(std::sync::Arc::new(sd3_backend_npu::NpuDevice::new(config).expect("creating the NPU stub")))
}

/// The op test cases every backend runs (`sd3_core::testing::cases`), under the seed's flag values.
mod cases_under_the_seeds_flags {
    sd3_core::backend_tests!(super::device(super::NpuFlags::seed()));
}

/// The same cases under the opposite of every flag.
mod cases_under_the_opposite_flags {
    sd3_core::backend_tests!(super::device(super::NpuFlags::seed_opposite()));
}
