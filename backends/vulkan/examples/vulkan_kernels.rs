//! Per-kernel device time of the Vulkan backend at SD3-medium shapes (1024², batch 2): the joint attention
//! `[2, 24, 4429, 64]`, the four linears of a block on each stream and the memory-bound ops around them, f16. Each op runs
//! `--iters` times back to back between two timestamp markers (no synchronisation in between), so the figure is
//! device time per call; wall time per call is printed beside it. `SD3_VULKAN_VARIANT` picks shader variants and
//! `SD3_VULKAN_PIPELINE_STATS=1` prints the driver's statistics of each pipeline (see `src/pipelines.rs`).
//!
//! The GPU's clock ramps up under load: the attention first runs for `--warmup-ms` of wall time, untimed.
//!
//! `cargo run --release -p sd3-backend-vulkan --example vulkan_kernels -- [--iters 20] [--device 0]
//! [--ops attention,linear,memory] [--warmup-ms 500] [--repeat 1]`
//!
//! `--repeat N` times the whole sequence N times: on the H200 some figures depended on what ran just before them
//! (see docs/performance.md, "MM-DiT on Vulkan").

use sd3_backend_vulkan::VulkanProvider;
use sd3_core::{AttentionParams, Backend, DType, Device, DeviceTimer, Tensor};
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: &str| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or(default.into())
    };
    let iters: usize = flag("--iters", "20").parse()?;
    let index: usize = flag("--device", "0").parse()?;
    let ops = flag("--ops", "attention,linear,memory");
    let warmup_ms: u128 = flag("--warmup-ms", "500").parse()?;
    let repeat: usize = flag("--repeat", "1").parse()?;
    let device: Arc<dyn Device> = Arc::new(VulkanProvider::new()?.open(index)?);
    let be = Backend::new("vulkan", device.clone());
    let dtype = DType::F16;
    let mut seed = 0u64;
    let mut r = |shape: &[usize], scale: f32| -> sd3_core::Result<Tensor> {
        seed += 1;
        // A cheap deterministic fill in [-scale, scale): the figures do not depend on the values.
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| {
                let x = (i as u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0x2545_f491_4f6c_dd1d);
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        be.from_f32(&data, shape, dtype)
    };
    // (device ms, wall ms) per call of `f`, after one warm-up call.
    let time = |f: &dyn Fn() -> sd3_core::Result<Tensor>| -> Result<(f64, f64), Box<dyn std::error::Error>> {
        f()?;
        be.synchronize()?;
        let wall = Instant::now();
        let timer = DeviceTimer::start(&device)?;
        for _ in 0..iters {
            f()?;
        }
        let dev = timer.stop()?.unwrap_or(f64::NAN);
        Ok((dev * 1e3 / iters as f64, wall.elapsed().as_secs_f64() * 1e3 / iters as f64))
    };
    let flops =
        |label: &str, flop: f64, f: &dyn Fn() -> sd3_core::Result<Tensor>| -> Result<(), Box<dyn std::error::Error>> {
            let (d, w) = time(f)?;
            println!("{label:<36} {d:>9.3} ms device {w:>9.3} ms wall {:>8.1} TFLOP/s", flop / d / 1e9);
            Ok(())
        };
    let bytes =
        |label: &str, b: f64, f: &dyn Fn() -> sd3_core::Result<Tensor>| -> Result<(), Box<dyn std::error::Error>> {
            let (d, w) = time(f)?;
            println!("{label:<36} {d:>9.3} ms device {w:>9.3} ms wall {:>8.0} GB/s", b / d / 1e6);
            Ok(())
        };
    let (b, h, n, dh, d) = (2, 24, 4429, 64, 1536);
    let (q, k, v) = (r(&[b, h, n, dh], 1.0)?, r(&[b, h, n, dh], 1.0)?, r(&[b, h, n, dh], 1.0)?);
    let params = AttentionParams::new((dh as f32).powf(-0.5));
    let warm = Instant::now();
    while warm.elapsed().as_millis() < warmup_ms {
        Tensor::attention(&q, &k, &v, &params)?;
        be.synchronize()?;
    }
    // The image stream's 2 x 4096 tokens and the context stream's 2 x 333.
    let (tokens, ctx) = (b * 4096, b * 333);
    let (x, x4) = (r(&[tokens, d], 1.0)?, r(&[tokens, 4 * d], 1.0)?);
    let (c, c4) = (r(&[ctx, d], 1.0)?, r(&[ctx, 4 * d], 1.0)?);
    let mut linears = Vec::new();
    for (label, context, four_k, out_features) in [
        ("linear 8192x1536 -> 4608 (qkv)", false, false, 3 * d),
        ("linear 8192x1536 -> 1536 (out)", false, false, d),
        ("linear 8192x1536 -> 6144 (ff up)", false, false, 4 * d),
        ("linear 8192x6144 -> 1536 (ff down)", false, true, d),
        ("linear 666x1536 -> 4608 (ctx qkv)", true, false, 3 * d),
        ("linear 666x1536 -> 1536 (ctx out)", true, false, d),
        ("linear 666x1536 -> 6144 (ctx ff up)", true, false, 4 * d),
        ("linear 666x6144 -> 1536 (ctx ff down)", true, true, d),
    ] {
        let in_features = if four_k { 4 * d } else { d };
        let rows = if context { ctx } else { tokens };
        let (w, bias) = (r(&[out_features, in_features], 0.02)?, r(&[out_features], 1.0)?);
        let input = match (context, four_k) {
            (false, false) => &x,
            (false, true) => &x4,
            (true, false) => &c,
            (true, true) => &c4,
        };
        linears.push((label, input, w, bias, 2.0 * (rows * in_features * out_features) as f64));
    }
    let es = dtype.size_in_bytes() as f64;
    let (x3, y3) = (r(&[b, 4096, d], 1.0)?, r(&[b, 4096, d], 1.0)?);
    let (scale, shift) = (r(&[b, 1, d], 1.0)?, r(&[b, 1, d], 1.0)?);
    let (h3, heads) = (r(&[b, 4096, 4 * d], 1.0)?, r(&[b, 4096, h, dh], 1.0)?);
    // A block's adaLN modulation: temb [2, 1536] through norm1.linear (6 chunks).
    let (temb, w_ada, b_ada) = (r(&[b, d], 1.0)?, r(&[6 * d, d], 0.02)?, r(&[6 * d], 1.0)?);
    let act = 2.0 * (b * 4096 * d) as f64 * es;
    // Repeated rounds show whether a figure depends on what ran before it (clock and power state).
    for round in 1..=repeat {
        if repeat > 1 {
            println!("--- round {round} of {repeat}");
        }
        if ops.contains("attention") {
            flops("attention [2,24,4429,64]", 4.0 * (b * h * n * n * dh) as f64, &|| {
                Tensor::attention(&q, &k, &v, &params)
            })?;
        }
        if ops.contains("linear") {
            for (label, input, w, bias, flop) in &linears {
                flops(label, *flop, &|| input.linear(w, Some(bias)))?;
            }
        }
        if ops.contains("memory") {
            bytes("adaLN linear [2,1536] -> 9216", (6 * d * d) as f64 * es, &|| temb.linear(&w_ada, Some(&b_ada)))?;
            bytes("layer_norm_modulate [2,4096,1536]", act, &|| x3.layer_norm_modulate(&scale, &shift, 1e-6))?;
            bytes("gated_residual [2,4096,1536]", 1.5 * act, &|| x3.gated_residual(&scale, &y3))?;
            bytes("modulate [2,4096,1536]", act, &|| x3.modulate(&scale, &shift))?;
            bytes("add [2,4096,1536]", 1.5 * act, &|| x3.add(&y3))?;
            bytes("gelu_tanh [2,4096,6144]", 4.0 * act, &|| h3.gelu_tanh())?;
            bytes("head split copy [2,4096,24,64]", act, &|| heads.permute(&[0, 2, 1, 3])?.contiguous())?;
        }
    }
    for s in device.stats() {
        println!("{s}");
    }
    Ok(())
}
