//! The real models (the bundled tiny SD3 / SD3.5 fixtures made with diffusers) on the NPU stub, under the seed's
//! flag values and under the opposite of every flag, against diffusers' goldens; and an arena too small for
//! the model. Every op must run on the device: the backends here have no host fallback.
//!
//! Tolerances are those of the root crate's golden tests on the CPU backend (`tests/mmdit_golden.rs`,
//! `tests/vae.rs`): f32 on both sides, only the summation order differs.

use sd3::models::mmdit::Sd3Transformer2DModel;
use sd3::models::vae::AutoencoderKL;
use sd3::weights::Weights;
use sd3_backend_npu::{NpuConfig, NpuDevice, NpuFlags};
use sd3_core::{Backend, DType, Error, Tensor};
use std::path::PathBuf;
use std::sync::Arc;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn npu(flags: NpuFlags, arena_mb: u64) -> (Backend, Arc<NpuDevice>) {
    let dev = Arc::new(NpuDevice::new(NpuConfig::new(flags, arena_mb << 20)).unwrap());
    (Backend::new("npu", dev.clone()), dev)
}

fn max_err_over_range(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    let range = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    (err / range.max(1.0), range)
}

/// The transformer's first denoising call of a golden case.
fn mmdit_first_step(be: &Backend, case: &str, model: &str) -> (f32, f32) {
    let g = Weights::open_file(&fixtures().join(format!("golden/{case}/golden.safetensors"))).unwrap();
    let m = Sd3Transformer2DModel::load(&fixtures().join(format!("{model}/transformer")), be, DType::F32).unwrap();
    let t = |n: &str| g.tensor(n, be, DType::F32).unwrap();
    let x = t("step0_hidden_states");
    let (ctx, pooled) = if x.dim(0) == 2 {
        (
            Tensor::cat(&[&t("neg_prompt_embeds"), &t("prompt_embeds")], 0).unwrap(),
            Tensor::cat(&[&t("neg_pooled_projections"), &t("pooled_projections")], 0).unwrap(),
        )
    } else {
        (t("prompt_embeds"), t("pooled_projections"))
    };
    let ts = g.host_f32("step0_timestep").unwrap();
    let out = m.forward(&x, &ctx, &pooled, &ts, &[]).unwrap().to_f32_vec().unwrap();
    max_err_over_range(&out, &g.host_f32("step0_output").unwrap())
}

fn vae_decode(be: &Backend, case: &str) -> (f32, f32) {
    let vae = AutoencoderKL::load(&fixtures().join("sd3-tiny/vae"), be, DType::F32).unwrap();
    let g = Weights::open_file(&fixtures().join(format!("golden/{case}/golden.safetensors"))).unwrap();
    let out = vae.decode(&g.tensor("vae_input", be, DType::F32).unwrap()).unwrap();
    max_err_over_range(&out.to_f32_vec().unwrap(), &g.host_f32("vae_output").unwrap())
}

fn stat(dev: &NpuDevice, key: &str) -> u64 {
    let stats = sd3_core::Device::stats(dev);
    let line = stats.iter().find(|l| l.starts_with(&format!("{key}="))).unwrap();
    line[key.len() + 1..].parse().unwrap()
}

fn models_match_diffusers(flags: NpuFlags) -> Arc<NpuDevice> {
    let (be, dev) = npu(flags, 512);
    for (case, model) in [("sd3-cfg", "sd3-tiny"), ("sd35-cfg", "sd35-tiny")] {
        let (err, range) = mmdit_first_step(&be, case, model);
        eprintln!("{case} transformer on npu {flags:?}: max err {err:e} of range {range}");
        assert!(range > 0.1, "degenerate golden");
        assert!(err <= 2e-5, "{case} transformer: max err {err:e} of the range");
    }
    let (err, range) = vae_decode(&be, "sd3-cfg");
    eprintln!("sd3-cfg vae on npu {flags:?}: max err {err:e} of range {range}");
    assert!(err <= 1e-5, "vae: max err {err:e} of the range");
    assert!(be.fallback_counts().is_empty());
    dev
}

#[test]
fn models_under_the_seeds_flags() {
    let dev = models_match_diffusers(NpuFlags::seed());
    assert!(stat(&dev, "contiguous_copies") > 0, "the models use views, which are copied with stride kernels off");
    assert_eq!(stat(&dev, "strided_operands"), 0);
}

#[test]
fn models_under_the_opposite_flags() {
    let dev = models_match_diffusers(NpuFlags::seed_opposite());
    assert_eq!(stat(&dev, "contiguous_copies"), 0);
    assert!(stat(&dev, "nz.conversions") > 0);
    assert!(stat(&dev, "nc1hwc0.conversions") > 0);
}

#[test]
fn arena_too_small_for_the_model_is_a_clear_oom() {
    for flags in [NpuFlags::seed(), NpuFlags::seed_opposite()] {
        let (be, _) = npu(flags, 1);
        let err = match Sd3Transformer2DModel::load(&fixtures().join("sd3-tiny/transformer"), &be, DType::F32) {
            Ok(_) => panic!("a 1 MiB arena holds the tiny transformer?"),
            Err(e) => e,
        };
        // The error and its sources, outermost first.
        let mut chain: Vec<&(dyn std::error::Error + 'static)> = vec![&err];
        while let Some(next) = chain.last().unwrap().source() {
            chain.push(next);
        }
        let msg: String = chain.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(": ");
        eprintln!("{msg}");
        let strategy = flags.allocator_strategy.name();
        assert!(msg.contains("out of device memory") && msg.contains(strategy), "{msg}");
        assert!(msg.contains("requested") && msg.contains("available") && msg.contains("arena 1048576 bytes"), "{msg}");
        let oom = chain.iter().any(|e| matches!(e.downcast_ref::<Error>(), Some(Error::OutOfMemory { .. })));
        assert!(oom, "not an sd3_core::Error::OutOfMemory: {msg}");
    }
}
