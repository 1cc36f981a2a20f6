//! Every tiny diffusers golden pipeline on the CUDA plugin, loaded through the C ABI as `sd3 --backend cuda
//! --strict` loads it (every op on the GPU, no host fallback), through the shared golden runner (`sd3::golden`).
//! Needs the plugin built beside this test (`cargo build --workspace`); skips, printing why, where no CUDA driver
//! or device is usable (CI has none: these run on the GPU machine, results in docs/cuda.md).
//!
//! f32 runs are held to the CPU backend's tolerances (cuBLAS computes f32 products in f32, not TF32). A
//! half-precision run is held to how far diffusers' own runs in that dtype land from its f32 goldens, measured with
//! `scripts/diffusers_half_distance.py` over these seven cases (bf16 7-15/255, f16 1-2/255; table below): the
//! image within the worst of them plus 2/255. Per case the distance is mostly the luck of the roundings (diffusers'
//! bf16 runs span 7-15/255 on near-identical pipelines), so the bound is the spread of the reference, not each
//! case's own draw; the printed lines show both for comparison.

use sd3::golden::{fixtures_dir, GoldenCase, Tolerances};
use sd3::runtime::{open_backend, BackendRequest};
use sd3::train::golden::check_every_step;
use sd3_core::DType;

/// Each case, with diffusers' own distance from its f32 golden image in bf16 and in f16 (1/255; diffusers 0.42.1,
/// torch 2.15 on the CPU, 26 Nov 2026).
const CASES: [(&str, u8, u8); 7] = [
    ("sd3-cfg", 12, 1),
    ("sd3-nocfg", 7, 1),
    ("sd3-long-prompt", 10, 2),
    ("sd3-lora", 15, 2),
    ("sd3-no-t5", 9, 2),
    ("sd35-cfg", 14, 2),
    ("sd35-slg", 11, 1),
];

/// The CPU backend's limits (tests/pipeline_golden.rs): the same f32 arithmetic up to summation order.
const F32: Tolerances =
    Tolerances { conditioning: Some(5e-5), initial_latents: Some(0.0), final_latents: Some(1e-4), image: 2 };

/// Half precision: the image within diffusers' worst distance at that dtype plus 2/255; latents and embeddings are
/// printed, not limited (diffusers publishes no half-precision intermediates to compare them with).
fn half(worst_diffusers_distance: u8) -> Tolerances {
    Tolerances { conditioning: None, initial_latents: None, final_latents: None, image: worst_diffusers_distance + 2 }
}

/// The CUDA plugin, strict; `None` (with the reason printed) where no CUDA driver or device is usable.
fn open_cuda() -> Option<sd3_core::Backend> {
    let request = BackendRequest { strict: true, ..BackendRequest::named("cuda") };
    match open_backend(&request) {
        Ok(be) => Some(be),
        Err(e) => {
            let msg = format!("{e:#}");
            if msg.contains("not found") || msg.contains("no CUDA") || msg.contains("no device") {
                eprintln!("SKIPPED: no usable CUDA on this machine: {msg}");
                return None;
            }
            panic!("opening the CUDA plugin (is libsd3_backend_cuda built beside the test?): {msg}");
        }
    }
}

fn run(dtype: DType) {
    let Some(be) = open_cuda() else { return };
    let worst_bf16 = CASES.iter().map(|c| c.1).max().unwrap_or(0);
    let worst_f16 = CASES.iter().map(|c| c.2).max().unwrap_or(0);
    for (case, bf16, f16) in CASES {
        let (tol, diffusers) = match dtype {
            DType::BF16 => (half(worst_bf16), format!(" (diffusers bf16: {bf16}/255)")),
            DType::F16 => (half(worst_f16), format!(" (diffusers f16: {f16}/255)")),
            _ => (F32, String::new()),
        };
        let mut golden = GoldenCase::load(&fixtures_dir(), case).unwrap();
        golden.options.dtype = dtype;
        let d = golden.run_and_check(&be, &tol).unwrap_or_else(|e| panic!("{dtype}: {e:#}"));
        eprintln!("{case} {dtype} on {} ({}): {d}{diffusers}", be.name(), be.info().name);
    }
}

#[test]
fn goldens_f32_on_cuda() {
    run(DType::F32);
}

#[test]
fn goldens_f16_on_cuda() {
    run(DType::F16);
}

#[test]
fn goldens_bf16_on_cuda() {
    run(DType::BF16);
}

/// Every golden training step (`sd3::train::golden::check_every_step`: the LoRA and the full step on both tiny
/// models, the step with the text encoders) against diffusers + PEFT, f32, within the CPU backend's bounds.
#[test]
fn lora_training_step_on_cuda() {
    let Some(be) = open_cuda() else { return };
    for line in check_every_step(&fixtures_dir(), &be).unwrap_or_else(|e| panic!("{e:#}")) {
        eprintln!("{line} on cuda");
    }
}

/// The fused attention backward (`Op::AttentionBackward`, `kernels/flash_bwd.cu`) at MM-DiT sizes against the
/// products it replaces in training: both in f16 and bf16 measured against the products in f32, the fused kernel
/// must be at least as close as the half-precision products (plus a floor for equal errors), for dq, dk and dv.
#[test]
fn fused_attention_backward_on_cuda() {
    use sd3::train::grad_ops::attention_backward;
    use sd3_core::{AttentionParams, Tensor};
    let Some(be) = open_cuda() else { return };
    let shape = [2, 3, 1030, 64];
    let n: usize = shape.iter().product();
    let scale = 0.125;
    for dtype in [DType::F16, DType::BF16] {
        let t = |seed| be.from_f32(&sd3::noise::standard_normal(seed, n), &shape, dtype).unwrap();
        let (q, k, v, d_o) = (t(11), t(12), t(13), t(14));
        let o = Tensor::attention(&q, &k, &v, &AttentionParams::new(scale)).unwrap();
        let out = be.zeros(&[&[3][..], &shape[..]].concat(), dtype).unwrap();
        let ran = Tensor::attention_backward_into(&q, &k, &v, &o, &d_o, scale, false, &out).unwrap();
        assert!(ran, "no fused kernel");
        let fused = out.to_f32_vec().unwrap();
        let f32s = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
        let (eq, ek, ev) =
            attention_backward(&f32s(&q), &f32s(&k), &f32s(&v), &f32s(&o), &f32s(&d_o), scale, false).unwrap();
        let (hq, hk, hv) = attention_backward(&q, &k, &v, &o, &d_o, scale, false).unwrap();
        for (i, (exact, half)) in [(eq, hq), (ek, hk), (ev, hv)].iter().enumerate() {
            let exact = exact.to_f32_vec().unwrap();
            let rms = |x: &[f32]| {
                (x.iter().zip(&exact).map(|(a, e)| ((a - e) as f64).powi(2)).sum::<f64>() / n as f64).sqrt()
            };
            let scale_of = (exact.iter().map(|e| (*e as f64).powi(2)).sum::<f64>() / n as f64).sqrt();
            let (fused_err, half_err) = (rms(&fused[i * n..(i + 1) * n]), rms(&half.to_f32_vec().unwrap()));
            eprintln!(
                "{dtype} {}: rms {scale_of:.3e}, fused error {fused_err:.3e}, products' error {half_err:.3e}",
                ["dq", "dk", "dv"][i]
            );
            assert!(
                fused_err <= 1.5 * half_err + 1e-3 * scale_of,
                "{dtype} {}: fused {fused_err} against {half_err}",
                ["dq", "dk", "dv"][i]
            );
        }
    }
}
