//! The whole pipeline on the CPU backend against diffusers, for each golden case (with `--init-noise`):
//! conditioning and final latents stage by stage, and the image within 2/255 of diffusers' PNG.
//! Observed: conditioning and latents within ~4e-6 of diffusers (f32 both sides); the bounds leave room for
//! other f32 summation orders only.

mod common;
use common::*;
use sd3::image_out::read_png;
use sd3::pipeline::{GenerationRequest, PipelineOptions, SkipLayerGuidance, StableDiffusion3Pipeline};
use sd3::weights::Weights;

use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn request(case: &str) -> (String, GenerationRequest, PipelineOptions) {
    let dir = fixtures().join("golden").join(case);
    let p: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("params.json")).unwrap()).unwrap();
    let u = |k: &str| p[k].as_u64().unwrap() as usize;
    let mut r = GenerationRequest::new(p["prompt"].as_str().unwrap(), u("height"), u("width"));
    r.negative_prompt = p["negative_prompt"].as_str().map(String::from);
    r.steps = u("steps");
    r.guidance = p["guidance"].as_f64().unwrap() as f32;
    r.max_sequence_length = u("max_sequence_length");
    r.seed = p["seed"].as_u64().unwrap();
    r.init_noise = Some(dir.join("init_noise.safetensors"));
    if let Some(slg) = p.get("slg").filter(|v| !v.is_null()) {
        r.slg = Some(SkipLayerGuidance {
            layers: slg["skip_guidance_layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect(),
            scale: slg["skip_layer_guidance_scale"].as_f64().unwrap() as f32,
            start: slg["skip_layer_guidance_start"].as_f64().unwrap(),
            stop: slg["skip_layer_guidance_stop"].as_f64().unwrap(),
        });
    }
    let mut options = PipelineOptions::default();
    if let Some(lora) = p.get("lora").filter(|v| !v.is_null()) {
        options.loras.push((fixtures().join(lora["file"].as_str().unwrap()), lora["scale"].as_f64().unwrap() as f32));
    }
    (p["model"].as_str().unwrap().to_string(), r, options)
}

fn run_case(case: &str) {
    let (model, r, options) = request(case);
    let be = cpu();
    let pipe = StableDiffusion3Pipeline::new(&fixtures().join(&model), be.clone(), options).unwrap();
    let g = Weights::open_file(&fixtures().join(format!("golden/{case}/golden.safetensors"))).unwrap();
    let golden = |n: &str| g.host_f32(n).unwrap();

    // Stage 1-2: conditioning (uncond rows first under CFG).
    let cond = pipe.encode(&r, &mut |_| {}).unwrap();
    let (want_embeds, want_pooled) = if r.cfg() {
        (
            [golden("neg_prompt_embeds"), golden("prompt_embeds")].concat(),
            [golden("neg_pooled_projections"), golden("pooled_projections")].concat(),
        )
    } else {
        (golden("prompt_embeds"), golden("pooled_projections"))
    };
    let d_embeds = max_abs_diff(&cond.prompt_embeds.to_f32_vec().unwrap(), &want_embeds);
    let d_pooled = max_abs_diff(&cond.pooled.to_f32_vec().unwrap(), &want_pooled);
    eprintln!("{case}: prompt_embeds max |diff| {d_embeds:e}, pooled {d_pooled:e}");
    assert!(d_embeds < 5e-5 && d_pooled < 5e-5, "{case}: conditioning differs ({d_embeds}, {d_pooled})");

    // Stage 3: denoising from the golden's initial noise.
    let latents = pipe.initial_latents(&r).unwrap();
    assert_eq!(latents.to_f32_vec().unwrap(), golden("latents"));
    let fin = pipe.denoise(&r, &cond, latents, &mut |_| {}).unwrap();
    let d_lat = max_abs_diff(&fin.to_f32_vec().unwrap(), &golden("final_latents"));
    eprintln!("{case}: final latents max |diff| {d_lat:e}");
    assert!(d_lat < 1e-4, "{case}: final latents differ by {d_lat}");

    // Stage 4: the image, against diffusers' PNG.
    let images = pipe.decode(&fin).unwrap();
    let (want, _) = read_png(&fixtures().join(format!("golden/{case}/image.png"))).unwrap();
    assert_eq!((images[0].width, images[0].height), (want.width, want.height));
    let worst = images[0].pixels.iter().zip(&want.pixels).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    eprintln!("{case}: image max |diff| {worst}/255");
    assert!(worst <= 2, "{case}: image differs from diffusers' by {worst}/255");
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
