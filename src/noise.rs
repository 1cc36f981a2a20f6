//! Initial noise, drawn on the host so one `--seed` gives the same latents on every backend, or read from a
//! safetensors file (`--init-noise`, tensor `latents`) to reproduce another implementation's run exactly.
//!
//! The generator (documented in `docs/pipeline.md`): **Philox4x32-10** (Salmon et al., SC'11; the counter-based
//! generator of cuRAND and of `torch` on CUDA) keyed by the 64-bit seed (`key = [seed & 0xffffffff, seed >> 32]`),
//! counter `[j, 0, 0, 0]` for block `j`. Each block gives four uniform `u32`s `r0..r3`; these become two pairs of
//! standard normals by Box–Muller in float64: `u1 = (r0 + 1)/2³²` ∈ (0, 1], `u2 = r1/2³²`,
//! `z0 = √(−2 ln u1)·cos(2π u2)`, `z1 = √(−2 ln u1)·sin(2π u2)` (likewise `r2, r3` → `z2, z3`), rounded to f32.
//! Element `k` of the row-major latent tensor is `z_(k mod 4)` of block `k div 4`. Image `n` of a batch uses
//! seed `seed + n`, so each image can be regenerated alone.

// Errors carry the file; built once per failure, so their size does not matter.
#![allow(clippy::result_large_err)]

use crate::weights::{Weights, WeightsError};
use sd3_core::{Backend, DType, Tensor};
use std::path::Path;

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(PHILOX_W0), k[1].wrapping_add(PHILOX_W1)];
        }
        let p0 = (PHILOX_M0 as u64) * (c[0] as u64);
        let p1 = (PHILOX_M1 as u64) * (c[2] as u64);
        c = [((p1 >> 32) as u32) ^ c[1] ^ k[0], p1 as u32, ((p0 >> 32) as u32) ^ c[3] ^ k[1], p0 as u32];
    }
    c
}

/// `n` standard normal f32 values from `seed` (the stream described in the module docs).
pub fn standard_normal(seed: u64, n: usize) -> Vec<f32> {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut out = Vec::with_capacity(n + 3);
    let mut block: u64 = 0;
    while out.len() < n {
        let r = philox4x32_10([block as u32, (block >> 32) as u32, 0, 0], key);
        for pair in [[r[0], r[1]], [r[2], r[3]]] {
            let u1 = (pair[0] as f64 + 1.0) / 4294967296.0;
            let u2 = pair[1] as f64 / 4294967296.0;
            let radius = (-2.0 * u1.ln()).sqrt();
            let angle = 2.0 * std::f64::consts::PI * u2;
            out.push((radius * angle.cos()) as f32);
            out.push((radius * angle.sin()) as f32);
        }
        block += 1;
    }
    out.truncate(n);
    out
}

/// Latents `[batch, channels, h, w]` (f32) where image `n` is drawn with seed `seed + n`.
pub fn seeded_latents(seed: u64, shape: [usize; 4], backend: &Backend) -> sd3_core::Result<Tensor> {
    let per_image = shape[1] * shape[2] * shape[3];
    let mut values = Vec::with_capacity(shape[0] * per_image);
    for n in 0..shape[0] {
        values.extend(standard_normal(seed.wrapping_add(n as u64), per_image));
    }
    backend.from_f32(&values, &shape, DType::F32)
}

#[derive(Debug, thiserror::Error)]
pub enum InitNoiseError {
    #[error("--init-noise {path}: {source}")]
    Read { path: String, source: WeightsError },
    #[error("--init-noise {path}: expected tensor `latents` of shape {expected:?}, found {found:?}")]
    Shape { path: String, expected: Vec<usize>, found: Vec<usize> },
}

/// Read tensor `latents` from a safetensors file; it must have shape `[1 or batch, channels, h, w]`.
/// A single latent is used for every image of the batch.
pub fn load_init_noise(path: &Path, shape: [usize; 4], backend: &Backend) -> Result<Tensor, InitNoiseError> {
    let p = path.display().to_string();
    let read = |source| InitNoiseError::Read { path: p.clone(), source };
    let w = Weights::open_file(path).map_err(read)?;
    let found = w.shape("latents").ok_or_else(|| read(w.missing("latents")))?;
    let fits = found.len() == 4 && found[1..] == shape[1..] && (found[0] == shape[0] || found[0] == 1);
    if !fits {
        return Err(InitNoiseError::Shape { path: p, expected: shape.to_vec(), found });
    }
    let t = w.tensor("latents", backend, DType::F32).map_err(read)?;
    if found[0] == shape[0] {
        return Ok(t);
    }
    let many: Vec<&Tensor> = (0..shape[0]).map(|_| &t).collect();
    Tensor::cat(&many, 0).map_err(|e| read(WeightsError::Upload { name: "latents".into(), source: e }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answer() {
        // Known-answer vectors of Random123 (kat_vectors: philox4x32 10 rounds).
        assert_eq!(philox4x32_10([0, 0, 0, 0], [0, 0]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(philox4x32_10([0xffffffff; 4], [0xffffffff; 2]), [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]);
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn normals_have_unit_moments_and_depend_on_seed() {
        let z = standard_normal(42, 100_000);
        let mean = z.iter().map(|&v| v as f64).sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / z.len() as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "mean {mean} var {var}");
        assert_eq!(standard_normal(42, 10), z[..10]);
        assert_ne!(standard_normal(43, 10), z[..10]);
    }
}
