//! `SD3Transformer2DModel`, the MM-DiT of SD3 / SD3.5 (diffusers `models/transformers/transformer_sd3.py`),
//! one definition for SD3-medium, SD3.5-medium (qk RMS norm, dual-attention layers) and SD3.5-large.
//!
//! Forward (reference §1.4): patch embed + cropped positional table → temb = timestep MLP(sinusoid(t)) +
//! text MLP(pooled) → context_embedder → joint blocks (image tokens first in the joint attention) → norm_out
//! (AdaLN-continuous, scale then shift) → proj_out → unpatchify.

pub mod attention;
pub mod block;
pub mod embeddings;
pub mod named_parameters;
pub mod parallel;
pub mod params;
pub mod train;

use crate::weights::{read_config, Weights, WeightsError};
use block::{AdaLayerNormContinuous, BlockSpec, JointTransformerBlock};
use embeddings::{PatchEmbed, TimeTextEmbed, TIMESTEP_CHANNELS};
use parallel::{Comm, Shard};
use params::{Linear, Params};
use sd3_core::{Backend, DType, Tensor};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum MmditError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("transformer config: {0}")]
    Config(String),
    #[error("transformer input: {0}")]
    Input(String),
    #[error(transparent)]
    Core(#[from] sd3_core::Error),
    #[error("tensor parallelism: {0}")]
    Parallel(String),
}

/// `transformer/config.json` (diffusers' constructor defaults where a key is absent).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Sd3TransformerConfig {
    #[serde(default = "d128")]
    pub sample_size: usize,
    #[serde(default = "d2")]
    pub patch_size: usize,
    #[serde(default = "d16")]
    pub in_channels: usize,
    #[serde(default = "d18")]
    pub num_layers: usize,
    #[serde(default = "d64")]
    pub attention_head_dim: usize,
    #[serde(default = "d18")]
    pub num_attention_heads: usize,
    #[serde(default = "d4096")]
    pub joint_attention_dim: usize,
    #[serde(default = "d1152")]
    pub caption_projection_dim: usize,
    #[serde(default = "d2048")]
    pub pooled_projection_dim: usize,
    #[serde(default = "d16")]
    pub out_channels: usize,
    #[serde(default = "d96")]
    pub pos_embed_max_size: usize,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub dual_attention_layers: Vec<usize>,
    #[serde(default)]
    pub qk_norm: Option<String>,
}

fn d2() -> usize {
    2
}
fn d16() -> usize {
    16
}
fn d18() -> usize {
    18
}
fn d64() -> usize {
    64
}
fn d96() -> usize {
    96
}
fn d128() -> usize {
    128
}
fn d1152() -> usize {
    1152
}
fn d2048() -> usize {
    2048
}
fn d4096() -> usize {
    4096
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<usize>, D::Error> {
    Ok(Option::<Vec<usize>>::deserialize(d)?.unwrap_or_default())
}

impl Sd3TransformerConfig {
    pub fn load(dir: &Path) -> Result<Self, MmditError> {
        let cfg: Sd3TransformerConfig = read_config(dir)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// SD3-medium as published (reference §1.3).
    pub fn sd3_medium() -> Self {
        Sd3TransformerConfig {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: 16,
            pos_embed_max_size: 192,
            dual_attention_layers: vec![],
            qk_norm: None,
        }
    }

    /// SD3.5-medium: qk RMS norm, dual attention in blocks 0..=12, positional table 384.
    pub fn sd35_medium() -> Self {
        Sd3TransformerConfig {
            pos_embed_max_size: 384,
            dual_attention_layers: (0..=12).collect(),
            qk_norm: Some("rms_norm".into()),
            ..Self::sd3_medium()
        }
    }

    /// SD3.5-large: 38 layers × 38 heads (D = 2432), qk RMS norm.
    pub fn sd35_large() -> Self {
        Sd3TransformerConfig {
            num_layers: 38,
            num_attention_heads: 38,
            caption_projection_dim: 2432,
            qk_norm: Some("rms_norm".into()),
            ..Self::sd3_medium()
        }
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn has_qk_norm(&self) -> bool {
        self.qk_norm.is_some()
    }

    fn validate(&self) -> Result<(), MmditError> {
        let bad = |m: String| Err(MmditError::Config(m));
        if self.caption_projection_dim != self.inner_dim() {
            return bad(format!(
                "caption_projection_dim {} must equal num_attention_heads·attention_head_dim = {}",
                self.caption_projection_dim,
                self.inner_dim()
            ));
        }
        if let Some(q) = &self.qk_norm {
            if q != "rms_norm" {
                return bad(format!("qk_norm `{q}` is not supported (only \"rms_norm\" or null)"));
            }
        }
        if let Some(&l) = self.dual_attention_layers.iter().find(|&&l| l >= self.num_layers) {
            return bad(format!("dual_attention_layers names layer {l} of {}", self.num_layers));
        }
        if self.patch_size == 0 || self.num_layers == 0 || self.attention_head_dim == 0 {
            return bad("patch_size, num_layers and attention_head_dim must be positive".into());
        }
        Ok(())
    }

    /// Every tensor a diffusers checkpoint of this config holds, with its shape (reference §1.8).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.inner_dim();
        let (p, hd) = (self.patch_size, self.attention_head_dim);
        let m = self.pos_embed_max_size;
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let mut lin = |name: &str, inp: usize, o: usize| {
            out.push((format!("{name}.weight"), vec![o, inp]));
            out.push((format!("{name}.bias"), vec![o]));
        };
        lin("time_text_embed.timestep_embedder.linear_1", TIMESTEP_CHANNELS, d);
        lin("time_text_embed.timestep_embedder.linear_2", d, d);
        lin("time_text_embed.text_embedder.linear_1", self.pooled_projection_dim, d);
        lin("time_text_embed.text_embedder.linear_2", d, d);
        lin("context_embedder", self.joint_attention_dim, self.caption_projection_dim);
        for i in 0..self.num_layers {
            let b = format!("transformer_blocks.{i}");
            let last = i + 1 == self.num_layers;
            let dual = self.dual_attention_layers.contains(&i);
            lin(&format!("{b}.norm1.linear"), d, if dual { 9 } else { 6 } * d);
            lin(&format!("{b}.norm1_context.linear"), d, if last { 2 } else { 6 } * d);
            for n in ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"] {
                lin(&format!("{b}.attn.{n}"), d, d);
            }
            if !last {
                lin(&format!("{b}.attn.to_add_out"), d, d);
            }
            if dual {
                for n in ["to_q", "to_k", "to_v", "to_out.0"] {
                    lin(&format!("{b}.attn2.{n}"), d, d);
                }
            }
            lin(&format!("{b}.ff.net.0.proj"), d, 4 * d);
            lin(&format!("{b}.ff.net.2"), 4 * d, d);
            if !last {
                lin(&format!("{b}.ff_context.net.0.proj"), d, 4 * d);
                lin(&format!("{b}.ff_context.net.2"), 4 * d, d);
            }
        }
        lin("norm_out.linear", d, 2 * d);
        lin("proj_out", d, p * p * self.out_channels);
        out.push(("pos_embed.proj.weight".into(), vec![d, self.in_channels, p, p]));
        out.push(("pos_embed.proj.bias".into(), vec![d]));
        out.push(("pos_embed.pos_embed".into(), vec![1, m * m, d]));
        if self.has_qk_norm() {
            for i in 0..self.num_layers {
                for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
                    out.push((format!("transformer_blocks.{i}.attn.{n}.weight"), vec![hd]));
                }
                if self.dual_attention_layers.contains(&i) {
                    for n in ["norm_q", "norm_k"] {
                        out.push((format!("transformer_blocks.{i}.attn2.{n}.weight"), vec![hd]));
                    }
                }
            }
        }
        out
    }

    /// Reconcile the config with what the weights hold, as diffusers' conversion derives the variant: the
    /// positional table size from `pos_embed.pos_embed`, qk norm from `norm_q` keys, dual layers from `attn2.` keys.
    /// A disagreement is an error naming both.
    pub fn check_against(&self, w: &Weights) -> Result<(), MmditError> {
        let d = self.inner_dim();
        if let Some(shape) = w.shape("pos_embed.pos_embed") {
            let m = (shape.get(1).copied().unwrap_or(0) as f64).sqrt().round() as usize;
            if shape.len() == 3 && m * m == shape[1] && shape[2] == d && m != self.pos_embed_max_size {
                return Err(MmditError::Config(format!(
                    "pos_embed_max_size is {} in config.json but pos_embed.pos_embed {:?} in {} is a {m}x{m} table",
                    self.pos_embed_max_size,
                    shape,
                    w.dir().display()
                )));
            }
        }
        let has_qk = w.contains("transformer_blocks.0.attn.norm_q.weight");
        if has_qk != self.has_qk_norm() {
            return Err(MmditError::Config(format!(
                "config.json says qk_norm {:?} but the weights in {} {} norm_q tensors",
                self.qk_norm,
                w.dir().display(),
                if has_qk { "have" } else { "have no" }
            )));
        }
        for i in 0..self.num_layers {
            let has_attn2 = w.contains(&format!("transformer_blocks.{i}.attn2.to_q.weight"));
            if has_attn2 != self.dual_attention_layers.contains(&i) {
                return Err(MmditError::Config(format!(
                    "config.json dual_attention_layers {:?} disagrees with the weights in {}: block {i} {} attn2",
                    self.dual_attention_layers,
                    w.dir().display(),
                    if has_attn2 { "has" } else { "has no" }
                )));
            }
        }
        Ok(())
    }
}

/// The MM-DiT with its weights on a backend.
pub struct Sd3Transformer2DModel {
    pub config: Sd3TransformerConfig,
    pos_embed: PatchEmbed,
    time_text_embed: TimeTextEmbed,
    context_embedder: Linear,
    blocks: Vec<JointTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
    dtype: DType,
}

impl Sd3Transformer2DModel {
    /// Load `dir` (the `transformer/` folder): config, then every tensor checked by name and shape.
    pub fn load(dir: &Path, backend: &Backend, dtype: DType) -> Result<Self, MmditError> {
        let weights = Weights::open(dir)?;
        Self::from_weights(&weights, Sd3TransformerConfig::load(dir)?, backend, dtype)
    }

    /// Build from already opened weights (e.g. with LoRA deltas registered).
    pub fn from_weights(
        w: &Weights,
        config: Sd3TransformerConfig,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        Self::from_weights_shard(w, config, Shard::WHOLE, backend, dtype)
    }

    /// A tensor-parallel rank's slice of the model ([`parallel`]), from already opened weights.
    pub fn from_weights_shard(
        w: &Weights,
        config: Sd3TransformerConfig,
        shard: Shard,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        config.validate()?;
        config.check_against(w)?;
        let expected = config.expected_tensors();
        for (name, shape) in &expected {
            if !w.contains(name) {
                let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
                return Err(w.missing_among(name, w.names().filter(|n| !known.contains(n))).into());
            }
            w.check_shape(name, shape)?;
        }
        Self::build(&Params::Weights(w), config, shard, backend, dtype)
    }

    /// Seeded random weights for a config: benchmarks and tests that need no files.
    pub fn random(
        config: Sd3TransformerConfig,
        seed: u64,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        Self::random_shard(config, seed, Shard::WHOLE, backend, dtype)
    }

    /// A tensor-parallel rank's slice of [`Sd3Transformer2DModel::random`] (the same values, sliced).
    pub fn random_shard(
        config: Sd3TransformerConfig,
        seed: u64,
        shard: Shard,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        config.validate()?;
        Self::build(&Params::Random { seed, scale: 0.02 }, config, shard, backend, dtype)
    }

    fn build(
        p: &Params,
        config: Sd3TransformerConfig,
        shard: Shard,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        let c = &config;
        let d = c.inner_dim();
        parallel::check_divides(c.num_attention_heads, 4 * d, shard.size)?;
        if shard.rank >= shard.size {
            return Err(MmditError::Config(format!("tensor-parallel rank {} of {}", shard.rank, shard.size)));
        }
        let blocks = (0..c.num_layers)
            .map(|i| {
                let spec = BlockSpec {
                    heads: c.num_attention_heads,
                    head_dim: c.attention_head_dim,
                    qk_norm: c.has_qk_norm(),
                    dual: c.dual_attention_layers.contains(&i),
                    last: i + 1 == c.num_layers,
                    shard,
                };
                JointTransformerBlock::load(p, &format!("transformer_blocks.{i}"), spec, backend, dtype)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Sd3Transformer2DModel {
            pos_embed: PatchEmbed::load(p, c.in_channels, d, c.patch_size, c.pos_embed_max_size, backend, dtype)?,
            time_text_embed: TimeTextEmbed::load(p, c.pooled_projection_dim, d, backend, dtype)?,
            context_embedder: Linear::load(
                p,
                "context_embedder",
                c.joint_attention_dim,
                c.caption_projection_dim,
                backend,
                dtype,
            )?,
            blocks,
            norm_out: AdaLayerNormContinuous::load(p, "norm_out", d, backend, dtype)?,
            proj_out: Linear::load(p, "proj_out", d, c.patch_size * c.patch_size * c.out_channels, backend, dtype)?,
            dtype,
            config,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Error unless a latent of `height×width` fits (multiple of the patch size, within the positional table).
    pub fn check_latent_size(&self, height: usize, width: usize) -> Result<(), MmditError> {
        self.pos_embed.grid(height, width).map(|_| ())
    }

    /// One call: `hidden_states [B, C, H, W]`, `encoder_hidden_states [B, S, joint_dim]`, `pooled [B, P]`,
    /// `timesteps` (σ·1000, one per batch row). Blocks listed in `skip_layers` are skipped entirely.
    /// Returns `[B, out_channels, H, W]` in the model dtype.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled: &Tensor,
        timesteps: &[f32],
        skip_layers: &[usize],
    ) -> Result<Tensor, MmditError> {
        self.forward_in_group(hidden_states, encoder_hidden_states, pooled, timesteps, skip_layers, &Comm::WHOLE)
    }

    /// [`Sd3Transformer2DModel::forward`] on a tensor-parallel rank: every rank of the group calls it with the same
    /// inputs (on its own device), and each gets the whole output.
    pub fn forward_in_group(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled: &Tensor,
        timesteps: &[f32],
        skip_layers: &[usize],
        comm: &Comm,
    ) -> Result<Tensor, MmditError> {
        let c = &self.config;
        let b = hidden_states.dim(0);
        self.check_inputs(hidden_states, encoder_hidden_states, pooled, timesteps)?;
        let (h, w) = self.pos_embed.grid(hidden_states.dim(2), hidden_states.dim(3))?;
        let mut x = self.pos_embed.forward(&hidden_states.to_dtype(self.dtype)?)?;
        let temb = self.time_text_embed.forward(timesteps, &pooled.to_dtype(self.dtype)?)?;
        let temb_silu = temb.silu()?;
        let mut ctx = self.context_embedder.forward(&encoder_hidden_states.to_dtype(self.dtype)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            if skip_layers.contains(&i) {
                continue;
            }
            let (new_ctx, new_x) = block.forward(&x, &ctx, &temb_silu, comm)?;
            x = new_x;
            if let Some(nc) = new_ctx {
                ctx = nc;
            }
        }
        let x = self.proj_out.forward(&self.norm_out.forward(&x, &temb_silu)?)?; // [B, h·w, p·p·C]
                                                                                 // Unpatchify: [B, h, w, p, p, C] → [B, C, h, p, w, p] → [B, C, h·p, w·p].
        let (p, oc) = (c.patch_size, c.out_channels);
        let x = x.reshape(&[b, h, w, p, p, oc])?.permute(&[0, 5, 1, 3, 2, 4])?;
        Ok(x.reshape(&[b, oc, h * p, w * p])?)
    }

    fn check_inputs(&self, x: &Tensor, ctx: &Tensor, pooled: &Tensor, t: &[f32]) -> Result<(), MmditError> {
        let c = &self.config;
        let b = x.dim(0);
        let bad = |m: String| Err(MmditError::Input(m));
        if x.rank() != 4 || x.dim(1) != c.in_channels {
            return bad(format!("hidden_states {:?}, expected [B, {}, H, W]", x.shape(), c.in_channels));
        }
        if ctx.rank() != 3 || ctx.dim(0) != b || ctx.dim(2) != c.joint_attention_dim {
            return bad(format!(
                "encoder_hidden_states {:?}, expected [{b}, S, {}]",
                ctx.shape(),
                c.joint_attention_dim
            ));
        }
        if pooled.shape() != [b, c.pooled_projection_dim] {
            return bad(format!(
                "pooled_projections {:?}, expected [{b}, {}]",
                pooled.shape(),
                c.pooled_projection_dim
            ));
        }
        if t.len() != b {
            return bad(format!("{} timesteps for a batch of {b}", t.len()));
        }
        Ok(())
    }
}
