//! MM-DiT forward time at SD3-medium width (1536 = 24 heads × 64) with random weights, the counterpart of
//! `anchor_cpu.py` (diffusers): `bench_mmdit LAYERS RES [BATCH] [BACKEND]`, f32, 333 text tokens, timestep 500.
//! Prints the median of runs 2-4 in the anchor's format. Threads: `SD3_NUM_THREADS` (CPU backend).
//! Run through `scripts/bench_mmdit_cpu.sh`, which also runs diffusers and prints the ratio.

use sd3::models::mmdit::{Sd3Transformer2DModel, Sd3TransformerConfig};
use sd3::runtime::{open_backend, BackendRequest};
use sd3_core::DType;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg =
        |i: usize, default: usize| args.get(i).map(|s| s.parse::<usize>()).transpose().map(|v| v.unwrap_or(default));
    let (layers, res, batch) = (arg(0, 2)?, arg(1, 512)?, arg(2, 2)?);
    let backend_name = args.get(3).cloned().unwrap_or_else(|| "cpu".into());
    let backend = open_backend(&BackendRequest { backend: backend_name, ..BackendRequest::default() })?;
    let config = Sd3TransformerConfig { num_layers: layers, ..Sd3TransformerConfig::sd3_medium() };
    let model = Sd3Transformer2DModel::random(config.clone(), 0, &backend, DType::F32)?;
    let lat = res / 8;
    let noise = |seed: u64, n: usize| sd3::noise::standard_normal(seed, n);
    let x = backend.from_f32(&noise(1, batch * 16 * lat * lat), &[batch, 16, lat, lat], DType::F32)?;
    let ctx = backend.from_f32(&noise(2, batch * 333 * 4096), &[batch, 333, 4096], DType::F32)?;
    let pooled = backend.from_f32(&noise(3, batch * 2048), &[batch, 2048], DType::F32)?;
    let t = vec![500.0f32; batch];
    let mut times = Vec::new();
    for _ in 0..4 {
        let start = Instant::now();
        let y = model.forward(&x, &ctx, &pooled, &t, &[])?;
        backend.synchronize()?;
        let _ = y.narrow(0, 0, 1)?.to_f32_vec()?; // make sure the work is done
        times.push(start.elapsed().as_secs_f64());
    }
    let mut tail = times[1..].to_vec();
    tail.sort_by(f64::total_cmp);
    let all: Vec<String> = times.iter().map(|t| format!("{t:.3}")).collect();
    println!(
        "layers={layers} res={res} batch={batch} backend={} ({}) forward_s median_of_3={:.3} all=[{}]",
        backend.name(),
        backend.info().name,
        tail[1],
        all.join(", ")
    );
    Ok(())
}
