//! What the CUDA test files share: opening the GPU (or saying why the tests skip), the same random tensor on the
//! GPU and on the reference device, and the NMSE comparison with its per-dtype limits.

#![allow(dead_code)] // each test file uses a different part

use sd3_backend_cuda::CudaProvider;
use sd3_core::reference::ReferenceDevice;
use sd3_core::{Backend, BackendProvider, DType, Result, Tensor};
use std::sync::Arc;

/// The CUDA device as a backend, or `None` (printing why) where no CUDA device is usable.
pub fn gpu() -> Option<Backend> {
    match CudaProvider::new("").and_then(|p| p.open_device(0)) {
        Ok(d) => Some(Backend::new("cuda", d)),
        Err(e) => {
            eprintln!("skipping CUDA tests: {e}");
            None
        }
    }
}

/// A linear congruential generator: the same inputs on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                lo + (hi - lo) * ((self.0 >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }
}

/// The GPU and the reference device, and a way to make the same random tensor on each.
pub struct Pair {
    pub gpu: Backend,
    pub cpu: Backend,
    pub rng: Rng,
}

impl Pair {
    /// `None` (printing why) where no CUDA device is usable.
    pub fn open(seed: u64) -> Option<Pair> {
        let gpu = gpu()?;
        Some(Pair { gpu, cpu: Backend::new("ref", Arc::new(ReferenceDevice::new())), rng: Rng(seed) })
    }

    pub fn rand(&mut self, shape: &[usize], dt: DType, lo: f32, hi: f32) -> Result<(Tensor, Tensor)> {
        let v = self.rng.uniform(shape.iter().product(), lo, hi);
        Ok((self.gpu.from_f32(&v, shape, dt)?, self.cpu.from_f32(&v, shape, dt)?))
    }
}

/// Normalised mean squared error; NaN in the output fails.
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| !v.is_nan()), "NaN in output");
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((*a - *b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().max(1e-30);
    num / den
}

/// Assert `g` (GPU) is within `limit` NMSE of `c` (reference).
pub fn check(name: &str, g: &Tensor, c: &Tensor, limit: f64) -> Result<()> {
    assert_eq!(g.shape(), c.shape(), "{name}");
    let e = nmse(&g.to_f32_vec()?, &c.to_f32_vec()?);
    eprintln!("{name:<48} nmse {e:.3e} (limit {limit:.0e})");
    assert!(e <= limit, "{name}: nmse {e:e} > {limit:e}");
    Ok(())
}

/// f32: the given limit (1e-10 for exact-order ops, looser for reductions); half types: their unit roundoff
/// squared, with headroom (one rounding of the output dominates).
pub fn lim(dt: DType, f32_limit: f64) -> f64 {
    match dt {
        DType::F32 => f32_limit,
        DType::F16 => 2e-6,
        _ => 1e-4,
    }
}
