//! Embeddings of the MM-DiT, after diffusers' `models/embeddings.py`: `PatchEmbed` (with the centre-cropped
//! stored positional table), `Timesteps` + `TimestepEmbedding`, `PixArtAlphaTextProjection`.

use super::params::{Linear, Params};
use super::MmditError;
use sd3_core::{Backend, DType, Tensor};

/// `PatchEmbed`: conv p×p stride p, flatten to tokens (index = row·w + col), plus the cropped `pos_embed`.
pub struct PatchEmbed {
    pub(super) proj_weight: Tensor,
    pub(super) proj_bias: Tensor,
    /// `pos_embed.pos_embed` `[1, M·M, D]`, uploaded once.
    pos_embed: Tensor,
    pub patch_size: usize,
    pub max_size: usize,
    pub(super) dim: usize,
}

impl PatchEmbed {
    pub fn load(
        p: &Params,
        in_channels: usize,
        dim: usize,
        patch: usize,
        max_size: usize,
        backend: &Backend,
        dtype: DType,
    ) -> Result<PatchEmbed, MmditError> {
        Ok(PatchEmbed {
            proj_weight: p.tensor("pos_embed.proj.weight", &[dim, in_channels, patch, patch], backend, dtype)?,
            proj_bias: p.tensor("pos_embed.proj.bias", &[dim], backend, dtype)?,
            pos_embed: p.tensor("pos_embed.pos_embed", &[1, max_size * max_size, dim], backend, dtype)?,
            patch_size: patch,
            max_size,
            dim,
        })
    }

    /// Patch grid `(h, w)` of a latent `H×W`, or an error naming the limit it breaks.
    #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` needs Rust 1.87; the workspace supports 1.85
    pub fn grid(&self, height: usize, width: usize) -> Result<(usize, usize), MmditError> {
        let p = self.patch_size;
        if height % p != 0 || width % p != 0 || height == 0 || width == 0 {
            return Err(MmditError::Input(format!(
                "latent size {height}x{width} is not a positive multiple of the patch size {p} \
                 (image height and width must be multiples of {})",
                8 * p
            )));
        }
        let (h, w) = (height / p, width / p);
        if h > self.max_size || w > self.max_size {
            return Err(MmditError::Input(format!(
                "latent size {height}x{width} gives {h}x{w} patches, beyond the positional table of \
                 {m}x{m} patches (pos_embed_max_size {m}; largest image {px}x{px} pixels)",
                m = self.max_size,
                px = self.max_size * p * 8
            )));
        }
        Ok((h, w))
    }

    /// `x [B, C, H, W]` → tokens `[B, h·w, D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, MmditError> {
        let (b, height, width) = (x.dim(0), x.dim(2), x.dim(3));
        let (h, w) = self.grid(height, width)?;
        let y = x.conv2d(&self.proj_weight, Some(&self.proj_bias), self.patch_size, 0)?; // [B, D, h, w]
        let tokens = y.reshape(&[b, self.dim, h * w])?.permute(&[0, 2, 1])?; // view [B, N, D]
        Ok(tokens.add(&self.cropped_pos_embed(h, w)?)?)
    }

    /// The centre crop `[1, h·w, D]` of the `M×M` table: `top = (M-h)/2`, `left = (M-w)/2`.
    pub fn cropped_pos_embed(&self, h: usize, w: usize) -> Result<Tensor, MmditError> {
        let m = self.max_size;
        let (top, left) = ((m - h) / 2, (m - w) / 2);
        let table = self.pos_embed.reshape(&[m, m, self.dim])?;
        Ok(table.narrow(0, top, h)?.narrow(1, left, w)?.reshape(&[1, h * w, self.dim])?)
    }
}

/// diffusers' `get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)`, on the host in f32:
/// `f_k = exp(-ln(10000)·k/128)`, `[cos(t·f_k), sin(t·f_k)]` (cos first). Returns `[B·256]` row-major.
pub fn timestep_sinusoid(timesteps: &[f32], channels: usize) -> Vec<f32> {
    let half = channels / 2;
    let freqs: Vec<f32> = (0..half).map(|k| ((-(10000f64.ln()) as f32) * k as f32 / half as f32).exp()).collect();
    let mut out = Vec::with_capacity(timesteps.len() * channels);
    for &t in timesteps {
        out.extend(freqs.iter().map(|f| (t * f).cos()));
        out.extend(freqs.iter().map(|f| (t * f).sin()));
    }
    out
}

/// `linear_1 → SiLU → linear_2`: both `TimestepEmbedding` and `PixArtAlphaTextProjection(act_fn="silu")`.
pub struct Mlp2 {
    pub(super) linear_1: Linear,
    pub(super) linear_2: Linear,
}

impl Mlp2 {
    pub fn load(
        p: &Params,
        name: &str,
        inp: usize,
        dim: usize,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Mlp2, MmditError> {
        Ok(Mlp2 {
            linear_1: Linear::load(p, &format!("{name}.linear_1"), inp, dim, backend, dtype)?,
            linear_2: Linear::load(p, &format!("{name}.linear_2"), dim, dim, backend, dtype)?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// `CombinedTimestepTextProjEmbeddings`: `temb = timestep_embedder(sinusoid(t)) + text_embedder(pooled)`.
pub struct TimeTextEmbed {
    pub(super) timestep_embedder: Mlp2,
    pub(super) text_embedder: Mlp2,
}

pub const TIMESTEP_CHANNELS: usize = 256;

impl TimeTextEmbed {
    pub fn load(
        p: &Params,
        pooled_dim: usize,
        dim: usize,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        Ok(TimeTextEmbed {
            timestep_embedder: Mlp2::load(
                p,
                "time_text_embed.timestep_embedder",
                TIMESTEP_CHANNELS,
                dim,
                backend,
                dtype,
            )?,
            text_embedder: Mlp2::load(p, "time_text_embed.text_embedder", pooled_dim, dim, backend, dtype)?,
        })
    }

    /// `timesteps` (one per batch row, σ·1000) and `pooled [B, P]` → `temb [B, D]`.
    pub fn forward(&self, timesteps: &[f32], pooled: &Tensor) -> sd3_core::Result<Tensor> {
        let sin = timestep_sinusoid(timesteps, TIMESTEP_CHANNELS);
        // Sinusoid computed in f32, then cast to the model dtype as diffusers does before `timestep_embedder`.
        let sin = pooled.backend().from_f32(&sin, &[timesteps.len(), TIMESTEP_CHANNELS], pooled.dtype())?;
        self.timestep_embedder.forward(&sin)?.add(&self.text_embedder.forward(pooled)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinusoid_matches_numpy_values() {
        // Reference values from diffusers_sd3.md §1.4 (numpy f32, t = 1000).
        let e = timestep_sinusoid(&[1000.0], 256);
        for (got, want) in e[0..3].iter().zip([0.56238, 0.78963, 0.43998]) {
            assert!((got - want).abs() < 2e-4, "{got} vs {want}");
        }
        for (got, want) in e[128..131].iter().zip([0.82688, 0.61359, -0.89801]) {
            assert!((got - want).abs() < 2e-4, "{got} vs {want}");
        }
    }
}
