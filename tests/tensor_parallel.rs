//! Tensor-parallel MM-DiT (`--mp-size`, `models::mmdit::parallel`): the forward split over 2 and 4 devices must
//! give what one device gives. Instances of the CPU backend stand in for GPUs; the tiny configs of the fixtures
//! (SD3, and SD3.5 with q/k norm and a dual-attention block) with seeded random weights, so every weight is used.

use sd3::golden::{fixtures_dir, GoldenCase};
use sd3::models::mmdit::parallel::TensorParallelTransformer;
use sd3::models::mmdit::{Sd3Transformer2DModel, Sd3TransformerConfig};
use sd3::pipeline::StableDiffusion3Pipeline;
use sd3::runtime::{open_backend, BackendRequest};
use sd3_core::{Backend, DType};
use std::path::Path;

fn cpu() -> Backend {
    open_backend(&BackendRequest::cpu()).unwrap()
}

fn config(model: &str) -> Sd3TransformerConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(model).join("transformer");
    Sd3TransformerConfig::load(&dir).unwrap()
}

/// Seeded inputs `[2, C, 16, 16]`, `[2, 7, joint]`, `[2, pooled]` on `b`.
fn inputs(c: &Sd3TransformerConfig, b: &Backend) -> [sd3_core::Tensor; 3] {
    let values = |n: usize, k: f32| (0..n).map(|i| (i as f32 * 0.7548 + k).sin() * 1.5).collect::<Vec<f32>>();
    let x = b.from_f32(&values(2 * c.in_channels * 256, 0.1), &[2, c.in_channels, 16, 16], DType::F32).unwrap();
    let ctx = b.from_f32(&values(2 * 7 * c.joint_attention_dim, 0.2), &[2, 7, c.joint_attention_dim], DType::F32);
    let pooled = b.from_f32(&values(2 * c.pooled_projection_dim, 0.3), &[2, c.pooled_projection_dim], DType::F32);
    [x, ctx.unwrap(), pooled.unwrap()]
}

fn check(model: &str, size: usize, skip: &[usize]) {
    let c = config(model);
    let one = cpu();
    let whole = Sd3Transformer2DModel::random(c.clone(), 7, &one, DType::F32).unwrap();
    let [x, ctx, pooled] = inputs(&c, &one);
    let ts = [500.0, 20.0];
    let want = whole.forward(&x, &ctx, &pooled, &ts, skip).unwrap().to_f32_vec().unwrap();
    let backends: Vec<Backend> = std::iter::once(one.clone()).chain((1..size).map(|_| cpu())).collect();
    let group = TensorParallelTransformer::random(&c, 7, &backends, DType::F32).unwrap();
    let got = group.forward(&x, &ctx, &pooled, &ts, skip).unwrap();
    assert!(got.backend().same_as(&one), "the output comes back on the first device");
    let got = got.to_f32_vec().unwrap();
    let max_diff = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    eprintln!("{model} over {size}: outputs differ by at most {max_diff:e} (largest |output| {scale})");
    // Split sums add in another order (f32 rounding, ~1e-7 relative); a wrong slice or a missing bias moves the
    // output by the size of the weights' contribution (~1e-2 here).
    assert!(scale > 1e-3, "{model}: the output is degenerate");
    assert!(max_diff <= 1e-5 * scale, "{model} over {size}: outputs differ by {max_diff}");
}

#[test]
fn sd3_over_two_and_four_devices_matches_one() {
    check("sd3-tiny", 2, &[]);
    check("sd3-tiny", 4, &[]);
}

#[test]
fn sd35_with_qk_norm_dual_attention_and_skipped_layers_over_two_devices() {
    check("sd35-tiny", 2, &[]);
    check("sd35-tiny", 2, &[1]);
}

#[test]
fn a_group_that_does_not_divide_the_heads_is_refused() {
    let c = config("sd3-tiny");
    let backends = [cpu(), cpu(), cpu()];
    let err = TensorParallelTransformer::random(&c, 7, &backends, DType::F32).err().expect("3 does not divide 4 heads");
    let msg = err.to_string();
    assert!(msg.contains("4 attention heads") && msg.contains("3 devices"), "{msg}");
}

/// Final latents and image of a golden case: the transformer on `mp` CPU instances, and with `dp` 2 the
/// conditional half on `mp` more.
fn generate(case: &GoldenCase, mp: usize, dp: usize) -> (Vec<f32>, Vec<u8>) {
    let mut pipe = StableDiffusion3Pipeline::new(&case.model_dir, cpu(), case.options.clone()).unwrap();
    if mp > 1 {
        pipe = pipe.with_tensor_parallel((1..mp).map(|_| cpu()).collect());
    }
    if dp == 2 {
        pipe = pipe.with_cfg_parallel_group((0..mp).map(|_| cpu()).collect());
    }
    let r = &case.request;
    let cond = pipe.encode(r, &mut |_| {}).unwrap();
    let latents = pipe.denoise(r, &cond, pipe.initial_latents(r).unwrap(), &mut |_| {}).unwrap();
    let image = pipe.decode(&latents).unwrap().remove(0);
    (latents.to_f32_vec().unwrap(), image.pixels)
}

fn check_pipeline(name: &str, mp: usize, dp: usize) {
    let case = GoldenCase::load(&fixtures_dir(), name).unwrap();
    let (one, one_image) = generate(&case, 1, 1);
    let (split, split_image) = generate(&case, mp, dp);
    let max_diff = one.iter().zip(&split).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = one.iter().map(|v| v.abs()).fold(0f32, f32::max);
    eprintln!("{name}, mp {mp} dp {dp}: final latents differ by at most {max_diff:e} (largest |latent| {scale})");
    // As in tests/cfg_parallel.rs: sums in another order differ by rounding; a wrong slice by far more.
    assert!(max_diff <= 1e-5 * scale.max(1.0), "{name}: latents differ by {max_diff}");
    let pixel = one_image.iter().zip(&split_image).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(pixel <= 1, "{name}: images differ by {pixel}/255");
}

#[test]
fn pipeline_with_the_transformer_over_two_devices() {
    check_pipeline("sd3-cfg", 2, 1);
}

#[test]
fn pipeline_with_a_lora_over_two_devices() {
    // The LoRA deltas are merged into the weights before each device takes its slice.
    check_pipeline("sd3-lora", 2, 1);
}

#[test]
fn pipeline_with_guidance_halves_each_over_two_devices() {
    // mp 2 × dp 2: four devices, skip-layer guidance on the conditional group.
    check_pipeline("sd35-slg", 2, 2);
}

#[test]
fn pipeline_refuses_cfg_groups_of_another_size() {
    let case = GoldenCase::load(&fixtures_dir(), "sd3-cfg").unwrap();
    let pipe = StableDiffusion3Pipeline::new(&case.model_dir, cpu(), case.options.clone())
        .unwrap()
        .with_tensor_parallel(vec![cpu()])
        .with_cfg_parallel(cpu());
    let r = &case.request;
    let cond = pipe.encode(r, &mut |_| {}).unwrap();
    let err = pipe.denoise(r, &cond, pipe.initial_latents(r).unwrap(), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("conditional half has 1 devices, the unconditional half 2"), "{err}");
}
