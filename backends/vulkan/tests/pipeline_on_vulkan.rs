//! The whole tiny text-to-image pipeline (text encoders, CFG Euler loop with and without skip-layer guidance,
//! VAE decode) on the Vulkan device against diffusers' golden latents and image (the `sd3-cfg` and `sd35-slg`
//! cases of `fixtures/golden`, with their initial noise), through the golden runner every backend shares
//! (`sd3::golden`). Every op of the models must run on the device (no host fallback).
//! Skips, with the reason printed, only on a machine without a Vulkan loader or device.

mod common;

use sd3::golden::{fixtures_dir, GoldenCase, Tolerances};
use sd3::train::golden::check_every_step;
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

/// Every golden training step (`sd3::train::golden::check_every_step`: the LoRA and the full step on both tiny
/// models, the step with the text encoders) against diffusers + PEFT, f32, within the CPU backend's bounds.
#[test]
fn lora_training_step_matches_diffusers() {
    let Some(dev) = common::device() else { return };
    let be = Backend::new("vulkan", dev);
    for line in check_every_step(&fixtures_dir(), &be).unwrap_or_else(|e| panic!("{e:#}")) {
        eprintln!("{line} on vulkan");
    }
}
