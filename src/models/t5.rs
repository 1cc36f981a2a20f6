//! T5 encoder: transformers' `T5EncoderModel`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/t5/modeling_t5.py>),
//! SD3's `text_encoder_3` (T5 v1.1 XXL: gated-GELU, RMS norm, unscaled attention, relative position buckets).
//!
//! The fp16 precision trap: transformers keeps every `wo` in fp32 when loading in fp16
//! (`T5PreTrainedModel._keep_in_fp32_modules = ["wo"]`), so the feed-forward output is fp32 and the residual
//! stream is promoted to fp32 after the first feed-forward; `T5LayerNorm` then casts back to the weights' fp16
//! for the next matmuls. Without that the XXL activations overflow fp16. This file does the same. While the
//! stream is still fp16 (layer 0's attention residual) transformers' clamp applies.

use super::layers::{config_error, merge_heads, split_heads, Activation, Linear, Loader};
use crate::weights::{read_config, Weights};
use anyhow::Context;
use sd3_core::{AttentionParams, Backend, BinaryOp, DType, Tensor};
use serde::Deserialize;
use std::path::Path;

/// `T5Config`, the fields the encoder reads (defaults are transformers').
#[derive(Clone, Debug, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
}

fn default_num_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "relu".into()
}

impl T5Config {
    /// `(is_gated, activation)` as `T5Config.__init__` derives them from `feed_forward_proj`
    /// ("gated-gelu" is special-cased to `gelu_new`, the tanh approximation).
    /// Also checks the other fields the encoder needs to be sensible.
    fn feed_forward(&self) -> Result<(bool, Activation), String> {
        if self.relative_attention_num_buckets < 4 {
            return Err("relative_attention_num_buckets must be at least 4".into());
        }
        let unsupported = || format!("unsupported feed_forward_proj `{}`", self.feed_forward_proj);
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let gated = match parts.as_slice() {
            [_] => false,
            ["gated", _] => true,
            _ => return Err(unsupported()),
        };
        let act = if self.feed_forward_proj == "gated-gelu" { "gelu_new" } else { parts[parts.len() - 1] };
        Ok((gated, Activation::from_name(act).ok_or_else(unsupported)?))
    }
}

/// `T5LayerNorm`: RMS norm without mean subtraction or bias. The variance is computed in f32 whatever the
/// stream's dtype; the result comes out in the compute dtype (the weights' dtype).
struct T5LayerNorm {
    weight: Tensor,
    eps: f32,
    out_dtype: DType,
}

impl T5LayerNorm {
    fn load(l: &Loader, name: &str, c: &T5Config, norm_dtype: DType) -> anyhow::Result<Self> {
        let weight = l.tensor_as(name, &[c.d_model], norm_dtype)?;
        Ok(T5LayerNorm { weight, eps: c.layer_norm_epsilon as f32, out_dtype: l.dtype })
    }

    fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        // transformers rounds `x·rsqrt(var+eps)` to fp16 before the fp16 weight multiply; here the product is
        // formed in the norm dtype and rounded once (at most one fp16 ulp apart).
        x.to_dtype(self.weight.dtype())?.rms_norm(&self.weight, self.eps)?.to_dtype(self.out_dtype)
    }
}

/// `T5Attention` (encoder self-attention): no bias, no `1/sqrt(d)` scaling, additive relative position bias.
struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
}

impl T5Attention {
    fn load(l: &Loader, prefix: &str, c: &T5Config) -> anyhow::Result<Self> {
        let inner = c.num_heads * c.d_kv;
        Ok(T5Attention {
            q: Linear::load(l, &format!("{prefix}.q"), c.d_model, inner, false)?,
            k: Linear::load(l, &format!("{prefix}.k"), c.d_model, inner, false)?,
            v: Linear::load(l, &format!("{prefix}.v"), c.d_model, inner, false)?,
            o: Linear::load(l, &format!("{prefix}.o"), inner, c.d_model, false)?,
            heads: c.num_heads,
        })
    }

    fn forward(&self, x: &Tensor, position_bias: &Tensor) -> sd3_core::Result<Tensor> {
        let q = split_heads(&self.q.forward(x)?, self.heads)?;
        let k = split_heads(&self.k.forward(x)?, self.heads)?;
        let v = split_heads(&self.v.forward(x)?, self.heads)?;
        let params = AttentionParams { bias: Some(position_bias), ..AttentionParams::new(1.0) };
        let o = Tensor::attention(&q, &k, &v, &params)?;
        self.o.forward(&merge_heads(&o)?)
    }
}

/// `T5DenseGatedActDense` (`wo(act(wi_0 x) · wi_1 x)`) or `T5DenseActDense` (`wo(act(wi x))`).
struct T5DenseActDense {
    wi: Vec<Linear>,
    wo: Linear,
    act: Activation,
}

impl T5DenseActDense {
    fn load(
        l: &Loader,
        prefix: &str,
        c: &T5Config,
        gated: bool,
        act: Activation,
        wo_dtype: DType,
    ) -> anyhow::Result<Self> {
        let wi_names: &[&str] = if gated { &["wi_0", "wi_1"] } else { &["wi"] };
        let wi = wi_names
            .iter()
            .map(|n| Linear::load(l, &format!("{prefix}.{n}"), c.d_model, c.d_ff, false))
            .collect::<Result<Vec<_>, _>>()?;
        let wo = Linear::load_as(l, &format!("{prefix}.wo"), c.d_ff, c.d_model, false, wo_dtype)?;
        Ok(T5DenseActDense { wi, wo, act })
    }

    fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        let mut h = self.act.forward(&self.wi[0].forward(x)?)?;
        if let Some(wi_1) = self.wi.get(1) {
            h = h.mul(&wi_1.forward(x)?)?;
        }
        // transformers casts the hidden state to `wo`'s dtype (fp32 under the fp16 trap) before `wo`.
        self.wo.forward(&h.to_dtype(self.wo.weight.dtype())?)
    }
}

/// `T5Block` of the encoder: `x += attn(ln(x))`, `x += ff(ln(x))`.
struct T5Block {
    attn_norm: T5LayerNorm,
    attn: T5Attention,
    ff_norm: T5LayerNorm,
    ff: T5DenseActDense,
}

/// `T5EncoderModel`, batch 1, no attention mask (SD3 passes none: pads attend and are attended).
pub struct T5EncoderModel {
    config: T5Config,
    embed_tokens: Tensor,
    /// `relative_attention_bias.weight` of block 0 `[num_buckets, heads]`, shared by every block.
    relative_attention_bias: Tensor,
    blocks: Vec<T5Block>,
    final_layer_norm: T5LayerNorm,
    backend: Backend,
    dtype: DType,
}

impl T5EncoderModel {
    /// Load from a `text_encoder_3` folder (`config.json` + safetensors, sharded or not), in `dtype`.
    pub fn load(dir: &Path, backend: &Backend, dtype: DType) -> anyhow::Result<Self> {
        let weights = Weights::open(dir)?;
        Self::load_with_weights(dir, &weights, backend, dtype)
    }

    /// [`Self::load`] with the tensors taken from `weights` (opened from `dir`, possibly with LoRA deltas added);
    /// the config still comes from `dir/config.json`.
    pub fn load_with_weights(dir: &Path, weights: &Weights, backend: &Backend, dtype: DType) -> anyhow::Result<Self> {
        let config: T5Config = read_config(dir)?;
        config.feed_forward().map_err(|reason| config_error(dir, reason))?;
        Self::build(&config, &Loader::new(weights, backend, dtype))
            .with_context(|| format!("loading the T5 encoder from {}", dir.display()))
    }

    /// Every tensor (name, shape) the loader reads for `config`, in loading order: derived by running the
    /// loading code without weights.
    pub fn expected_tensors(config: &T5Config) -> anyhow::Result<Vec<(String, Vec<usize>)>> {
        let l = Loader::dry_run();
        Self::build(config, &l)?;
        Ok(l.requested())
    }

    fn build(c: &T5Config, l: &Loader) -> anyhow::Result<Self> {
        let (gated, act) = c.feed_forward().map_err(anyhow::Error::msg)?;
        let dtype = l.dtype;
        // The fp16 trap: `wo` and (so that the promoted stream is normed without a lossy cast) the norm weights.
        let wide = if dtype == DType::F16 { DType::F32 } else { dtype };
        // transformers ties `encoder.embed_tokens` to `shared` and saves one of the two.
        let embed_name = ["shared.weight", "encoder.embed_tokens.weight"]
            .into_iter()
            .find(|n| l.contains(n))
            .unwrap_or("shared.weight");
        let embed_tokens = l.tensor(embed_name, &[c.vocab_size, c.d_model])?;
        let relative_attention_bias = l.tensor(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &[c.relative_attention_num_buckets, c.num_heads],
        )?;
        let blocks = (0..c.num_layers)
            .map(|i| {
                let p = format!("encoder.block.{i}.layer");
                Ok(T5Block {
                    attn_norm: T5LayerNorm::load(l, &format!("{p}.0.layer_norm.weight"), c, wide)?,
                    attn: T5Attention::load(l, &format!("{p}.0.SelfAttention"), c)?,
                    ff_norm: T5LayerNorm::load(l, &format!("{p}.1.layer_norm.weight"), c, wide)?,
                    ff: T5DenseActDense::load(l, &format!("{p}.1.DenseReluDense"), c, gated, act, wide)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let final_layer_norm = T5LayerNorm::load(l, "encoder.final_layer_norm.weight", c, wide)?;
        Ok(T5EncoderModel {
            config: c.clone(),
            embed_tokens,
            relative_attention_bias,
            blocks,
            final_layer_norm,
            backend: l.backend().clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// `last_hidden_state` `[1, T, d_model]` (after the final RMS norm) in the compute dtype.
    pub fn forward(&self, ids: &[i64]) -> anyhow::Result<Tensor> {
        let c = &self.config;
        let n = ids.len();
        anyhow::ensure!(n > 0, "T5: no token ids given");
        let ids_t = self.backend.from_i64(ids, &[n])?;
        let mut h = Tensor::gather(&self.embed_tokens, &ids_t)?.unsqueeze(0)?;

        // Position bias [1, H, T, T] from layer 0's table, reused by every layer.
        let buckets: Vec<i64> = (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| {
                relative_position_bucket(
                    j as i64 - i as i64,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                )
            })
            .collect();
        let buckets = self.backend.from_i64(&buckets, &[n * n])?;
        let position_bias = Tensor::gather(&self.relative_attention_bias, &buckets)?
            .reshape(&[n, n, c.num_heads])?
            .permute(&[2, 0, 1])?
            .contiguous()?
            .unsqueeze(0)?;

        for block in &self.blocks {
            let a = block.attn.forward(&block.attn_norm.forward(&h)?, &position_bias)?;
            h = residual_add(&h, &a)?;
            let f = block.ff.forward(&block.ff_norm.forward(&h)?)?;
            h = residual_add(&h, &f)?;
        }
        Ok(self.final_layer_norm.forward(&h)?.to_dtype(self.dtype)?)
    }
}

/// `h + y` with torch's type promotion (fp16 + fp32 → fp32), then, if the result is still fp16, transformers'
/// clamp: when any element is infinite, clamp to ±(fp16 max − 1000) (which rounds to ±64512 in fp16); otherwise
/// the clamp to ±fp16 max changes nothing.
fn residual_add(h: &Tensor, y: &Tensor) -> sd3_core::Result<Tensor> {
    let dt = if h.dtype() == y.dtype() { h.dtype() } else { DType::F32 };
    let out = h.to_dtype(dt)?.add(&y.to_dtype(dt)?)?;
    if dt != DType::F16 || !out.to_f32_vec()?.iter().any(|v| v.is_infinite()) {
        return Ok(out);
    }
    let limit = 65504.0 - 1000.0;
    let hi = out.backend().full(&[1], DType::F16, limit)?;
    let lo = out.backend().full(&[1], DType::F16, -limit)?;
    out.binary(BinaryOp::Min, &hi)?.binary(BinaryOp::Max, &lo)
}

/// `T5Attention._relative_position_bucket` for the (bidirectional) encoder. `relative_position` = key − query.
/// The log-spaced buckets are computed in f32 step by step as torch does, so bucket edges truncate identically.
pub fn relative_position_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> i64 {
    let num_buckets = (num_buckets / 2) as i64;
    let mut bucket = if relative_position > 0 { num_buckets } else { 0 };
    let distance = relative_position.abs();
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        bucket += distance;
    } else {
        let ratio = distance as f32 / max_exact as f32;
        let log_range = (max_distance as f64 / max_exact as f64).ln() as f32;
        let scaled = ratio.ln() / log_range * (num_buckets - max_exact) as f32;
        let large = max_exact + scaled as i64;
        bucket += large.min(num_buckets - 1);
    }
    bucket
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_match_t5_for_the_xxl_config() {
        // 32 buckets, max distance 128: 16 per direction, exact below 8, log-spaced up to 15.
        let b = |r| relative_position_bucket(r, 32, 128);
        assert_eq!([b(0), b(-1), b(-7), b(1), b(7)], [0, 1, 7, 17, 23]);
        // Log region: 8 + floor(ln(d/8)/ln(16)·8); d = 16 is exactly 2 in real arithmetic and in f32.
        assert_eq!([b(-8), b(-15), b(-16), b(-31), b(-32), b(-127), b(-128), b(-1000)], [8, 9, 10, 11, 12, 15, 15, 15]);
        assert_eq!([b(8), b(16), b(200)], [24, 26, 31]);
    }
}
