//! The whole tiny text-to-image pipeline (text encoders, CFG Euler loop with and without skip-layer guidance,
//! VAE decode) on the Vulkan device against diffusers' golden latents and image (the `sd3-cfg` and `sd35-slg`
//! cases of `fixtures/golden`, with their initial noise), through the golden runner every backend shares
//! (`sd3::golden`). Every op of the models must run on the device (no host fallback).
//! Skips, with the reason printed, only on a machine without a Vulkan loader or device.

mod common;

use sd3::golden::{fixtures_dir, GoldenCase, Tolerances};
use sd3::train::golden::TrainingGolden;
use sd3_core::{Backend, Device};

const VULKAN: Tolerances =
    Tolerances { conditioning: None, initial_latents: None, final_latents: Some(1e-3), image: 3 };

#[test]
fn tiny_pipelines_match_diffusers() {
    let Some(dev) = common::device() else { return };
    let be = Backend::new("vulkan", dev.clone());
    for case in ["sd3-cfg", "sd35-slg"] {
        let d = GoldenCase::load(&fixtures_dir(), case).unwrap().run_and_check(&be, &VULKAN).unwrap();
        eprintln!("{case} on vulkan: {d}");
    }
    eprintln!("device stats: {:?}", dev.stats());
}

/// One LoRA fine-tuning step (`sd3 train-lora`'s forward and backward) on the device against diffusers + PEFT
/// (`fixtures/training`, through the runner every backend shares, `sd3::train::golden`), f32.
#[test]
fn lora_training_step_matches_diffusers() {
    let Some(dev) = common::device() else { return };
    let be = Backend::new("vulkan", dev);
    for model in ["sd3-tiny", "sd35-tiny"] {
        let d = TrainingGolden::load(&fixtures_dir(), model).unwrap().run(&be).unwrap();
        eprintln!("{model} training step on vulkan: {d}");
        assert!(d.prediction < 1e-5 && d.loss < 1e-5 && d.gradients < 5e-5, "{model}: {d}");
        // Full fine-tuning: every parameter's gradient (the CPU's bound, tests/training.rs).
        let d = TrainingGolden::load(&fixtures_dir(), model).unwrap().run_full(&be, false).unwrap();
        eprintln!("{model} full training step: {d}");
        assert!(d.prediction < 1e-5 && d.loss < 1e-5 && d.gradients < 1e-4, "{model}: {d}");
    }
    // --train-text-encoder: the adapters of the transformer and both CLIPs.
    let d = TrainingGolden::load(&fixtures_dir(), "sd3-tiny").unwrap().run_text_encoders(&be).unwrap();
    eprintln!("sd3-tiny training step with the text encoders: {d}");
    assert!(d.prediction < 1e-5 && d.loss < 1e-5 && d.gradients < 5e-5, "{d}");
}
