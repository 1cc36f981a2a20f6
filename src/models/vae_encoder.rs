//! The encoder half of diffusers' `AutoencoderKL` (`Encoder` in
//! <https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/vae.py>,
//! `DownEncoderBlock2D` in `unets/unet_2d_blocks.py`, `Downsample2D` in `downsampling.py`), used by fine-tuning to
//! turn training images into latents. The resnets and the mid-block attention are the decoder's (`vae.rs`).

use super::layers::{config_error, Conv2d, GroupNorm, Loader};
use super::vae::{AttentionBlock, ResnetBlock2D, VaeConfig, EPS};
use crate::weights::{read_config, Weights};
use anyhow::Context;
use sd3_core::{DType, Tensor};
use std::path::Path;

/// `DownEncoderBlock2D`: resnets, then (except in the last block) `Downsample2D`: the input padded by one zero
/// row and column at the bottom and right, then a 3×3 convolution with stride 2 and no padding.
struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Conv2d>,
}

/// `AutoencoderKL`'s encoder: an image to the diagonal Gaussian of its latents.
pub struct VaeEncoder {
    config: VaeConfig,
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: Option<AttentionBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

/// `latent_dist`: `DiagonalGaussianDistribution` of `[B, latent_channels, h, w]` means and log-variances (clamped
/// to [-30, 20] as diffusers does).
pub struct LatentDistribution {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// `mean + exp(logvar / 2)·noise` (`latent_dist.sample()` with the caller's noise, same shape).
    pub fn sample(&self, noise: &Tensor) -> sd3_core::Result<Tensor> {
        self.mean.add(&self.logvar.scale(0.5)?.unary(sd3_core::UnaryOp::Exp)?.mul(noise)?)
    }
}

impl VaeEncoder {
    /// Load the encoder from a `vae` folder (`config.json` + safetensors), in `dtype`.
    pub fn load(dir: &Path, backend: &sd3_core::Backend, dtype: DType) -> anyhow::Result<Self> {
        let weights = Weights::open(dir)?;
        let config: VaeConfig = read_config(dir)?;
        config.check().map_err(|reason| config_error(dir, reason))?;
        if let Some(t) = config.down_block_types.iter().flatten().find(|t| t.as_str() != "DownEncoderBlock2D") {
            return Err(config_error(
                dir,
                format!("down block type `{t}` is not supported (only DownEncoderBlock2D)"),
            ))?;
        }
        Self::build(&config, &Loader::new(&weights, backend, dtype))
            .with_context(|| format!("loading the VAE encoder from {}", dir.display()))
    }

    fn build(c: &VaeConfig, l: &Loader) -> anyhow::Result<Self> {
        let g = c.norm_num_groups;
        let channels = &c.block_out_channels;
        let top = *channels.last().expect("checked non-empty");
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut prev = channels[0];
        for (i, &out) in channels.iter().enumerate() {
            let prefix = format!("encoder.down_blocks.{i}");
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let in_ch = if j == 0 { prev } else { out };
                    ResnetBlock2D::load(l, &format!("{prefix}.resnets.{j}"), g, in_ch, out)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let downsampler = if i + 1 < channels.len() {
                Some(Conv2d::load(l, &format!("{prefix}.downsamplers.0.conv"), out, out, 3)?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock2D { resnets, downsampler });
            prev = out;
        }
        let moments = 2 * c.latent_channels;
        Ok(VaeEncoder {
            config: c.clone(),
            conv_in: Conv2d::load(l, "encoder.conv_in", c.in_channels, channels[0], 3)?,
            down_blocks,
            mid_resnets: [
                ResnetBlock2D::load(l, "encoder.mid_block.resnets.0", g, top, top)?,
                ResnetBlock2D::load(l, "encoder.mid_block.resnets.1", g, top, top)?,
            ],
            mid_attention: if c.mid_block_add_attention {
                Some(AttentionBlock::load(l, "encoder.mid_block.attentions.0", g, top)?)
            } else {
                None
            },
            conv_norm_out: GroupNorm::load(l, "encoder.conv_norm_out", g, top, EPS)?,
            conv_out: Conv2d::load(l, "encoder.conv_out", top, moments, 3)?,
            quant_conv: if c.use_quant_conv { Some(Conv2d::load(l, "quant_conv", moments, moments, 1)?) } else { None },
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Image pixels per latent pixel.
    pub fn scale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// `vae.encode(image).latent_dist` for an image `[B, in_channels, H, W]` in [-1, 1], H and W multiples of
    /// [`Self::scale_factor`].
    pub fn encode(&self, image: &Tensor) -> anyhow::Result<LatentDistribution> {
        let (c, f) = (&self.config, self.scale_factor());
        let s = image.shape();
        anyhow::ensure!(
            s.len() == 4
                && s[1] == c.in_channels
                && s[2].is_multiple_of(f)
                && s[3].is_multiple_of(f)
                && s[2] > 0
                && s[3] > 0,
            "VAE encode: image of shape {s:?}, expected [B, {}, H, W] with H and W multiples of {f}",
            c.in_channels
        );
        let mut x = self.conv_in.forward(image)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(&x)?;
            }
            if let Some(conv) = &block.downsampler {
                x = pad_bottom_right(&x)?.conv2d(&conv.weight, Some(&conv.bias), 2, 0)?;
            }
        }
        x = self.mid_resnets[0].forward(&x)?;
        if let Some(attn) = &self.mid_attention {
            x = attn.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x)?;
        x = self.conv_norm_out.forward(&x)?.silu()?;
        x = self.conv_out.forward(&x)?;
        if let Some(conv) = &self.quant_conv {
            x = conv.forward(&x)?;
        }
        let [mean, logvar]: [Tensor; 2] = x.chunk(2, 1)?.try_into().expect("two chunks");
        // clamp(-30, 20) as max(min(·, 20), -30).
        let bounds = |v: f32| image.backend().full(&[1], logvar.dtype(), v)?.broadcast_to(logvar.shape());
        let logvar = logvar.binary(sd3_core::BinaryOp::Min, &bounds(20.0)?)?;
        let logvar = logvar.binary(sd3_core::BinaryOp::Max, &bounds(-30.0)?)?;
        Ok(LatentDistribution { mean: mean.contiguous()?, logvar })
    }
}

/// `F.pad(x, (0, 1, 0, 1))`: one zero row below and one zero column right of `[N, C, H, W]`.
fn pad_bottom_right(x: &Tensor) -> sd3_core::Result<Tensor> {
    let (n, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let padded = x.backend().zeros(&[n, c, h + 1, w + 1], x.dtype())?;
    padded.narrow(2, 0, h)?.narrow(3, 0, w)?.copy_from(x)?;
    Ok(padded)
}
