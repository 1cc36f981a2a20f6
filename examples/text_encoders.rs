//! Run SD3's three text encoders at full size (the published CLIP-L, CLIP-G and T5-XXL configs, random weights)
//! on a backend: load time, forward time, finite outputs. A smoke test of the encoders where the tiny fixtures
//! cannot show size, memory or speed problems.
//!
//! `cargo run --example text_encoders -- [BACKEND] [DTYPE] [SKIP_T5]` (defaults: cpu f16; any third argument
//! skips T5-XXL, whose random f16 weights take 9.5 GB of disk and memory).

use safetensors::tensor::{Dtype, TensorView};
use sd3::models::clip::ClipTextModel;
use sd3::models::t5::T5EncoderModel;
use sd3::runtime::{open_backend, BackendRequest};
use sd3_core::DType;
use std::path::Path;
use std::time::Instant;

const CLIP_L: &str = r#"{"eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
  "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
  "projection_dim": 768, "vocab_size": 49408}"#;
const CLIP_G: &str = r#"{"eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
  "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 20, "num_hidden_layers": 32,
  "projection_dim": 1280, "vocab_size": 49408}"#;
const T5_XXL: &str = r#"{"d_ff": 10240, "d_kv": 64, "d_model": 4096, "feed_forward_proj": "gated-gelu",
  "layer_norm_epsilon": 1e-06, "num_heads": 64, "num_layers": 24, "relative_attention_max_distance": 128,
  "relative_attention_num_buckets": 32, "vocab_size": 32128}"#;

/// Write `config` and f16 random weights for `tensors` into `dir`: norms 1, embeddings and biases small,
/// matrices uniform ±1/√fan_in (PyTorch's default scale, so activations stay O(1)).
fn write_component(dir: &Path, config: &str, tensors: &[(String, Vec<usize>)]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), config)?;
    let mut state = 7u64;
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let bound = if name.contains("norm") {
                0.0
            } else if shape.len() == 2 && !name.contains("embed") && !name.contains("shared") {
                1.0 / (shape[1] as f32).sqrt()
            } else {
                0.02
            };
            let base = if name.contains("norm") && name.ends_with("weight") { 1.0 } else { 0.0 };
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    base + ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
                })
                .collect();
            DType::F16.f32_to_bytes(&values)
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&data)
        .map(|((name, shape), bytes)| (name.clone(), TensorView::new(Dtype::F16, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    Ok(())
}

fn stats(values: &[f32]) -> String {
    let finite = values.iter().all(|v| v.is_finite());
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
    let std = (values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt();
    format!("finite {finite}, mean {mean:.4}, std {std:.4}")
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend = open_backend(&BackendRequest::named(args.first().map(String::as_str).unwrap_or("cpu")))?;
    let dtype: DType = args.get(1).map(|s| s.parse().map_err(anyhow::Error::msg)).transpose()?.unwrap_or(DType::F16);
    let skip_t5 = args.get(2).is_some();
    let root = std::env::temp_dir().join(format!("sd3-text-encoders-{}", std::process::id()));
    println!("backend {} ({}), {dtype}", backend.name(), backend.info().name);

    // A 77-token CLIP prompt: BOS, words, EOS, EOS padding (CLIP-L style).
    let mut clip_ids: Vec<i64> = vec![49406];
    clip_ids.extend((0..20).map(|i| 320 + 37 * i));
    clip_ids.resize(77, 49407);
    for (name, config) in [("clip-l", CLIP_L), ("clip-g", CLIP_G)] {
        let dir = root.join(name);
        write_component(&dir, config, &ClipTextModel::expected_tensors(&serde_json::from_str(config)?)?)?;
        let t = Instant::now();
        let model = ClipTextModel::load(&dir, &backend, dtype)?;
        backend.synchronize()?;
        let load = t.elapsed().as_secs_f64();
        for run in 0..2 {
            let t = Instant::now();
            let out = model.forward(&clip_ids, None)?;
            let hidden = out.penultimate.to_f32_vec()?;
            let pooled = out.pooled.to_f32_vec()?;
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{name}: load {load:.2} s, forward {run} {secs:.3} s, hidden {:?} {}, pooled {:?} {}",
                out.penultimate.shape(),
                stats(&hidden),
                out.pooled.shape(),
                stats(&pooled)
            );
        }
        drop(model);
        std::fs::remove_dir_all(&dir)?;
    }

    if !skip_t5 {
        let dir = root.join("t5-xxl");
        let t = Instant::now();
        write_component(&dir, T5_XXL, &T5EncoderModel::expected_tensors(&serde_json::from_str(T5_XXL)?)?)?;
        println!("t5-xxl: random weights written in {:.1} s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        let model = T5EncoderModel::load(&dir, &backend, dtype)?;
        backend.synchronize()?;
        let load = t.elapsed().as_secs_f64();
        let mut ids: Vec<i64> = (0..40).map(|i| 100 + 311 * i).collect();
        ids.push(1);
        ids.resize(256, 0);
        for run in 0..2 {
            let t = Instant::now();
            let out = model.forward(&ids)?;
            let values = out.to_f32_vec()?;
            let secs = t.elapsed().as_secs_f64();
            println!("t5-xxl: load {load:.2} s, forward {run} {secs:.3} s, {:?} {}", out.shape(), stats(&values));
        }
    }
    let fallbacks = backend.fallback_counts();
    println!("host fallbacks: {}", if fallbacks.is_empty() { "none".to_string() } else { format!("{fallbacks:?}") });
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
