//! Quick timings of the CPU backend's main ops (the shapes of `benches/cpu_ops.rs`), best of a few runs.
//! For iterating on kernels without building the root package; the criterion benches are the reference.
//!
//! Usage: `SD3_NUM_THREADS=2 cargo run --release -p sd3-backend-cpu --example ops_bench -- [FILTER]`

use sd3_backend_cpu::{pool, CpuDevice};
use sd3_core::{DType, Device, Layout, Op, OpCall, TensorDesc};
use std::time::Instant;

fn tensor(dev: &CpuDevice, shape: &[usize], dtype: DType) -> TensorDesc {
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1999) as f32 - 999.5) * 1e-3).collect();
    let buffer = dev.alloc(n * dtype.size_in_bytes()).unwrap();
    dev.upload(buffer, 0, &dtype.f32_to_bytes(&vals)).unwrap();
    TensorDesc { buffer, dtype, layout: Layout::contiguous(shape) }
}

fn time(dev: &CpuDevice, name: &str, work: f64, unit: &str, op: Op, ins: &[TensorDesc], out: TensorDesc) {
    let filter = std::env::args().nth(1).unwrap_or_default();
    if !name.contains(&filter) {
        return;
    }
    let outs = [out];
    let call = OpCall { op, inputs: ins, outputs: &outs };
    dev.execute(&call).unwrap();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        dev.execute(&call).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{name:<44} {:>9.2} ms  {:>8.1} {unit}", best * 1e3, work / best / 1e9);
}

fn main() {
    let dev = CpuDevice::new();
    println!("threads={}", pool().current_num_threads());
    let (m, k, n) = (8192, 1536, 1536);
    let x = tensor(&dev, &[m, k], DType::F32);
    for wdt in [DType::F32, DType::BF16] {
        let mut w = tensor(&dev, &[n, k], wdt);
        w.layout = Layout { shape: vec![k, n], strides: vec![1, k], offset: 0 };
        let ins = [x.clone(), w, tensor(&dev, &[n], wdt)];
        let flops = 2.0 * (m * k * n) as f64;
        time(
            &dev,
            &format!("linear 8192x1536x1536 w{wdt}"),
            flops,
            "GFLOP/s",
            Op::Matmul { bias: true, act: None },
            &ins,
            tensor(&dev, &[m, n], DType::F32),
        );
    }
    for (b, h, nt, d) in [(2, 24, 1024, 64), (2, 24, 1357, 64), (2, 24, 4429, 64)] {
        let qkv: Vec<TensorDesc> = (0..3).map(|_| tensor(&dev, &[b, h, nt, d], DType::F32)).collect();
        let op = Op::Attention { scale: 0.125, causal: false, bias: false, qk_norm: false, norm_eps: 0.0 };
        let flops = 4.0 * (b * h * nt * nt * d) as f64;
        time(
            &dev,
            &format!("attention {b}x{h}x{nt}x{d}"),
            flops,
            "GFLOP/s",
            op,
            &qkv,
            tensor(&dev, &[b, h, nt, d], DType::F32),
        );
    }
    let (b, nt, d) = (2, 4096, 1536);
    let bc =
        |t: TensorDesc| TensorDesc { layout: Layout { shape: vec![b, nt, d], strides: vec![d, 0, 1], offset: 0 }, ..t };
    let ins = [
        tensor(&dev, &[b, nt, d], DType::F32),
        bc(tensor(&dev, &[b, 1, d], DType::F32)),
        bc(tensor(&dev, &[b, 1, d], DType::F32)),
    ];
    time(
        &dev,
        "layer_norm_modulate 2x4096x1536",
        8.0 * (b * nt * d) as f64,
        "GB/s",
        Op::LayerNormModulate { eps: 1e-6 },
        &ins,
        tensor(&dev, &[b, nt, d], DType::F32),
    );
    let x = tensor(&dev, &[b, nt, d], DType::F32);
    let out = tensor(&dev, &[b, nt, d], DType::F32);
    let bytes = 8.0 * (b * nt * d) as f64;
    time(
        &dev,
        "layer_norm 2x4096x1536",
        bytes,
        "GB/s",
        Op::LayerNorm { eps: 1e-6, affine: false },
        std::slice::from_ref(&x),
        out.clone(),
    );
    let s = bc(tensor(&dev, &[b, 1, d], DType::F32));
    time(&dev, "modulate 2x4096x1536", bytes, "GB/s", Op::Modulate, &[x.clone(), s.clone(), s], out.clone());
    time(&dev, "softmax 2x4096x1536", bytes, "GB/s", Op::Softmax, &[x], out);
    let ins = [tensor(&dev, &[b, nt, 2 * d], DType::F32)];
    for f in [
        sd3_core::UnaryOp::Exp,
        sd3_core::UnaryOp::Neg,
        sd3_core::UnaryOp::Square,
        sd3_core::UnaryOp::Relu,
        sd3_core::UnaryOp::GeluTanh,
        sd3_core::UnaryOp::GeluErf,
    ] {
        let name = format!("{} 2x4096x3072", f.name());
        let out = tensor(&dev, &[b, nt, 2 * d], DType::F32);
        time(&dev, &name, 8.0 * (b * nt * 2 * d) as f64, "GB/s", Op::Unary(f), &ins, out);
    }
    let (ch, hw) = (128, 128);
    let ins = [
        tensor(&dev, &[1, ch, hw, hw], DType::F32),
        tensor(&dev, &[ch, ch, 3, 3], DType::F32),
        tensor(&dev, &[ch], DType::F32),
    ];
    let op = Op::Conv2d { stride: [1, 1], padding: [1, 1], bias: true };
    time(
        &dev,
        "conv2d 3x3 128ch 128x128",
        2.0 * (ch * hw * hw * ch * 9) as f64,
        "GFLOP/s",
        op,
        &ins,
        tensor(&dev, &[1, ch, hw, hw], DType::F32),
    );
}
