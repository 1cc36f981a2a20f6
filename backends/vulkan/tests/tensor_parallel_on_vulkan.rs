//! The MM-DiT split over two Vulkan devices (`--mp-size 2`, `sd3::models::mmdit::parallel`) against the same model
//! on one: two logical devices opened on the same physical one stand in for two GPUs (lavapipe in CI), each with
//! its own half of the weights, the partial sums meeting through host memory. Skips, with the reason printed, only
//! on a machine without a Vulkan loader or device.

use sd3::models::mmdit::parallel::TensorParallelTransformer;
use sd3::models::mmdit::{Sd3Transformer2DModel, Sd3TransformerConfig};
use sd3_backend_vulkan::VulkanProvider;
use sd3_core::{Backend, DType};
use std::path::Path;
use std::sync::Arc;

#[test]
fn tiny_sd35_over_two_vulkan_devices_matches_one() {
    let provider = match VulkanProvider::new() {
        Ok(p) => p,
        Err(e) => return eprintln!("SKIPPED: no Vulkan device: {e}"),
    };
    let index = std::env::var("SD3_VULKAN_DEVICE").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let open = || Backend::new("vulkan", Arc::new(provider.open(index).expect("opening the Vulkan device")));
    let (first, second) = (open(), open());
    // SD3.5's tiny config: q/k norm and a dual-attention block, so every split path runs.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/sd35-tiny/transformer");
    let c = Sd3TransformerConfig::load(&dir).unwrap();
    let values = |n: usize, k: f32| (0..n).map(|i| (i as f32 * 0.7548 + k).sin() * 1.5).collect::<Vec<f32>>();
    let x = first.from_f32(&values(2 * c.in_channels * 256, 0.1), &[2, c.in_channels, 16, 16], DType::F32).unwrap();
    let ctx = first.from_f32(&values(2 * 7 * c.joint_attention_dim, 0.2), &[2, 7, c.joint_attention_dim], DType::F32);
    let pooled = first.from_f32(&values(2 * c.pooled_projection_dim, 0.3), &[2, c.pooled_projection_dim], DType::F32);
    let (ctx, pooled) = (ctx.unwrap(), pooled.unwrap());
    let ts = [500.0, 20.0];
    let whole = Sd3Transformer2DModel::random(c.clone(), 7, &first, DType::F32).unwrap();
    let want = whole.forward(&x, &ctx, &pooled, &ts, &[]).unwrap().to_f32_vec().unwrap();
    drop(whole);
    let group = TensorParallelTransformer::random(&c, 7, &[first, second], DType::F32).unwrap();
    let got = group.forward(&x, &ctx, &pooled, &ts, &[]).unwrap().to_f32_vec().unwrap();
    let max_diff = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    eprintln!("over two Vulkan devices: outputs differ by at most {max_diff:e} (largest |output| {scale})");
    // f32 on the device, sums split in another order: rounding only. A wrong slice or a missing post-sum bias
    // moves the output by ~1e-3 (tests/tensor_parallel.rs).
    assert!(scale > 1e-3, "the output is degenerate");
    assert!(max_diff <= 1e-5 * scale, "outputs differ by {max_diff}");
}
