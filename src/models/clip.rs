//! CLIP text encoder with projection: transformers' `CLIPTextModelWithProjection`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py>),
//! as SD3 uses it for CLIP-L (`text_encoder`, quick-GELU) and OpenCLIP bigG (`text_encoder_2`, erf GELU).
//!
//! SD3 takes two things from it (diffusers `StableDiffusion3Pipeline._get_clip_prompt_embeds`):
//! `hidden_states[-2]` (the penultimate layer's output, *without* the final layer norm; `clip_skip` walks further
//! back) and `text_embeds` = `text_projection(final_layer_norm(last)[pooled token])`.

use super::layers::{config_error, merge_heads, split_heads, Activation, LayerNorm, Linear, Loader};
use crate::weights::{read_config, Weights};
use anyhow::Context;
use sd3_core::{AttentionParams, Backend, DType, Tensor};
use serde::Deserialize;
use std::path::Path;

/// `CLIPTextConfig`, the fields the text model reads (defaults are transformers').
#[derive(Clone, Debug, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: i64,
}

impl ClipTextConfig {
    /// The MLP activation (`hidden_act`), checking the sizes fit too.
    fn activation(&self) -> Result<Activation, String> {
        if self.hidden_size.checked_rem(self.num_attention_heads) != Some(0) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Activation::from_name(&self.hidden_act).ok_or_else(|| format!("unsupported hidden_act `{}`", self.hidden_act))
    }
}

fn default_hidden_act() -> String {
    "quick_gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_eos_token_id() -> i64 {
    49407
}

/// What SD3 takes from a CLIP text encoder, for one prompt.
pub struct ClipOutput {
    /// `hidden_states[-(clip_skip + 2)]`: `[1, N, hidden]`.
    pub penultimate: Tensor,
    /// `text_embeds`: `[1, projection_dim]`.
    pub pooled: Tensor,
}

/// `CLIPAttention`: multi-head causal self-attention, q/k/v/out with bias, scale `head_dim^-0.5`.
pub(super) struct ClipAttention {
    pub(super) q_proj: Linear,
    pub(super) k_proj: Linear,
    pub(super) v_proj: Linear,
    pub(super) out_proj: Linear,
    pub(super) heads: usize,
}

impl ClipAttention {
    fn load(l: &Loader, prefix: &str, c: &ClipTextConfig) -> anyhow::Result<Self> {
        let d = c.hidden_size;
        Ok(ClipAttention {
            q_proj: Linear::load(l, &format!("{prefix}.q_proj"), d, d, true)?,
            k_proj: Linear::load(l, &format!("{prefix}.k_proj"), d, d, true)?,
            v_proj: Linear::load(l, &format!("{prefix}.v_proj"), d, d, true)?,
            out_proj: Linear::load(l, &format!("{prefix}.out_proj"), d, d, true)?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        let q = split_heads(&self.q_proj.forward(x)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(x)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(x)?, self.heads)?;
        let head_dim = q.dim(3);
        let params = AttentionParams { causal: true, ..AttentionParams::new((head_dim as f32).powf(-0.5)) };
        let o = Tensor::attention(&q, &k, &v, &params)?;
        self.out_proj.forward(&merge_heads(&o)?)
    }
}

/// `CLIPMLP`: `fc2(act(fc1(x)))`.
pub(super) struct ClipMlp {
    pub(super) fc1: Linear,
    pub(super) fc2: Linear,
    pub(super) act: Activation,
}

impl ClipMlp {
    fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        let h = self.fc1.forward(x)?;
        let h = self.act.forward(&h)?;
        self.fc2.forward(&h)
    }
}

/// `CLIPEncoderLayer`: pre-LN residual attention and MLP.
pub(super) struct ClipEncoderLayer {
    pub(super) layer_norm1: LayerNorm,
    pub(super) self_attn: ClipAttention,
    pub(super) layer_norm2: LayerNorm,
    pub(super) mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn load(l: &Loader, prefix: &str, c: &ClipTextConfig, act: Activation) -> anyhow::Result<Self> {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps as f32);
        Ok(ClipEncoderLayer {
            layer_norm1: LayerNorm::load(l, &format!("{prefix}.layer_norm1"), d, eps)?,
            self_attn: ClipAttention::load(l, &format!("{prefix}.self_attn"), c)?,
            layer_norm2: LayerNorm::load(l, &format!("{prefix}.layer_norm2"), d, eps)?,
            mlp: ClipMlp {
                fc1: Linear::load(l, &format!("{prefix}.mlp.fc1"), d, c.intermediate_size, true)?,
                fc2: Linear::load(l, &format!("{prefix}.mlp.fc2"), c.intermediate_size, d, true)?,
                act,
            },
        })
    }

    fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        let h = x.add(&self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        h.add(&self.mlp.forward(&self.layer_norm2.forward(&h)?)?)
    }
}

/// `CLIPTextModelWithProjection` (text model + `text_projection`), batch 1.
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    pub(super) layers: Vec<ClipEncoderLayer>,
    pub(super) final_layer_norm: LayerNorm,
    pub(super) text_projection: Linear,
    backend: Backend,
}

impl ClipTextModel {
    /// Load from a `text_encoder` / `text_encoder_2` folder (`config.json` + safetensors), in `dtype`.
    pub fn load(dir: &Path, backend: &Backend, dtype: DType) -> anyhow::Result<Self> {
        let weights = Weights::open(dir)?;
        Self::load_with_weights(dir, &weights, backend, dtype)
    }

    /// [`Self::load`] with the tensors taken from `weights` (opened from `dir`, possibly with LoRA deltas added);
    /// the config still comes from `dir/config.json`.
    pub fn load_with_weights(dir: &Path, weights: &Weights, backend: &Backend, dtype: DType) -> anyhow::Result<Self> {
        let config: ClipTextConfig = read_config(dir)?;
        config.activation().map_err(|reason| config_error(dir, reason))?;
        Self::build(&config, &Loader::new(weights, backend, dtype))
            .with_context(|| format!("loading the CLIP text encoder from {}", dir.display()))
    }

    /// Every tensor (name, shape) the loader reads for `config`, in loading order: derived by running the
    /// loading code without weights.
    pub fn expected_tensors(config: &ClipTextConfig) -> anyhow::Result<Vec<(String, Vec<usize>)>> {
        let l = Loader::dry_run();
        Self::build(config, &l)?;
        Ok(l.requested())
    }

    fn build(c: &ClipTextConfig, l: &Loader) -> anyhow::Result<Self> {
        let act = c.activation().map_err(anyhow::Error::msg)?;
        let d = c.hidden_size;
        let token_embedding = l.tensor("text_model.embeddings.token_embedding.weight", &[c.vocab_size, d])?;
        let position_embedding =
            l.tensor("text_model.embeddings.position_embedding.weight", &[c.max_position_embeddings, d])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(l, &format!("text_model.encoder.layers.{i}"), c, act))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::load(l, "text_model.final_layer_norm", d, c.layer_norm_eps as f32)?;
        let text_projection = Linear::load(l, "text_projection", d, c.projection_dim, false)?;
        Ok(ClipTextModel {
            config: c.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            backend: l.backend().clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Encode one prompt's token ids (at most `max_position_embeddings`). `clip_skip` as in diffusers:
    /// `None` gives `hidden_states[-2]`, `Some(k)` gives `hidden_states[-(k + 2)]`.
    pub fn forward(&self, ids: &[i64], clip_skip: Option<usize>) -> anyhow::Result<ClipOutput> {
        let c = &self.config;
        let n = ids.len();
        if n == 0 || n > c.max_position_embeddings {
            anyhow::bail!(
                "CLIP: {n} token ids given, expected 1 to {} (max_position_embeddings)",
                c.max_position_embeddings
            );
        }
        // hidden_states = [embeddings, layer 0 output, …, layer L-1 output]; index L+1-(k+2) = L-1-k.
        let layers = c.num_hidden_layers;
        let skip = clip_skip.unwrap_or(0);
        let wanted = (layers + 1)
            .checked_sub(skip + 2)
            .with_context(|| format!("CLIP: clip_skip {skip} needs more than the model's {layers} layers"))?;

        let mut h = self.embed(ids)?;
        let mut penultimate = (wanted == 0).then(|| h.clone());
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 == wanted {
                penultimate = Some(h.clone());
            }
        }
        let penultimate = penultimate.expect("wanted <= layers");

        let pooled = self.pooled(&h, pooled_index(ids, c.eos_token_id))?;
        Ok(ClipOutput { penultimate, pooled })
    }

    /// Token plus position embeddings of `ids`: `[1, N, hidden]`.
    pub(super) fn embed(&self, ids: &[i64]) -> anyhow::Result<Tensor> {
        let n = ids.len();
        if n == 0 || n > self.config.max_position_embeddings {
            anyhow::bail!(
                "CLIP: {n} token ids given, expected 1 to {} (max_position_embeddings)",
                self.config.max_position_embeddings
            );
        }
        let ids_t = self.backend.from_i64(ids, &[n])?;
        let tokens = Tensor::gather(&self.token_embedding, &ids_t)?;
        Ok(tokens.add(&self.position_embedding.narrow(0, 0, n)?)?.unsqueeze(0)?)
    }

    /// `text_projection(final_layer_norm(last)[index])`: `[1, projection_dim]`.
    pub(super) fn pooled(&self, last: &Tensor, index: usize) -> sd3_core::Result<Tensor> {
        let normed = self.final_layer_norm.forward(last)?;
        let token = normed.narrow(1, index, 1)?.reshape(&[1, self.config.hidden_size])?;
        self.text_projection.forward(&token)
    }
}

/// The token whose final state is pooled (transformers 5.x `CLIPTextTransformer.forward`): with the legacy
/// `eos_token_id == 2` configs, the largest id (first one on ties, like `torch.argmax`); otherwise the first
/// `eos_token_id` (0 if there is none, as `argmax` of an all-false mask gives).
pub fn pooled_index(ids: &[i64], eos_token_id: i64) -> usize {
    if eos_token_id == 2 {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&t| t == max).unwrap_or(0)
    } else {
        ids.iter().position(|&t| t == eos_token_id).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::pooled_index;

    #[test]
    fn pooling_picks_the_first_eos() {
        // CLIP-G pads with "!" (0); CLIP-L pads with EOS itself: the first EOS is pooled either way.
        assert_eq!(pooled_index(&[49406, 320, 49407, 0, 0], 49407), 2);
        assert_eq!(pooled_index(&[49406, 320, 49407, 49407, 49407], 49407), 2);
        // Legacy configs: argmax of the ids, first on ties.
        assert_eq!(pooled_index(&[998, 5, 999, 999], 2), 2);
        // No EOS at all: argmax of an all-false mask is 0.
        assert_eq!(pooled_index(&[5, 6, 7], 49407), 0);
    }
}
