//! The whole tiny text-to-image pipeline (text encoders, CFG Euler loop, VAE decode) on the NPU stub, under the
//! seed's flag values and under the opposite of every flag, against diffusers' golden latents and image (the
//! `sd3-cfg` and `sd35-slg` cases of `fixtures/golden`, with their initial noise). The backend has no host
//! fallback, so every op of the pipeline runs on the stub. Tolerances are those of the root crate's
//! `tests/pipeline_golden.rs` on the CPU backend.

use sd3::image_out::read_png;
use sd3::pipeline::{GenerationRequest, PipelineOptions, SkipLayerGuidance, StableDiffusion3Pipeline};
use sd3::weights::Weights;
use sd3_backend_npu::{NpuConfig, NpuDevice, NpuFlags};
use sd3_core::Backend;
use std::path::PathBuf;
use std::sync::Arc;

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

fn generate_on_npu(flags: NpuFlags) -> Arc<NpuDevice> {
    let dev = Arc::new(NpuDevice::new(NpuConfig::new(flags, 512 << 20)).unwrap());
    let be = Backend::new("npu", dev.clone());
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
        eprintln!("{case} on npu {flags:?}: final latents max |diff| {d_lat:e}, image max |diff| {worst}/255");
        assert!(d_lat < 1e-3, "{case}: final latents differ by {d_lat}");
        assert!(worst <= 2, "{case}: image differs from diffusers' by {worst}/255");
    }
    assert!(be.fallback_counts().is_empty());
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
