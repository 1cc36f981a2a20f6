//! Decode random latents with an SD3-sized VAE decoder (the published config, random weights) and report the
//! time per decode: a smoke test of the decoder at full size on a real backend, where the tiny fixtures cannot
//! show memory or speed problems.
//!
//! `cargo run --example vae_decode -- [BACKEND] [SIZE] [DTYPE]` (defaults: cpu 256 f32; 1024 is SD3's default
//! image size). Non-CPU backends are found like the CLI finds them (`SD3_PLUGIN_PATH`, `--plugin-dir` folders).
//! `SD3_PROFILE=1` adds a per-op profile of one more decode.

use safetensors::tensor::{Dtype, TensorView};
use sd3::models::vae::AutoencoderKL;
use sd3::runtime::{open_backend, BackendRequest};
use sd3_core::DType;
use std::time::Instant;

/// `stabilityai/stable-diffusion-3-medium-diffusers` `vae/config.json` (decoder-relevant fields).
const CONFIG: &str = r#"{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
 "in_channels": 3, "latent_channels": 16, "layers_per_block": 2, "mid_block_add_attention": true,
 "norm_num_groups": 32, "out_channels": 3, "scaling_factor": 1.5305, "shift_factor": 0.0609,
 "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
 "use_post_quant_conv": false, "use_quant_conv": false}"#;

struct Rng(u64);
impl Rng {
    fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect()
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend_name = args.first().map(String::as_str).unwrap_or("cpu");
    let size: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let dtype: DType = args.get(2).map(|s| s.parse().map_err(anyhow::Error::msg)).transpose()?.unwrap_or(DType::F32);
    anyhow::ensure!(size > 0 && size.checked_rem(8) == Some(0), "size must be a positive multiple of 8");

    // Random weights scaled like PyTorch's default init (uniform ±1/√fan_in) so activations stay O(1);
    // norm weights 1, biases small.
    let dir = std::env::temp_dir().join(format!("sd3-vae-decode-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("config.json"), CONFIG)?;
    let mut rng = Rng(7);
    // The decoder's tensor names and shapes, as its loader asks for them.
    let tensors = AutoencoderKL::expected_tensors(&serde_json::from_str(CONFIG)?)?;
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values = if name.contains("norm") && name.ends_with(".weight") {
                vec![1.0; n]
            } else if shape.len() == 1 {
                rng.uniform(n, 0.01)
            } else {
                let fan_in: usize = shape[1..].iter().product();
                rng.uniform(n, 1.0 / (fan_in as f32).sqrt())
            };
            DType::F16.f32_to_bytes(&values)
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&data)
        .map(|((name, shape), bytes)| (name.clone(), TensorView::new(Dtype::F16, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("diffusion_pytorch_model.safetensors"))?;
    let params: usize = tensors.iter().map(|(_, s)| s.iter().product::<usize>()).sum();

    let backend = open_backend(&BackendRequest::named(backend_name))?;
    let vae = AutoencoderKL::load(&dir, &backend, dtype)?;
    let h = size / 8;
    let latents = backend.from_f32(&Rng(11).uniform(16 * h * h, 1.0), &[1, 16, h, h], dtype)?;
    println!(
        "backend {} ({}), decoder {:.1} M parameters, {size}x{size}, {dtype}",
        backend.name(),
        backend.info().name,
        params as f64 / 1e6
    );
    for run in 0..3 {
        let t = Instant::now();
        let image = vae.decode(&latents)?;
        let values = image.to_f32_vec()?; // synchronises
        let secs = t.elapsed().as_secs_f64();
        let finite = values.iter().all(|v| v.is_finite());
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
        let std = (values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
        println!("run {run}: {secs:.3} s, output {:?}, finite {finite}, mean {mean:.4}, std {std:.4}", image.shape());
    }
    if std::env::var("SD3_PROFILE").is_ok_and(|v| v == "1") {
        // One more decode with every op bracketed by synchronisations: where the time goes, by op and shape.
        backend.enable_profiling();
        vae.decode(&latents)?.to_f32_vec()?;
        let total: f64 = backend.profile().iter().map(|p| p.2).sum();
        println!("profile of one decode ({:.3} s with per-op synchronisation):", total);
        for (name, n, secs) in backend.profile().iter().take(30) {
            println!("{:>9.3} ms {:>5}x  {name}", secs * 1e3, n);
        }
    }
    let fallbacks = backend.fallback_counts();
    println!("host fallbacks: {}", if fallbacks.is_empty() { "none".to_string() } else { format!("{fallbacks:?}") });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
