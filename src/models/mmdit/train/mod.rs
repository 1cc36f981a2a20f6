//! Fine-tuning the MM-DiT: the forward with LoRA adapters on the joint attention's projections, and the backward
//! to the adapters' parameters (as PEFT computes them for diffusers' `train_dreambooth_lora_sd3.py`) or to every
//! parameter of the transformer (`train_dreambooth_sd3.py`); checked against both by `tests/training.rs`, driven
//! by `crate::train`.
//!
//! For a LoRA the gradient reaches the adapters through the image and text streams only: the modulations (from
//! the timestep and pooled text embedding), the patch embedding and the context embedder are frozen with no
//! adapter before them, so their gradients are never formed; a full step forms them too. The forward keeps every
//! block's activations, or with gradient checkpointing (as `--gradient_checkpointing` does) each block's inputs
//! only, and the backward then recomputes one block's activations at a time: training memory is then the
//! inference memory plus one block's activations.
//!
//! One device only (no tensor-parallel shard), no skip layers.
//!
//! Files: `grads.rs` (where gradients go, sums over tokens and rows), `layers.rs` (linears with adapters, the
//! q/k/v projections, attention, feed-forward: forward and backward), `block.rs` (a block's forward keeping its
//! activations, and its backward); here the step over the whole model.

mod block;
pub(crate) mod grads;
pub(crate) mod layers;

use super::block::{modulation, LN_EPS};
use super::{MmditError, Sd3Transformer2DModel};
use crate::train::grad_ops as g;
use grads::{column_sum, modulate_chunks, silu_derivative, Grads};
use sd3_core::Tensor;
use std::collections::BTreeMap;

/// The modules diffusers' DreamBooth LoRA script adapts by default, relative to `transformer_blocks.{i}`.
pub const LORA_TARGETS: [&str; 8] = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
];

/// One adapter: `y = x·Wᵀ + b + scale·(x·Aᵀ)·Bᵀ`, `a [rank, in]`, `b [out, rank]`, in the model's dtype.
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f32,
}

/// Adapters by module name (`transformer_blocks.0.attn.to_q`).
pub type Adapters = BTreeMap<String, LoraPair>;
/// `(dA, dB)` by module name, in f32.
pub type AdapterGrads = BTreeMap<String, [Tensor; 2]>;
/// Gradients of the transformer's parameters by their diffusers names (`transformer_blocks.0.attn.to_q.weight`),
/// in f32: what full fine-tuning trains (`pos_embed.pos_embed` is a buffer, not a parameter).
pub type ParamGrads = BTreeMap<String, Tensor>;

/// A training step's inputs, as [`Sd3Transformer2DModel::forward`] takes them.
pub struct TrainingBatch<'a> {
    /// The noisy latents `[B, C, H, W]`.
    pub hidden_states: &'a Tensor,
    pub encoder_hidden_states: &'a Tensor,
    pub pooled: &'a Tensor,
    /// σ·1000 per sample.
    pub timesteps: &'a [f32],
}

/// A block's saved state between the forward and the backward: everything (no checkpointing), or its inputs.
enum Saved<'a> {
    Activations(Box<block::BlockActs<'a>>),
    Inputs(Tensor, Tensor),
}

/// What a step's backward returns: the adapters' gradients, in a full step every parameter's, and where asked the
/// gradients of the text inputs, `(d encoder_hidden_states, d pooled)` (all f32).
pub struct StepGradients {
    pub adapters: AdapterGrads,
    pub params: Option<ParamGrads>,
    pub text_inputs: Option<(Tensor, Tensor)>,
}

/// What a step's backward forms besides the adapters' gradients.
#[derive(Clone, Copy, Debug, Default)]
pub struct GradientRequest {
    /// Every parameter's gradient (full fine-tuning).
    pub parameters: bool,
    /// The gradients of `encoder_hidden_states` and `pooled` (to train the text encoders).
    pub text_inputs: bool,
}

impl Sd3Transformer2DModel {
    /// One LoRA training step's forward and backward: the prediction for the batch (as
    /// [`Sd3Transformer2DModel::forward`]) with `adapters` applied, then `loss_grad(prediction)` for the loss's
    /// gradient with respect to it (and anything the caller wants back, e.g. the loss), then the adapters'
    /// gradients. With `checkpointing` the forward keeps each block's inputs only and the backward recomputes its
    /// activations (`--gradient-checkpointing`: about a third more time, a block's activations of memory instead
    /// of all of them).
    pub fn adapter_gradients<T>(
        &self,
        batch: &TrainingBatch,
        adapters: &Adapters,
        checkpointing: bool,
        loss_grad: impl FnOnce(&Tensor) -> anyhow::Result<(Tensor, T)>,
    ) -> anyhow::Result<(AdapterGrads, T)> {
        let (grads, extra) =
            self.step_gradients(batch, adapters, checkpointing, GradientRequest::default(), loss_grad)?;
        Ok((grads.adapters, extra))
    }

    /// [`Self::adapter_gradients`] for full fine-tuning: the gradient of every parameter, no adapters.
    pub fn parameter_gradients<T>(
        &self,
        batch: &TrainingBatch,
        checkpointing: bool,
        loss_grad: impl FnOnce(&Tensor) -> anyhow::Result<(Tensor, T)>,
    ) -> anyhow::Result<(ParamGrads, T)> {
        let request = GradientRequest { parameters: true, text_inputs: false };
        let (grads, extra) = self.step_gradients(batch, &Adapters::new(), checkpointing, request, loss_grad)?;
        Ok((grads.params.expect("a full step forms every parameter's gradient"), extra))
    }

    /// The general step behind [`Self::adapter_gradients`] and [`Self::parameter_gradients`]: the adapters'
    /// gradients and what `request` asks for besides.
    pub fn step_gradients<T>(
        &self,
        batch: &TrainingBatch,
        adapters: &Adapters,
        checkpointing: bool,
        request: GradientRequest,
        loss_grad: impl FnOnce(&Tensor) -> anyhow::Result<(Tensor, T)>,
    ) -> anyhow::Result<(StepGradients, T)> {
        let c = &self.config;
        let TrainingBatch { hidden_states, encoder_hidden_states, pooled, timesteps } = *batch;
        let b = hidden_states.dim(0);
        self.check_inputs(hidden_states, encoder_hidden_states, pooled, timesteps)?;
        let targets = self.adapter_shapes();
        if let Some(name) = adapters.keys().find(|n| !targets.contains_key(*n)) {
            return Err(MmditError::Input(format!("no LoRA target module `{name}` in this transformer")).into());
        }
        let (h, w) = self.pos_embed.grid(hidden_states.dim(2), hidden_states.dim(3))?;
        let latents = hidden_states.to_dtype(self.dtype)?;
        let mut x = self.pos_embed.forward(&latents)?;
        let pooled = pooled.to_dtype(self.dtype)?;
        let temb = self.time_text_embed.forward(timesteps, &pooled)?;
        let temb_silu = temb.silu()?;
        let encoder_hidden_states = encoder_hidden_states.to_dtype(self.dtype)?;
        let mut ctx = self.context_embedder.forward(&encoder_hidden_states)?;
        let mut saved = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let (acts, new_ctx, new_x) =
                block.forward_adapted(&format!("transformer_blocks.{i}"), &x, &ctx, &temb_silu, adapters)?;
            saved.push(if checkpointing { Saved::Inputs(x, ctx.clone()) } else { Saved::Activations(Box::new(acts)) });
            x = new_x;
            if let Some(nc) = new_ctx {
                ctx = nc;
            }
        }
        let norm_mod = modulation(&self.norm_out.linear, &temb_silu, 2)?; // (scale, shift)
        let normed_out = x.layer_norm_modulate(&norm_mod[0], &norm_mod[1], LN_EPS)?;
        let out = self.proj_out.forward(&normed_out)?;
        let (p, oc) = (c.patch_size, c.out_channels);
        let pred = out.reshape(&[b, h, w, p, p, oc])?.permute(&[0, 5, 1, 3, 2, 4])?.reshape(&[b, oc, h * p, w * p])?;
        let (d_pred, extra) = loss_grad(&pred)?;
        anyhow::ensure!(
            d_pred.shape() == pred.shape(),
            "loss gradient {:?} for a prediction {:?}",
            d_pred.shape(),
            pred.shape()
        );
        // Loss scaling: a mean over many latents makes each element's gradient tiny (1e-5 at 512²), below f16's
        // normal range; the backward runs on the gradient scaled by a power of two that brings its largest element
        // near 1, and the gradients are scaled back at the end (exact, being a power of two).
        let largest = d_pred.to_f32_vec()?.iter().fold(0f32, |m, v| m.max(v.abs()));
        let grad_scale = if largest > 0.0 { 2f32.powi((-largest.log2().floor() as i32).clamp(0, 24)) } else { 1.0 };
        let d_pred = d_pred.scale(grad_scale)?;
        // Unpatchify's inverse: [B, C, h, p, w, p] → [B, h, w, p, p, C].
        let d_out = d_pred.to_dtype(self.dtype)?.reshape(&[b, oc, h, p, w, p])?.permute(&[0, 2, 4, 3, 5, 1])?;
        let d_out = d_out.contiguous()?.reshape(&[b, h * w, p * p * oc])?;
        let full = request.parameters;
        let mut grads = Grads {
            adapters: AdapterGrads::new(),
            params: full.then(ParamGrads::new),
            temb_silu: None,
            through_modulations: full || request.text_inputs,
        };
        grads.linear("proj_out", &normed_out, &d_out, true)?;
        let d_normed = d_out.matmul(&self.proj_out.weight)?;
        if grads.modulations() {
            let (scale, shift) = modulate_chunks(&x, &d_normed)?;
            grads.modulation(&self.norm_out.linear, "norm_out.linear", &temb_silu, &[scale, shift])?;
        }
        let mut dx = g::layer_norm_modulate_backward(&x, &norm_mod[0], &d_normed, LN_EPS)?;
        let mut dc: Option<Tensor> = None;
        for (i, (block, saved)) in self.blocks.iter().zip(saved).enumerate().rev() {
            let acts = match saved {
                Saved::Activations(acts) => *acts,
                Saved::Inputs(x_in, c_in) => {
                    let prefix = format!("transformer_blocks.{i}");
                    block.forward_adapted(&prefix, &x_in, &c_in, &temb_silu, adapters)?.0
                }
            };
            let (ndx, ndc) = block.backward(&acts, &temb_silu, &dx, dc.as_ref(), &mut grads)?;
            dx = ndx;
            dc = Some(ndc);
        }
        let mut text_inputs = None;
        if request.text_inputs {
            let dc = dc.as_ref().expect("at least one block");
            let d_encoder = dc.matmul(&self.context_embedder.weight)?;
            let d_temb = grads.temb_silu.as_ref().expect("the modulations' gradients").mul(&silu_derivative(&temb)?)?;
            let text = &self.time_text_embed.text_embedder;
            let hidden = text.linear_1.forward(&pooled)?;
            let d_hidden = d_temb.matmul(&text.linear_2.weight)?.mul(&silu_derivative(&hidden)?)?;
            text_inputs = Some((d_encoder, d_hidden.matmul(&text.linear_1.weight)?));
        }
        if full {
            self.embeddings_backward(&mut grads, &latents, &encoder_hidden_states, &pooled, timesteps, &temb, &dx, dc)?;
        }
        // Unscaled in f32: in f16 the unscaled values of small gradients would be subnormal.
        let unscale = |t: &Tensor| t.to_dtype(sd3_core::DType::F32)?.scale(1.0 / grad_scale);
        for [da, db] in grads.adapters.values_mut() {
            (*da, *db) = (unscale(da)?, unscale(db)?);
        }
        if let Some(params) = &mut grads.params {
            for g in params.values_mut() {
                *g = unscale(g)?;
            }
        }
        let text_inputs = match text_inputs {
            Some((e, p)) => Some((unscale(&e)?, unscale(&p)?)),
            None => None,
        };
        Ok((StepGradients { adapters: grads.adapters, params: grads.params, text_inputs }, extra))
    }

    /// The parameters before the blocks (full fine-tuning): the patch embedding's projection from `dx` (the
    /// gradient of the patch tokens), the context embedder from `dc`, the time and text embeddings from the
    /// modulations' `d silu(temb)`.
    #[allow(clippy::too_many_arguments)]
    fn embeddings_backward(
        &self,
        grads: &mut Grads,
        latents: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled: &Tensor,
        timesteps: &[f32],
        temb: &Tensor,
        dx: &Tensor,
        dc: Option<Tensor>,
    ) -> sd3_core::Result<()> {
        // The patch embedding is a linear on patches flattened as the conv weight is, (C, p, p).
        let (b, ch, hh, ww) = (latents.dim(0), latents.dim(1), latents.dim(2), latents.dim(3));
        let p = self.config.patch_size;
        let patches = latents.reshape(&[b, ch, hh / p, p, ww / p, p])?.permute(&[0, 2, 4, 1, 3, 5])?.contiguous()?;
        let patches = patches.reshape(&[b, (hh / p) * (ww / p), ch * p * p])?;
        let d = self.pos_embed.dim;
        grads.param("pos_embed.proj.weight".into(), || g::weight_grad(dx, &patches)?.reshape(&[d, ch, p, p]))?;
        grads.param("pos_embed.proj.bias".into(), || column_sum(dx))?;
        if let Some(dc) = dc {
            grads.linear("context_embedder", encoder_hidden_states, &dc, true)?;
        }
        let Some(d_temb_silu) = grads.temb_silu.take() else { return Ok(()) };
        let d_temb = d_temb_silu.mul(&silu_derivative(temb)?)?;
        let sin = super::embeddings::timestep_sinusoid(timesteps, super::embeddings::TIMESTEP_CHANNELS);
        let sin =
            temb.backend().from_f32(&sin, &[timesteps.len(), super::embeddings::TIMESTEP_CHANNELS], temb.dtype())?;
        let tte = &self.time_text_embed;
        for (mlp, name, input) in [
            (&tte.timestep_embedder, "time_text_embed.timestep_embedder", &sin),
            (&tte.text_embedder, "time_text_embed.text_embedder", pooled),
        ] {
            let hidden = mlp.linear_1.forward(input)?;
            grads.linear(&format!("{name}.linear_2"), &hidden.silu()?, &d_temb, true)?;
            let d_hidden = d_temb.matmul(&mlp.linear_2.weight)?.mul(&silu_derivative(&hidden)?)?;
            grads.linear(&format!("{name}.linear_1"), input, &d_hidden, true)?;
        }
        Ok(())
    }

    /// The LoRA target modules of this transformer (the script's defaults that exist here: the last block has no
    /// `to_add_out`) with their `(in, out)` features.
    pub fn adapter_shapes(&self) -> BTreeMap<String, (usize, usize)> {
        let d = self.config.inner_dim();
        let mut shapes = BTreeMap::new();
        for (i, block) in self.blocks.iter().enumerate() {
            for target in LORA_TARGETS {
                if target == "attn.to_add_out" && block.attn.to_add_out.is_none() {
                    continue;
                }
                shapes.insert(format!("transformer_blocks.{i}.{target}"), (d, d));
            }
        }
        shapes
    }
}
