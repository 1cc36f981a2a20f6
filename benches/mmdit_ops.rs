//! Criterion benchmarks of the MM-DiT's hot ops at SD3-medium shapes on any backend, through the `Tensor` API
//! as the model calls them: the joint attention, the four linears of a block (the feed-forward's up-projection
//! with its fused GELU), layer-norm-modulate and the gated residual. Each sample synchronises the device, so the
//! times are the device's (plus one launch). Throughput is FLOP/s for products, bytes/s for the rest.
//!
//! `SD3_BENCH_BACKEND=cuda SD3_BENCH_DTYPE=bf16 cargo bench --bench mmdit_ops [-- FILTER]`
//! `SD3_BENCH_RES` (default 1024 on a GPU backend, 256 on the CPU) sets the image size; batch 2 and the 333
//! text tokens of SD3's default prompt length are fixed. PyTorch's figures for the same shapes on the same card:
//! `scripts/bench_ops_torch.py`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sd3::runtime::{open_backend, BackendRequest};
use sd3_core::{AttentionParams, Backend, DType, Tensor, UnaryOp};
use std::time::{Duration, Instant};

struct Setup {
    backend: Backend,
    dtype: DType,
    image_tokens: usize,
}

fn setup() -> Setup {
    let name = std::env::var("SD3_BENCH_BACKEND").unwrap_or_else(|_| "cpu".into());
    let dtype: DType = std::env::var("SD3_BENCH_DTYPE")
        .unwrap_or_else(|_| if name == "cpu" { "f32".into() } else { "bf16".into() })
        .parse()
        .unwrap_or_else(|e| panic!("SD3_BENCH_DTYPE: {e}"));
    let res: usize = std::env::var("SD3_BENCH_RES")
        .map(|r| r.parse().unwrap_or_else(|e| panic!("SD3_BENCH_RES: {e}")))
        .unwrap_or(if name == "cpu" { 256 } else { 1024 });
    let backend = open_backend(&BackendRequest { backend: name.clone(), ..BackendRequest::default() })
        .unwrap_or_else(|e| panic!("SD3_BENCH_BACKEND={name}: {e:#}"));
    Setup { backend, dtype, image_tokens: (res / 16) * (res / 16) }
}

fn random(s: &Setup, shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = sd3::noise::standard_normal(seed, n).into_iter().map(|x| x * scale).collect();
    s.backend.from_f32(&v, shape, s.dtype).unwrap()
}

/// One benchmark: `f` queued per iteration, the device synchronised before the clock stops.
fn bench(c: &mut Criterion, s: &Setup, name: &str, throughput: Throughput, f: &dyn Fn() -> Tensor) {
    let mut g = c.benchmark_group(format!("mmdit/{}/{}", s.backend.name(), s.dtype));
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.throughput(throughput);
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            s.backend.synchronize().unwrap();
            let start = Instant::now();
            for _ in 0..iters {
                drop(f());
            }
            s.backend.synchronize().unwrap();
            start.elapsed()
        })
    });
    g.finish();
}

fn mmdit_ops(c: &mut Criterion) {
    let s = setup();
    let (b, h, dh, d, text) = (2usize, 24usize, 64usize, 1536usize, 333usize);
    let n = s.image_tokens + text;
    let es = s.dtype.size_in_bytes() as u64;

    let q = random(&s, &[b, h, n, dh], 1, 1.0);
    let k = random(&s, &[b, h, n, dh], 2, 1.0);
    let v = random(&s, &[b, h, n, dh], 3, 1.0);
    let params = AttentionParams::new((dh as f32).powf(-0.5));
    let flop = 4 * (b * h * n * n * dh) as u64;
    bench(c, &s, "attention", Throughput::Elements(flop), &|| Tensor::attention(&q, &k, &v, &params).unwrap());

    let rows = b * s.image_tokens;
    let x = random(&s, &[rows, d], 4, 1.0);
    let x4 = random(&s, &[rows, 4 * d], 5, 1.0);
    for (name, input, out, act) in [
        ("linear_qkv", &x, 3 * d, None),
        ("linear_out", &x, d, None),
        ("linear_ff_up_gelu", &x, 4 * d, Some(UnaryOp::GeluTanh)),
        ("linear_ff_down", &x4, d, None),
    ] {
        let w = random(&s, &[out, input.dim(1)], 6, 0.02);
        let bias = random(&s, &[out], 7, 1.0);
        let flop = 2 * (rows * input.dim(1) * out) as u64;
        bench(c, &s, name, Throughput::Elements(flop), &|| input.linear_act(&w, Some(&bias), act).unwrap());
    }

    let x3 = random(&s, &[b, s.image_tokens, d], 8, 1.0);
    let y3 = random(&s, &[b, s.image_tokens, d], 9, 1.0);
    let scale = random(&s, &[b, 1, d], 10, 0.5);
    let shift = random(&s, &[b, 1, d], 11, 0.5);
    let bytes = (b * s.image_tokens * d) as u64 * es;
    bench(c, &s, "layer_norm_modulate", Throughput::Bytes(2 * bytes), &|| {
        x3.layer_norm_modulate(&scale, &shift, 1e-6).unwrap()
    });
    bench(c, &s, "gated_residual", Throughput::Bytes(3 * bytes), &|| x3.gated_residual(&scale, &y3).unwrap());
}

criterion_group!(benches, mmdit_ops);
criterion_main!(benches);
