//! Times one training step (`sd3 train-lora`'s forward, loss and backward to the adapters, rank 4 on the
//! script's eight attention projections per block; with `--full`, `sd3 train-dreambooth`'s backward to every
//! parameter, the optimizer not included) with SD3-medium shapes and random weights, on any backend.
//!
//! ```text
//! cargo run --release --example bench_train_step -- --backend cuda --dtype bf16 --res 512 [--batch 1] [--layers 24]
//!     [--iters 3] [--gradient-checkpointing] [--full [--adamw]] [--profile]
//! ```
//! `--adamw` (with `--full`) adds `sd3 train-dreambooth`'s clipping and device AdamW step to the step.
//! `--profile` adds one more step with every op bracketed by synchronisations and prints the time per op.
//! Prints the median wall time of a synchronised step, the forward alone for comparison, and the process's peak
//! memory. The text sequence is 154 tokens (77 CLIP + 77 T5, the script's `max_sequence_length`).

use sd3::models::mmdit::train::TrainingBatch;
use sd3::models::mmdit::{Sd3Transformer2DModel, Sd3TransformerConfig};
use sd3::runtime::{open_backend, BackendRequest};
use sd3::train::lora_params::LoraParams;
use sd3_core::DType;
use std::time::Instant;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let backend = open_backend(&BackendRequest::named(&arg(&args, "--backend", "cpu".to_string())))?;
    let dtype: DType = arg(&args, "--dtype", "f32".to_string()).parse().map_err(anyhow::Error::msg)?;
    let (res, batch, iters): (usize, usize, usize) =
        (arg(&args, "--res", 512), arg(&args, "--batch", 1), arg(&args, "--iters", 3));
    let mut config = Sd3TransformerConfig::sd3_medium();
    config.num_layers = arg(&args, "--layers", 24);
    let model = Sd3Transformer2DModel::random(config, 0, &backend, dtype)?;
    let mut lora = LoraParams::gaussian(&model.adapter_shapes(), 4, 4.0, 1);
    // B = 0 would leave half the adapter math trivially zero-valued; give it values.
    lora.modules.values_mut().for_each(|m| m.b.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 7) as f32 * 1e-3));
    let adapters = lora.upload(&backend, dtype)?;
    let lat = res / 8;
    let n = batch * 16 * lat * lat;
    let x = backend.from_f32(&sd3::noise::standard_normal(1, n), &[batch, 16, lat, lat], DType::F32)?;
    let ctx = backend.from_f32(&sd3::noise::standard_normal(2, batch * 154 * 4096), &[batch, 154, 4096], dtype)?;
    let pooled = backend.from_f32(&sd3::noise::standard_normal(3, batch * 2048), &[batch, 2048], dtype)?;
    let t = vec![500.0f32; batch];
    let checkpointing = args.iter().any(|a| a == "--gradient-checkpointing");
    let inputs = TrainingBatch { hidden_states: &x, encoder_hidden_states: &ctx, pooled: &pooled, timesteps: &t };
    let full = args.iter().any(|a| a == "--full");
    let adamw = std::cell::RefCell::new(if args.iter().any(|a| a == "--adamw") {
        Some(sd3::train::optim::DeviceAdamW::new(Default::default(), model.named_parameters()?)?)
    } else {
        None
    });
    let run_step = || -> anyhow::Result<()> {
        if full {
            let (grads, ()) = model.parameter_gradients(&inputs, checkpointing, |p| Ok((p.clone(), ())))?;
            if let Some(adam) = adamw.borrow_mut().as_mut() {
                let mut grads = grads;
                sd3::train::optim::clip_device_grad_norm(&mut grads, 1.0)?;
                adam.step(&grads)?;
            }
            backend.synchronize()?;
        } else {
            let (grads, ()) = model.adapter_gradients(&inputs, &adapters, checkpointing, |p| Ok((p.clone(), ())))?;
            for [a, b] in grads.values() {
                a.to_f32_vec()?;
                b.to_f32_vec()?;
            }
        }
        Ok(())
    };
    let (mut steps, mut forwards) = (Vec::new(), Vec::new());
    for i in 0..iters + 1 {
        let s = Instant::now();
        model.forward(&x, &ctx, &pooled, &t, &[])?.to_f32_vec()?;
        let forward = s.elapsed().as_secs_f64();
        let s = Instant::now();
        run_step()?;
        let step = s.elapsed().as_secs_f64();
        if i > 0 {
            steps.push(step);
            forwards.push(forward);
        }
        eprintln!("iteration {i}: step {step:.3} s, forward {forward:.3} s");
    }
    println!(
        "{} ({}), {dtype}, {res}² batch {batch}, {} layers: training step median {:.3} s, forward {:.3} s (ratio {:.2}); peak RSS {:.1} GiB",
        backend.name(),
        backend.info().name,
        model.config.num_layers,
        median(steps.clone()),
        median(forwards.clone()),
        median(steps) / median(forwards),
        sd3::pipeline::peak_rss_bytes().unwrap_or(0) as f64 / (1u64 << 30) as f64
    );
    if args.iter().any(|a| a == "--profile") {
        backend.enable_profiling();
        run_step()?;
        let profile = backend.profile();
        let total: f64 = profile.iter().map(|p| p.2).sum();
        println!("profile of one step ({:.1} ms with per-op synchronisation):", total * 1e3);
        let mut by_op: std::collections::BTreeMap<&str, (u64, f64)> = Default::default();
        for (name, n, secs) in &profile {
            let e = by_op.entry(name.split(' ').next().unwrap_or(name)).or_default();
            (e.0, e.1) = (e.0 + n, e.1 + secs);
        }
        let mut by_op: Vec<_> = by_op.into_iter().collect();
        by_op.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        for (name, (n, secs)) in by_op {
            println!("{:>9.3} ms {:>6}x  {name}", secs * 1e3, n);
        }
        println!("slowest op shapes:");
        for (name, n, secs) in profile.iter().take(25) {
            println!("{:>9.3} ms {:>6}x  {name}", secs * 1e3, n);
        }
    }
    Ok(())
}
