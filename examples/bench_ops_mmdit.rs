//! Per-op times of the MM-DiT's hot ops at SD3-medium width, 512², batch 2 (1357 joint tokens), f32: where the
//! forward's time goes on a backend. `bench_ops_mmdit [BACKEND]`; threads: `SD3_NUM_THREADS`.

use sd3::runtime::{open_backend, BackendRequest};
use sd3_core::{AttentionParams, DType, Tensor};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let name = std::env::args().nth(1).unwrap_or_else(|| "cpu".into());
    let be = open_backend(&BackendRequest { backend: name, ..BackendRequest::default() })?;
    let r = |shape: &[usize], seed: u64| {
        let n = shape.iter().product();
        be.from_f32(&sd3::noise::standard_normal(seed, n), shape, DType::F32)
    };
    let (b, n, s, d) = (2, 1024, 333, 1536);
    let x = r(&[b, n, d], 1)?;
    let xt = r(&[b, n + s, d], 2)?;
    let w = r(&[d, d], 3)?.scale(0.02)?;
    let w3 = r(&[3 * d, d], 4)?.scale(0.02)?;
    let w4 = r(&[4 * d, d], 5)?.scale(0.02)?;
    let w4t = r(&[d, 4 * d], 6)?.scale(0.02)?;
    let bias = r(&[d], 7)?;
    let bias3 = r(&[3 * d], 8)?;
    let bias4 = r(&[4 * d], 9)?;
    let h4 = r(&[b, n, 4 * d], 10)?;
    let q = r(&[b, 24, n + s, 64], 11)?;
    let mods = r(&[b, 1, d], 12)?;
    let time = |label: &str, flops: f64, f: &dyn Fn() -> sd3_core::Result<Tensor>| -> anyhow::Result<()> {
        f()?;
        be.synchronize()?;
        let reps = 3;
        let t = Instant::now();
        for _ in 0..reps {
            let y = f()?;
            let _ = y.narrow(0, 0, 1)?.narrow(1, 0, 1)?.to_f32_vec()?;
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("{label:<44} {:>8.2} ms {:>8.1} GFLOP/s", s * 1e3, flops / s / 1e9);
        Ok(())
    };
    let mm = |m: usize, k: usize, o: usize| 2.0 * (m * k * o) as f64;
    time("linear [2,1024,1536] x [1536,1536]^T", mm(b * n, d, d), &|| x.linear(&w, Some(&bias)))?;
    time("linear [2,1024,1536] x [4608,1536]^T (qkv)", mm(b * n, d, 3 * d), &|| x.linear(&w3, Some(&bias3)))?;
    time("linear [2,1024,1536] x [6144,1536]^T (ff1)", mm(b * n, d, 4 * d), &|| x.linear(&w4, Some(&bias4)))?;
    time("linear [2,1024,6144] x [1536,6144]^T (ff2)", mm(b * n, 4 * d, d), &|| h4.linear(&w4t, None))?;
    time("gelu_tanh [2,1024,6144]", 0.0, &|| h4.gelu_tanh())?;
    let att_flops = 4.0 * (b * 24 * (n + s) * (n + s) * 64) as f64;
    time("attention [2,24,1357,64] (contiguous)", att_flops, &|| {
        Tensor::attention(&q, &q, &q, &AttentionParams::new(0.125))
    })?;
    let qv = r(&[b, n + s, 3, 24, 64], 13)?;
    let view = |i: usize| qv.narrow(2, i, 1).and_then(|t| t.squeeze(2)).and_then(|t| t.permute(&[0, 2, 1, 3]));
    let (qs, ks, vs) = (view(0)?, view(1)?, view(2)?);
    time("attention [2,24,1357,64] (strided q/k/v views)", att_flops, &|| {
        Tensor::attention(&qs, &ks, &vs, &AttentionParams::new(0.125))
    })?;
    time("layer_norm_modulate [2,1357,1536]", 0.0, &|| xt.layer_norm_modulate(&mods, &mods, 1e-6))?;
    time("gated_residual [2,1357,1536]", 0.0, &|| xt.gated_residual(&mods, &xt))?;
    time("cat [2,1024,..] + [2,333,..] seq (qkv)", 0.0, &|| Tensor::cat(&[&x, &xt.narrow(1, 0, s)?], 1))?;
    let o = r(&[b, 24, n + s, 64], 14)?;
    time("merge heads: permute+narrow+reshape", 0.0, &|| {
        o.permute(&[0, 2, 1, 3])?.narrow(1, 0, n)?.reshape(&[b, n, d])
    })?;
    Ok(())
}
