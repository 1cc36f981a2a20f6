//! The decoder half of diffusers' `AutoencoderKL` (the encoder is `vae_encoder.rs`)
//! (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/autoencoder_kl.py>,
//! `Decoder` in `autoencoders/vae.py`, `ResnetBlock2D` in `resnet.py`, `UNetMidBlock2D` / `UpDecoderBlock2D` in
//! `unets/unet_2d_blocks.py`, `Upsample2D` in `upsampling.py`, the mid-block `Attention` in `attention_processor.py`).
//!
//! Memory: at 1024² the last up block holds 128-channel 1024×1024 activations (512 MiB each in f32), so each
//! forward reassigns one running tensor instead of binding new names, dropping every intermediate as soon as the
//! next one exists.

use super::layers::{config_error, Conv2d, GroupNorm, Linear, Loader};
use crate::weights::{read_config, Weights};
use anyhow::Context;
use sd3_core::{AttentionParams, DType, Tensor};
use serde::Deserialize;
use std::path::Path;

/// diffusers' GroupNorm epsilon everywhere in the decoder (`resnet_eps`, `conv_norm_out`).
pub(super) const EPS: f32 = 1e-6;

/// `AutoencoderKL`'s config, the fields the decoder reads (defaults are diffusers').
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f32,
    #[serde(default = "default_out_channels")]
    pub out_channels: usize,
    /// `null` in configs without one (SD1/SDXL): no shift.
    #[serde(default)]
    pub shift_factor: Option<f32>,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
}

fn default_in_channels() -> usize {
    3
}

fn default_out_channels() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_act_fn() -> String {
    "silu".into()
}

/// `ResnetBlock2D` without time embedding: `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`.
pub(super) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub(super) fn load(l: &Loader, prefix: &str, groups: usize, in_ch: usize, out_ch: usize) -> anyhow::Result<Self> {
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(l, &format!("{prefix}.norm1"), groups, in_ch, EPS)?,
            conv1: Conv2d::load(l, &format!("{prefix}.conv1"), in_ch, out_ch, 3)?,
            norm2: GroupNorm::load(l, &format!("{prefix}.norm2"), groups, out_ch, EPS)?,
            conv2: Conv2d::load(l, &format!("{prefix}.conv2"), out_ch, out_ch, 3)?,
            conv_shortcut: if in_ch != out_ch {
                Some(Conv2d::load(l, &format!("{prefix}.conv_shortcut"), in_ch, out_ch, 1)?)
            } else {
                None
            },
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        let mut h = self.norm1.forward(x)?;
        h = h.silu()?;
        h = self.conv1.forward(&h)?;
        h = self.norm2.forward(&h)?;
        h = h.silu()?;
        h = self.conv2.forward(&h)?;
        match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?.add(&h),
            None => x.add(&h),
        }
    }
}

/// The mid-block `Attention`: group norm, one head over the H·W tokens (head dim = channels), residual.
pub(super) struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    pub(super) fn load(l: &Loader, prefix: &str, groups: usize, ch: usize) -> anyhow::Result<Self> {
        Ok(AttentionBlock {
            group_norm: GroupNorm::load(l, &format!("{prefix}.group_norm"), groups, ch, EPS)?,
            to_q: Linear::load(l, &format!("{prefix}.to_q"), ch, ch, true)?,
            to_k: Linear::load(l, &format!("{prefix}.to_k"), ch, ch, true)?,
            to_v: Linear::load(l, &format!("{prefix}.to_v"), ch, ch, true)?,
            to_out: Linear::load(l, &format!("{prefix}.to_out.0"), ch, ch, true)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        let (b, c, hh, ww) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        // [B, C, H, W] → tokens [B, H·W, C] (group norm is per channel group, so it can run before the transpose).
        let tokens = self.group_norm.forward(x)?.reshape(&[b, c, hh * ww])?.transpose(1, 2)?.contiguous()?;
        let heads = |t: Tensor| t.unsqueeze(1); // [B, 1, H·W, C]
        let q = heads(self.to_q.forward(&tokens)?)?;
        let k = heads(self.to_k.forward(&tokens)?)?;
        let v = heads(self.to_v.forward(&tokens)?)?;
        drop(tokens);
        let o = Tensor::attention(&q, &k, &v, &AttentionParams::new((c as f32).powf(-0.5)))?;
        drop((q, k, v));
        let o = self.to_out.forward(&o.squeeze(1)?)?;
        let o = o.transpose(1, 2)?.reshape(&[b, c, hh, ww])?;
        x.add(&o)
    }
}

/// `UpDecoderBlock2D`: resnets, then (except in the last block) `Upsample2D` (nearest ×2, 3×3 conv).
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Conv2d>,
}

/// `AutoencoderKL`, decoder only.
pub struct AutoencoderKL {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: Option<AttentionBlock>,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl AutoencoderKL {
    /// Load the decoder from a `vae` folder (`config.json` + safetensors), in `dtype`.
    pub fn load(dir: &Path, backend: &sd3_core::Backend, dtype: DType) -> anyhow::Result<Self> {
        let weights = Weights::open(dir)?;
        Self::load_with_weights(dir, &weights, backend, dtype)
    }

    /// [`Self::load`] with the tensors taken from `weights` (opened from `dir`, possibly with LoRA deltas added);
    /// the config still comes from `dir/config.json`.
    pub fn load_with_weights(
        dir: &Path,
        weights: &Weights,
        backend: &sd3_core::Backend,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        let config: VaeConfig = read_config(dir)?;
        config.check().map_err(|reason| config_error(dir, reason))?;
        Self::build(&config, &Loader::new(weights, backend, dtype))
            .with_context(|| format!("loading the VAE decoder from {}", dir.display()))
    }

    /// Every tensor (name, shape) the loader reads for `config`, in loading order: derived by running the
    /// loading code without weights.
    pub fn expected_tensors(config: &VaeConfig) -> anyhow::Result<Vec<(String, Vec<usize>)>> {
        let l = Loader::dry_run();
        Self::build(config, &l)?;
        Ok(l.requested())
    }

    fn build(c: &VaeConfig, l: &Loader) -> anyhow::Result<Self> {
        c.check().map_err(anyhow::Error::msg)?;
        let g = c.norm_num_groups;
        let top = *c.block_out_channels.last().expect("checked non-empty");
        let post_quant_conv = if c.use_post_quant_conv {
            Some(Conv2d::load(l, "post_quant_conv", c.latent_channels, c.latent_channels, 1)?)
        } else {
            None
        };
        let conv_in = Conv2d::load(l, "decoder.conv_in", c.latent_channels, top, 3)?;
        let mid_resnets = [
            ResnetBlock2D::load(l, "decoder.mid_block.resnets.0", g, top, top)?,
            ResnetBlock2D::load(l, "decoder.mid_block.resnets.1", g, top, top)?,
        ];
        let mid_attention = if c.mid_block_add_attention {
            Some(AttentionBlock::load(l, "decoder.mid_block.attentions.0", g, top)?)
        } else {
            None
        };
        // Up blocks run from the widest channels to the narrowest (reversed block_out_channels).
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut prev = top;
        for (i, &out) in reversed.iter().enumerate() {
            let prefix = format!("decoder.up_blocks.{i}");
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let in_ch = if j == 0 { prev } else { out };
                    ResnetBlock2D::load(l, &format!("{prefix}.resnets.{j}"), g, in_ch, out)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let upsampler = if i + 1 < reversed.len() {
                Some(Conv2d::load(l, &format!("{prefix}.upsamplers.0.conv"), out, out, 3)?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock2D { resnets, upsampler });
            prev = out;
        }
        let bottom = c.block_out_channels[0];
        Ok(AutoencoderKL {
            config: c.clone(),
            post_quant_conv,
            conv_in,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out: GroupNorm::load(l, "decoder.conv_norm_out", g, bottom, EPS)?,
            conv_out: Conv2d::load(l, "decoder.conv_out", bottom, c.out_channels, 3)?,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
    pub fn scaling_factor(&self) -> f32 {
        self.config.scaling_factor
    }
    pub fn shift_factor(&self) -> f32 {
        self.config.shift_factor.unwrap_or(0.0)
    }
    /// Image pixels per latent pixel: `2^(len(block_out_channels) - 1)`.
    pub fn scale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// `vae.decode(latents).sample`: latents `[B, latent_channels, h, w]` (already `z / scaling + shift`) to an
    /// image `[B, out_channels, h·s, w·s]` in about [-1, 1], in the latents' dtype.
    pub fn decode(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        let c = &self.config;
        let s = latents.shape();
        anyhow::ensure!(
            s.len() == 4 && s[1] == c.latent_channels,
            "VAE decode: latents of shape {s:?}, expected [B, {}, h, w]",
            c.latent_channels
        );
        let mut x = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        x = self.conv_in.forward(&x)?;
        x = self.mid_resnets[0].forward(&x)?;
        if let Some(attn) = &self.mid_attention {
            x = attn.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x)?;
            }
            if let Some(conv) = &block.upsampler {
                x = x.upsample_nearest2d(2)?;
                x = conv.forward(&x)?;
            }
        }
        x = self.conv_norm_out.forward(&x)?;
        x = x.silu()?;
        Ok(self.conv_out.forward(&x)?)
    }
}

impl VaeConfig {
    /// Whether the decoder can be built from this config (the reason if not).
    pub(super) fn check(&self) -> Result<(), String> {
        let channels = &self.block_out_channels;
        if channels.is_empty() {
            return Err("block_out_channels is empty".into());
        }
        if channels.iter().any(|&ch| ch.checked_rem(self.norm_num_groups) != Some(0)) {
            return Err(format!(
                "norm_num_groups {} does not divide block_out_channels {channels:?}",
                self.norm_num_groups
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!("act_fn `{}` is not supported (the decoder is written for silu)", self.act_fn));
        }
        if let Some(types) = &self.up_block_types {
            if let Some(t) = types.iter().find(|t| t.as_str() != "UpDecoderBlock2D") {
                return Err(format!("up block type `{t}` is not supported (only UpDecoderBlock2D)"));
            }
            if types.len() != channels.len() {
                return Err(format!("{} up_block_types for {} block_out_channels", types.len(), channels.len()));
            }
        }
        Ok(())
    }
}
