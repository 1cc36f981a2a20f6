//! Criterion benchmarks of the CPU backend's main ops, through `Device::execute` (no Tensor-level overhead).
//! Throughput is reported as elements/s where an "element" is one FLOP (matmul, linear, attention, conv) or
//! one byte moved (layer_norm_modulate). Threads: `SD3_NUM_THREADS` (default: all cores).
//!
//! `cargo bench --bench cpu_ops [-- FILTER]`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sd3_backend_cpu::CpuDevice;
use sd3_core::{DType, Device, Layout, Op, OpCall, TensorDesc};
use std::time::Duration;

/// A contiguous tensor of `dtype` filled with deterministic non-zero values.
fn tensor(dev: &CpuDevice, shape: &[usize], dtype: DType) -> TensorDesc {
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1999) as f32 - 999.5) * 1e-3).collect();
    let buffer = dev.alloc(n * dtype.size_in_bytes()).unwrap();
    dev.upload(buffer, 0, &dtype.f32_to_bytes(&vals)).unwrap();
    TensorDesc { buffer, dtype, layout: Layout::contiguous(shape) }
}

/// The transpose of a 2-D tensor as a view.
fn transposed(t: &TensorDesc) -> TensorDesc {
    let mut t = t.clone();
    t.layout.shape.reverse();
    t.layout.strides.reverse();
    t
}

fn bench_op(c: &mut Criterion, name: &str, work: u64, op: Op, ins: &[TensorDesc], out: &TensorDesc, dev: &CpuDevice) {
    let outs = [out.clone()];
    let call = OpCall { op, inputs: ins, outputs: &outs };
    assert!(dev.supports(&call), "{name}: unsupported");
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(work));
    g.bench_function(name, |b| b.iter(|| dev.execute(&call).unwrap()));
    g.finish();
}

fn matmul(c: &mut Criterion) {
    let dev = CpuDevice::new();
    let n = 2048;
    let (a, b, y) =
        (tensor(&dev, &[n, n], DType::F32), tensor(&dev, &[n, n], DType::F32), tensor(&dev, &[n, n], DType::F32));
    bench_op(
        c,
        "matmul_2048_f32 (flop)",
        2 * (n as u64).pow(3),
        Op::Matmul { bias: false, act: None },
        &[a, b],
        &y,
        &dev,
    );
}

fn linear(c: &mut Criterion) {
    let dev = CpuDevice::new();
    let (m, k, n) = (8192, 1536, 1536);
    let x = tensor(&dev, &[m, k], DType::F32);
    let y = tensor(&dev, &[m, n], DType::F32);
    for wdt in [DType::F32, DType::BF16] {
        let w = transposed(&tensor(&dev, &[n, k], wdt));
        let bias = tensor(&dev, &[n], wdt);
        let name = format!("linear_8192x1536x1536_w{wdt} (flop)");
        let ins = [x.clone(), w, bias];
        bench_op(c, &name, 2 * (m * k * n) as u64, Op::Matmul { bias: true, act: None }, &ins, &y, &dev);
    }
}

fn attention(c: &mut Criterion) {
    let dev = CpuDevice::new();
    let (b, h, n, d) = (2, 24, 1024, 64);
    let qkv: Vec<TensorDesc> = (0..3).map(|_| tensor(&dev, &[b, h, n, d], DType::F32)).collect();
    let out = tensor(&dev, &[b, h, n, d], DType::F32);
    let op = Op::Attention { scale: 0.125, causal: false, bias: false, qk_norm: false, norm_eps: 0.0 };
    let flops = 4 * (b * h * n * n * d) as u64;
    bench_op(c, "attention_2x24x1024x64_f32 (flop)", flops, op, &qkv, &out, &dev);
}

fn layer_norm_modulate(c: &mut Criterion) {
    let dev = CpuDevice::new();
    let (b, n, d) = (2, 4096, 1536);
    let x = tensor(&dev, &[b, n, d], DType::F32);
    let out = tensor(&dev, &[b, n, d], DType::F32);
    // adaLN: per-sample scale and shift broadcast over the tokens.
    let bcast =
        |t: TensorDesc| TensorDesc { layout: Layout { shape: vec![b, n, d], strides: vec![d, 0, 1], offset: 0 }, ..t };
    let (s, h) = (bcast(tensor(&dev, &[b, 1, d], DType::F32)), bcast(tensor(&dev, &[b, 1, d], DType::F32)));
    let bytes = 2 * (b * n * d * 4) as u64;
    bench_op(
        c,
        "layer_norm_modulate_2x4096x1536_f32 (byte)",
        bytes,
        Op::LayerNormModulate { eps: 1e-6 },
        &[x, s, h],
        &out,
        &dev,
    );
}

fn conv2d(c: &mut Criterion) {
    let dev = CpuDevice::new();
    // A VAE decoder block: 128 channels at 128², 3×3, padding 1.
    let (n, ch, hw) = (1, 128, 128);
    let x = tensor(&dev, &[n, ch, hw, hw], DType::F32);
    let w = tensor(&dev, &[ch, ch, 3, 3], DType::F32);
    let bias = tensor(&dev, &[ch], DType::F32);
    let y = tensor(&dev, &[n, ch, hw, hw], DType::F32);
    let op = Op::Conv2d { stride: [1, 1], padding: [1, 1], bias: true };
    let flops = 2 * (n * ch * hw * hw * ch * 9) as u64;
    bench_op(c, "conv2d_3x3_128ch_128x128_f32 (flop)", flops, op, &[x, w, bias], &y, &dev);
}

criterion_group!(benches, matmul, linear, attention, layer_norm_modulate, conv2d);
criterion_main!(benches);
