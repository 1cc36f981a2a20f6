//! Where the MM-DiT's parameters come from: a diffusers [`Weights`] folder, or seeded random values (benchmarks,
//! shape tests) so a model can be built from a config alone.

use crate::weights::{Weights, WeightsError};
use sd3_core::{Backend, DType, Tensor, UnaryOp};

pub enum Params<'a> {
    Weights(&'a Weights),
    /// Uniform values in `[-scale, scale)` from a per-name seeded generator (norm weights are 1).
    Random {
        seed: u64,
        scale: f32,
    },
}

impl Params<'_> {
    /// The tensor `name`, checked to have `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize], backend: &Backend, dtype: DType) -> Result<Tensor, WeightsError> {
        match self {
            Params::Weights(w) => w.tensor_checked(name, shape, backend, dtype),
            Params::Random { .. } => {
                let values = self.host(name, shape)?;
                backend
                    .from_f32(&values, shape, dtype)
                    .map_err(|source| WeightsError::Upload { name: name.into(), source })
            }
        }
    }

    /// The values of `name` on the host as f32, checked to have `shape`.
    pub fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightsError> {
        match self {
            Params::Weights(w) => {
                w.check_shape(name, shape)?;
                w.host_f32(name)
            }
            Params::Random { seed, scale } => {
                let n: usize = shape.iter().product();
                if name.contains("norm_") && name.ends_with(".weight") {
                    return Ok(vec![1.0; n]);
                }
                let mut state = seed ^ fnv1a(name.as_bytes());
                Ok((0..n).map(|_| (splitmix_unit(&mut state) * 2.0 - 1.0) * scale).collect())
            }
        }
    }

    /// Whether a tensor exists (random parameters have every tensor asked for).
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Params::Weights(w) => w.contains(name),
            Params::Random { .. } => true,
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// splitmix64, mapped to [0, 1).
fn splitmix_unit(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9e3779b97f4a7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// `nn.Linear`: weight `[out, in]`, bias `[out]`.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(
        p: &Params,
        name: &str,
        inp: usize,
        out: usize,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Linear, WeightsError> {
        Ok(Linear {
            weight: p.tensor(&format!("{name}.weight"), &[out, inp], backend, dtype)?,
            bias: Some(p.tensor(&format!("{name}.bias"), &[out], backend, dtype)?),
        })
    }

    /// Several linears with the same input fused into one (`[Σout, in]`), e.g. `to_q`, `to_k`, `to_v`.
    /// Concatenated on the host so a LoRA delta registered for each part is merged first.
    pub fn load_fused(
        p: &Params,
        names: &[String],
        inp: usize,
        out: usize,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Linear, WeightsError> {
        Self::load_fused_rows(p, names, inp, out, 0..out, backend, dtype)
    }

    /// [`Linear::load_fused`] keeping output features `rows` of each part (a tensor-parallel rank's slice).
    pub fn load_fused_rows(
        p: &Params,
        names: &[String],
        inp: usize,
        out: usize,
        rows: std::ops::Range<usize>,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Linear, WeightsError> {
        let mut w = Vec::with_capacity(names.len() * rows.len() * inp);
        let mut b = Vec::with_capacity(names.len() * rows.len());
        for name in names {
            w.extend_from_slice(&p.host(&format!("{name}.weight"), &[out, inp])?[rows.start * inp..rows.end * inp]);
            b.extend_from_slice(&p.host(&format!("{name}.bias"), &[out])?[rows.clone()]);
        }
        let upload = |v: &[f32], shape: &[usize]| {
            backend.from_f32(v, shape, dtype).map_err(|source| WeightsError::Upload { name: names.join("+"), source })
        };
        let n = names.len() * rows.len();
        Ok(Linear { weight: upload(&w, &[n, inp])?, bias: Some(upload(&b, &[n])?) })
    }

    pub fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        x.linear(&self.weight, self.bias.as_ref())
    }

    /// `act(linear(x))`, the activation fused into the matmul where the device can.
    pub fn forward_act(&self, x: &Tensor, act: UnaryOp) -> sd3_core::Result<Tensor> {
        x.linear_act(&self.weight, self.bias.as_ref(), Some(act))
    }

    /// `linear(x)` written into `out` (`[.., out]`, any strides: e.g. rows of a bigger buffer).
    pub fn forward_into(&self, x: &Tensor, out: &Tensor) -> sd3_core::Result<()> {
        x.linear_into(&self.weight, self.bias.as_ref(), None, out)
    }
}
