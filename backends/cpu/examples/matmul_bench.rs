//! f32 matmul throughput of the CPU backend: `N×N · N×N` through `Device::execute`, as
//! `scripts/bench_matmul_vs_numpy.py` compares it with numpy.
//!
//! Usage: `SD3_NUM_THREADS=2 cargo run --release -p sd3-backend-cpu --example matmul_bench -- [N] [REPEATS]`
//! Prints one line: `ours n=N threads=T best_s=... gflops=...`.

use sd3_backend_cpu::{pool, CpuDevice};
use sd3_core::{DType, Device, Layout, Op, OpCall, TensorDesc};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2048);
    let repeats: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let dev = CpuDevice::new();
    let desc = |dev: &CpuDevice, fill: f32| -> Result<TensorDesc, sd3_core::Error> {
        let b = dev.alloc(n * n * 4)?;
        // Deterministic non-zero data.
        let vals: Vec<f32> = (0..n * n).map(|i| fill + ((i * 7919) % 1000) as f32 * 1e-3).collect();
        dev.upload(b, 0, &DType::F32.f32_to_bytes(&vals))?;
        Ok(TensorDesc { buffer: b, dtype: DType::F32, layout: Layout::contiguous(&[n, n]) })
    };
    let (a, b, y) = (desc(&dev, 0.5)?, desc(&dev, -0.25)?, desc(&dev, 0.0)?);
    let ins = [a, b];
    let outs = [y];
    let call = OpCall { op: Op::Matmul { bias: false, act: None }, inputs: &ins, outputs: &outs };
    dev.execute(&call)?; // warm-up: thread pool start, page faults
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t = Instant::now();
        dev.execute(&call)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (n as f64).powi(3) / best / 1e9;
    println!("ours n={n} threads={} best_s={best:.4} gflops={gflops:.1}", pool().current_num_threads());
    Ok(())
}
