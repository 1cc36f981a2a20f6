//! The whole tiny text-to-image pipeline (text encoders, CFG Euler loop, VAE decode) on the NPU stub, under the
//! seed's flag values and under the opposite of every flag, against diffusers' golden latents and image (the
//! `sd3-cfg` and `sd35-slg` cases of `fixtures/golden`, with their initial noise). The backend has no host
//! fallback, so every op of the pipeline runs on the stub. Through the golden runner every backend shares
//! (`sd3::golden`); the image bound is that of the root crate's `tests/pipeline_golden.rs` on the CPU backend.

use sd3::golden::{fixtures_dir, GoldenCase, Tolerances};
use sd3::train::golden::check_every_step;
use sd3_backend_npu::{NpuConfig, NpuDevice, NpuFlags};
use sd3_core::Backend;
use std::sync::Arc;

const NPU: Tolerances = Tolerances { conditioning: None, initial_latents: None, final_latents: Some(1e-3), image: 2 };

fn generate_on_npu(flags: NpuFlags) -> Arc<NpuDevice> {
    let dev = Arc::new(NpuDevice::new(NpuConfig::new(flags, 512 << 20)).unwrap());
    let be = Backend::new("npu", dev.clone());
    for case in ["sd3-cfg", "sd35-slg"] {
        let d = GoldenCase::load(&fixtures_dir(), case).unwrap().run_and_check(&be, &NPU).unwrap();
        eprintln!("{case} on npu {flags:?}: {d}");
    }
    dev
}

fn stat(dev: &NpuDevice, key: &str) -> u64 {
    let stats = sd3_core::Device::stats(dev);
    let line = stats.iter().find(|l| l.starts_with(&format!("{key}="))).unwrap();
    line[key.len() + 1..].parse().unwrap()
}

#[test]
fn pipeline_under_the_seeds_flags() {
    let dev = generate_on_npu(NpuFlags::seed());
    assert!(stat(&dev, "contiguous_copies") > 0);
    assert!(stat(&dev, "affine.aclnn_muls_adds") + stat(&dev, "affine.legacy_fused") > 0, "the scale op ran");
}

#[test]
fn pipeline_under_the_opposite_flags() {
    let dev = generate_on_npu(NpuFlags::seed_opposite());
    assert_eq!(stat(&dev, "contiguous_copies"), 0);
    assert!(stat(&dev, "nz.cache_hits") > 0, "weights stay in FRACTAL_NZ across denoising steps");
    assert!(stat(&dev, "nc1hwc0.conversions") > 0);
}

/// Every golden training step (`sd3::train::golden::check_every_step`: the LoRA and the full step on both tiny
/// models, the step with the text encoders) against diffusers + PEFT, f32, within the CPU backend's bounds.
#[test]
fn lora_training_step_matches_diffusers() {
    let dev = Arc::new(NpuDevice::new(NpuConfig::new(NpuFlags::seed(), 512 << 20)).unwrap());
    let be = Backend::new("npu", dev);
    for line in check_every_step(&fixtures_dir(), &be).unwrap_or_else(|e| panic!("{e:#}")) {
        eprintln!("{line} on npu");
    }
}
