//! The whole tiny text-to-image pipeline (text encoders, CFG Euler loop with and without skip-layer guidance,
//! VAE decode) on the Vulkan device against diffusers' golden latents and image (the `sd3-cfg` and `sd35-slg`
//! cases of `fixtures/golden`, with their initial noise). Every op of the models must run on the device (no host
//! fallback).
//! Skips, with the reason printed, only on a machine without a Vulkan loader or device.

mod common;

use sd3::image_out::read_png;
use sd3::pipeline::{GenerationRequest, PipelineOptions, SkipLayerGuidance, StableDiffusion3Pipeline};
use sd3::weights::Weights;
use sd3_core::{Backend, Device};
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The request of a golden case (values from its `params.json`).
fn request(case: &str) -> (&'static str, GenerationRequest) {
    let mut r;
    let model = match case {
        "sd3-cfg" => {
            r = GenerationRequest::new("A cat holding a sign that says hello world", 64, 64);
            (r.steps, r.guidance, r.max_sequence_length, r.seed) = (3, 5.0, 256, 42);
            "sd3-tiny"
        }
        "sd35-slg" => {
            r = GenerationRequest::new("a lighthouse on a cliff at dusk", 96, 64);
            (r.steps, r.guidance, r.max_sequence_length, r.seed) = (4, 4.5, 64, 47);
            r.slg = Some(SkipLayerGuidance { layers: vec![1], scale: 2.8, start: 0.01, stop: 0.6 });
            "sd35-tiny"
        }
        _ => unreachable!(),
    };
    r.init_noise = Some(fixtures().join(format!("golden/{case}/init_noise.safetensors")));
    (model, r)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn tiny_pipelines_match_diffusers() {
    let Some(dev) = common::device() else { return };
    let be = Backend::new("vulkan", dev.clone());
    for case in ["sd3-cfg", "sd35-slg"] {
        let (model, r) = request(case);
        let pipe =
            StableDiffusion3Pipeline::new(&fixtures().join(model), be.clone(), PipelineOptions::default()).unwrap();
        let g = Weights::open_file(&fixtures().join(format!("golden/{case}/golden.safetensors"))).unwrap();
        let cond = pipe.encode(&r, &mut |_| {}).unwrap();
        let latents = pipe.initial_latents(&r).unwrap();
        let fin = pipe.denoise(&r, &cond, latents, &mut |_| {}).unwrap();
        let d_lat = max_abs_diff(&fin.to_f32_vec().unwrap(), &g.host_f32("final_latents").unwrap());
        let images = pipe.decode(&fin).unwrap();
        let (want, _) = read_png(&fixtures().join(format!("golden/{case}/image.png"))).unwrap();
        assert_eq!((images[0].width, images[0].height), (want.width, want.height));
        let worst = images[0].pixels.iter().zip(&want.pixels).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        let mean = images[0].pixels.iter().map(|&p| p as f64).sum::<f64>() / images[0].pixels.len() as f64;
        eprintln!("{case} on vulkan: final latents max |diff| {d_lat:e}, image max |diff| {worst}/255, mean {mean:.1}");
        assert!(d_lat < 1e-3, "{case}: final latents differ by {d_lat}");
        assert!(worst <= 3, "{case}: image differs from diffusers' by {worst}/255");
    }
    let fallbacks = be.fallback_counts();
    eprintln!("ops run on the host instead: {fallbacks:?}");
    eprintln!("device stats: {:?}", dev.stats());
    assert!(fallbacks.is_empty(), "ops fell back to the host: {fallbacks:?}");
}
