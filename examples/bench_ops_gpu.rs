//! Per-op throughput of the MM-DiT's hot ops at SD3-medium shapes, 1024², batch 2 (4096 image + 333 text
//! tokens), on a GPU backend: attention `[2, 24, 4429, 64]` and the four linears of a joint block. Pairs with
//! `scripts/bench_ops_torch.py`, which times the same ops in PyTorch on the same card.
//! `bench_ops_gpu [--backend cuda] [--dtype bf16] [--iters 20]`.

use sd3::runtime::{open_backend, BackendRequest};
use sd3_core::{AttentionParams, DType, Tensor};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: &str| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or(default.into())
    };
    let backend = flag("--backend", "cuda");
    let dtype: DType = flag("--dtype", "bf16").parse().map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let iters: usize = flag("--iters", "20").parse()?;
    let be = open_backend(&BackendRequest { backend, ..BackendRequest::default() })?;
    let r = |shape: &[usize], seed: u64| {
        let n = shape.iter().product();
        be.from_f32(&sd3::noise::standard_normal(seed, n), shape, dtype)
    };
    // Seconds per call of `f`, after one warm-up call, the device synchronised around the timed calls.
    let seconds = |f: &dyn Fn() -> sd3_core::Result<Tensor>| -> anyhow::Result<f64> {
        f()?;
        be.synchronize()?;
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        be.synchronize()?;
        Ok(t.elapsed().as_secs_f64() / iters as f64)
    };
    let time = |label: &str, flops: f64, f: &dyn Fn() -> sd3_core::Result<Tensor>| -> anyhow::Result<()> {
        let s = seconds(f)?;
        println!("{label:<40} {:>9.3} ms {:>8.1} TFLOP/s", s * 1e3, flops / s / 1e12);
        Ok(())
    };
    let (b, h, n, dh, d) = (2, 24, 4429, 64, 1536);
    let q = r(&[b, h, n, dh], 1)?;
    let k = r(&[b, h, n, dh], 2)?;
    let v = r(&[b, h, n, dh], 3)?;
    let params = AttentionParams::new((dh as f32).powf(-0.5));
    time("attention [2,24,4429,64]", 4.0 * (b * h * n * n * dh) as f64, &|| Tensor::attention(&q, &k, &v, &params))?;
    let tokens = b * 4096;
    let x = r(&[tokens, d], 4)?;
    let x4 = r(&[tokens, 4 * d], 5)?;
    for (label, input, out_features) in [
        ("linear 8192x1536 -> 4608 (qkv)", &x, 3 * d),
        ("linear 8192x1536 -> 1536 (out)", &x, d),
        ("linear 8192x1536 -> 6144 (ff up)", &x, 4 * d),
        ("linear 8192x6144 -> 1536 (ff down)", &x4, d),
    ] {
        let in_features = input.dim(1);
        let w = r(&[out_features, in_features], 6)?.scale(0.02)?;
        let bias = r(&[out_features], 7)?;
        let flops = 2.0 * (tokens * in_features * out_features) as f64;
        time(label, flops, &|| input.linear(&w, Some(&bias)))?;
    }
    // The adaLN modulation: 2 rows through a [9216, 1536] weight, bound by reading the weight.
    let pooled = r(&[b, d], 14)?;
    let w_mod = r(&[6 * d, d], 15)?.scale(0.02)?;
    let bias_mod = r(&[6 * d], 16)?;
    time("linear 2x1536 -> 9216 (adaLN)", 2.0 * (b * d * 6 * d) as f64, &|| pooled.linear(&w_mod, Some(&bias_mod)))?;
    // Memory-bound ops around the linears: GB/s = bytes read and written once.
    let gbs = |label: &str, bytes: f64, f: &dyn Fn() -> sd3_core::Result<Tensor>| -> anyhow::Result<()> {
        let s = seconds(f)?;
        println!("{label:<40} {:>9.3} ms {:>8.0} GB/s", s * 1e3, bytes / s / 1e9);
        Ok(())
    };
    let es = dtype.size_in_bytes() as f64;
    let x3 = r(&[b, 4096, d], 8)?;
    let y3 = r(&[b, 4096, d], 9)?;
    let scale = r(&[b, 1, d], 10)?;
    let shift = r(&[b, 1, d], 11)?;
    let bytes = 2.0 * (b * 4096 * d) as f64 * es;
    gbs("layer_norm_modulate [2,4096,1536]", bytes, &|| x3.layer_norm_modulate(&scale, &shift, 1e-6))?;
    gbs("gated_residual [2,4096,1536]", 1.5 * bytes, &|| x3.gated_residual(&scale, &y3))?;
    let h3 = r(&[b, 4096, 4 * d], 12)?;
    gbs("gelu_tanh [2,4096,6144]", 8.0 * (b * 4096 * d) as f64 * es, &|| h3.gelu_tanh())?;
    let qkv = r(&[b, 4096, 3, h, dh], 13)?;
    gbs("head split copy [2,4096,24,64]", bytes, &|| {
        qkv.narrow(2, 0, 1)?.squeeze(2)?.permute(&[0, 2, 1, 3])?.contiguous()
    })?;
    Ok(())
}
