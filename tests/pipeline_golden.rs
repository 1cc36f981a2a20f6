//! The whole pipeline on the CPU backend against diffusers, for each golden case (with its initial noise):
//! conditioning, initial and final latents stage by stage, and the image within 2/255 of diffusers' PNG, through
//! the golden runner every backend shares (`sd3::golden`).
//! Observed: conditioning and latents within ~4e-6 of diffusers (f32 both sides); the bounds leave room for
//! other f32 summation orders only.

mod common;
use sd3::golden::{fixtures_dir, GoldenCase, Tolerances};

const CPU: Tolerances =
    Tolerances { conditioning: Some(5e-5), initial_latents: Some(0.0), final_latents: Some(1e-4), image: 2 };

fn run_case(case: &str) {
    let golden = GoldenCase::load(&fixtures_dir(), case).unwrap();
    let d = golden.run_and_check(&common::cpu(), &CPU).unwrap();
    eprintln!("{case} on cpu: {d}");
}

#[test]
fn sd3_cfg() {
    run_case("sd3-cfg");
}

#[test]
fn sd3_nocfg() {
    run_case("sd3-nocfg");
}

#[test]
fn sd3_long_prompt() {
    run_case("sd3-long-prompt");
}

#[test]
fn sd3_lora() {
    run_case("sd3-lora");
}

#[test]
fn sd35_cfg() {
    run_case("sd35-cfg");
}

#[test]
fn sd35_slg() {
    run_case("sd35-slg");
}

#[test]
fn sd3_no_t5() {
    // No T5 encoder: zeros in its place, as diffusers does without `text_encoder_3`.
    run_case("sd3-no-t5");
}
