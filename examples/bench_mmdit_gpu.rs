//! Times one MM-DiT forward (SD3-medium shapes, random weights) on any backend in any dtype, for side-by-side
//! comparison with diffusers (`../shared/tools/anchor_diffusers.py`) run on the same card.
//!
//! ```text
//! cargo run --release --example bench_mmdit_gpu -- --backend cuda --dtype bf16 --res 1024 --batch 2 [--layers 24] [--iters 10]
//!     [--mp-size N]
//! ```
//! `--mp-size N` splits the model over devices 0..N of the backend (tensor parallelism, `models::mmdit::parallel`).
//! Prints the median wall time of a synchronised forward, the achieved TFLOP/s (linears + attention, the
//! PERFORMANCE.md count), host fallbacks and the device's allocator statistics.

use sd3::models::mmdit::parallel::TensorParallelTransformer;
use sd3::models::mmdit::Sd3TransformerConfig;
use sd3::runtime::{open_backend, BackendRequest};
use sd3_core::DType;
use std::time::Instant;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let backend_name: String = arg(&args, "--backend", "cpu".to_string());
    let dtype: DType = arg(&args, "--dtype", "f32".to_string()).parse().map_err(anyhow::Error::msg)?;
    let res: usize = arg(&args, "--res", 512);
    let batch: usize = arg(&args, "--batch", 2);
    let layers: usize = arg(&args, "--layers", 24);
    let iters: usize = arg(&args, "--iters", 10);
    let mut req = BackendRequest::named(&backend_name);
    req.strict = args.iter().any(|a| a == "--strict");
    let mp: usize = arg(&args, "--mp-size", 1);
    let group = (0..mp.max(1))
        .map(|i| open_backend(&BackendRequest { device: req.device + i, ..req.clone() }))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let backend = group[0].clone();
    let sync = || group.iter().try_for_each(|b| b.synchronize());
    let mut config = Sd3TransformerConfig::sd3_medium();
    config.num_layers = layers;
    let t0 = Instant::now();
    let model = TensorParallelTransformer::random(&config, 0, &group, dtype)?;
    sync()?;
    eprintln!(
        "built {layers}-layer model in {:.1} s on {} ({} device{})",
        t0.elapsed().as_secs_f64(),
        backend.info().name,
        group.len(),
        if group.len() > 1 { "s" } else { "" }
    );
    let lat = res / 8;
    let noise = |n: usize, seed: u64| -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    };
    let x = backend.from_f32(&noise(batch * 16 * lat * lat, 1), &[batch, 16, lat, lat], dtype)?;
    let ctx = backend.from_f32(&noise(batch * 333 * 4096, 2), &[batch, 333, 4096], dtype)?;
    let pooled = backend.from_f32(&noise(batch * 2048, 3), &[batch, 2048], dtype)?;
    let t = vec![500.0f32; batch];
    let profile = args.iter().any(|a| a == "--profile");
    let mut times = Vec::new();
    // Host time to queue one forward (until `forward` returns, before synchronising). Where it stays well below
    // the forward's time the GPU never waits for the host, so replaying launches from a CUDA graph cannot pay.
    let mut enqueue = Vec::new();
    let mut stats_after_warmup = Vec::new();
    for i in 0..iters + 2 {
        if i == 2 {
            stats_after_warmup = backend.stats();
        }
        let s = Instant::now();
        let y = model.forward(&x, &ctx, &pooled, &t, &[])?;
        let queued = s.elapsed().as_secs_f64() * 1e3;
        sync()?;
        let ms = s.elapsed().as_secs_f64() * 1e3;
        if i >= 2 {
            times.push(ms);
            enqueue.push(queued);
        }
        drop(y);
    }
    // Steady state allocates nothing from the driver: the device's counters after the warm-ups and after the
    // timed forwards, side by side where they differ (e.g. `cuda.driver_allocs`).
    let stats_after = backend.stats();
    for (before, after) in stats_after_warmup.iter().zip(&stats_after) {
        if before != after {
            println!("during the timed forwards: {before} -> {after}");
        }
    }
    if profile {
        // One more forward with every op bracketed by synchronisations.
        backend.enable_profiling();
        model.forward(&x, &ctx, &pooled, &t, &[])?;
        let total: f64 = backend.profile().iter().map(|p| p.2).sum();
        println!("profile of one forward ({:.2} ms with per-op synchronisation):", total * 1e3);
        for (name, n, secs) in backend.profile().iter().take(25) {
            println!("{:>9.3} ms {:>5}x  {name}", secs * 1e3, n);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    enqueue.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    // FLOPs: linears 2·12·D²·tokens per block (image and text streams) + attention 4·L²·D per block, per sample.
    let d = config.inner_dim() as f64;
    let img = (lat / 2 * lat / 2) as f64;
    let txt = 333.0;
    let flop = batch as f64 * layers as f64 * (2.0 * 12.0 * d * d * (img + txt) + 4.0 * (img + txt).powi(2) * d);
    println!(
        "mmdit backend={backend_name} dtype={dtype} res={res} batch={batch} layers={layers} mp={mp}: median {median:.2} ms \
         ({:.1} TFLOP/s), min {:.2} ms, max {:.2} ms",
        flop / median / 1e9,
        times[0],
        times[times.len() - 1]
    );
    println!("host time to queue a forward: median {:.2} ms", enqueue[enqueue.len() / 2]);
    println!("host fallbacks: {:?}", backend.fallback_counts());
    for s in backend.stats() {
        println!("{s}");
    }
    Ok(())
}
