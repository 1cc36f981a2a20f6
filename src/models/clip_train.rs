//! Training a CLIP text encoder's LoRA (`--train_text_encoder` of diffusers' `train_dreambooth_lora_sd3.py`):
//! the forward of [`ClipTextModel`] with adapters on each layer's `q_proj`, `k_proj`, `v_proj`, `out_proj`, keeping
//! its activations, and the backward from the gradients of what SD3 takes (`hidden_states[-2]` and the projected
//! pooled token) to the adapters. The pieces are the MM-DiT's (`models::mmdit::train`); the attention is causal.

use super::clip::{ClipEncoderLayer, ClipTextModel};
use super::mmdit::train::grads::Grads;
use super::mmdit::train::layers::{AdaptedLinear, LinearActs};
use super::mmdit::train::{AdapterGrads, Adapters};
use crate::train::grad_ops as g;
use anyhow::Context;
use sd3_core::{AttentionParams, Tensor};

/// The modules the script adapts in each CLIP layer, relative to `text_model.encoder.layers.{i}.self_attn`.
pub const CLIP_LORA_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

/// One layer's activations.
struct LayerActs<'a> {
    x: Tensor,
    ln1: Tensor,
    proj: [AdaptedLinear<'a>; 4],
    proj_acts: [LinearActs; 4],
    /// q, k, v heads-first `[1, H, N, Dh]` (contiguous) and the attention's output, heads-first and merged.
    qkv: [Tensor; 3],
    o: Tensor,
    o_merged: Tensor,
    h: Tensor,
    pre: Tensor,
}

/// A forward's activations, for [`ClipTextModel::backward_adapters`].
pub struct ClipActs<'a> {
    layers: Vec<LayerActs<'a>>,
    /// The last layer's output (the final norm's input) and the pooled token's index.
    last: Tensor,
    pooled_index: usize,
    /// `hidden_states[-2]` is the output of layer `penultimate - 1` (0: the embeddings).
    penultimate: usize,
}

fn heads_first(t: &Tensor, heads: usize) -> sd3_core::Result<Tensor> {
    super::layers::split_heads(t, heads)?.contiguous()
}

impl ClipEncoderLayer {
    fn forward_adapted<'a>(
        &'a self,
        prefix: &str,
        x: &Tensor,
        adapters: &'a Adapters,
    ) -> sd3_core::Result<LayerActs<'a>> {
        let a = &self.self_attn;
        let ln1 = self.layer_norm1.forward(x)?;
        let linear = |l: &super::layers::Linear, name: &str| {
            let name = format!("{prefix}.self_attn.{name}");
            let lora = adapters.get(&name);
            AdaptedLinear::from_parts(l.weight.clone(), l.bias.clone(), name, lora)
        };
        let proj = [
            linear(&a.q_proj, "q_proj"),
            linear(&a.k_proj, "k_proj"),
            linear(&a.v_proj, "v_proj"),
            linear(&a.out_proj, "out_proj"),
        ];
        let qa = proj[0].forward(&ln1)?;
        let ka = proj[1].forward(&ln1)?;
        let va = proj[2].forward(&ln1)?;
        let qkv = [heads_first(&qa.y, a.heads)?, heads_first(&ka.y, a.heads)?, heads_first(&va.y, a.heads)?];
        let scale = (qkv[0].dim(3) as f32).powf(-0.5);
        let params = AttentionParams { causal: true, ..AttentionParams::new(scale) };
        let o = Tensor::attention(&qkv[0], &qkv[1], &qkv[2], &params)?;
        let o_merged = super::layers::merge_heads(&o)?.contiguous()?;
        let oa = proj[3].forward(&o_merged)?;
        let h = x.add(&oa.y)?;
        let ln2 = self.layer_norm2.forward(&h)?;
        let pre = self.mlp.fc1.forward(&ln2)?;
        Ok(LayerActs { x: x.clone(), ln1, proj, proj_acts: [qa, ka, va, oa], qkv, o, o_merged, h, pre })
    }

    /// The layer's output `h + fc2(act(fc1(LN2(h))))` from its activations.
    fn output(&self, acts: &LayerActs) -> sd3_core::Result<Tensor> {
        acts.h.add(&self.mlp.fc2.forward(&self.mlp.act.forward(&acts.pre)?)?)
    }

    /// `dL/dx` from `dL/d output`, adding the adapters' gradients.
    fn backward_adapters(&self, acts: &LayerActs, d_out: &Tensor, grads: &mut Grads) -> sd3_core::Result<Tensor> {
        let mlp = &self.mlp;
        let d_pre = d_out.matmul(&mlp.fc2.weight)?.mul(&g::activation_derivative(mlp.act, &acts.pre)?)?;
        let d_ln2 = d_pre.matmul(&mlp.fc1.weight)?;
        let ln = |w: &Tensor, eps: f32, x: &Tensor, dy: &Tensor| g::layer_norm_backward(x, &dy.mul(w)?, eps);
        let d_h = d_out.add(&ln(&self.layer_norm2.weight, self.layer_norm2.eps, &acts.h, &d_ln2)?)?;
        let d_o = acts.proj[3].backward(&acts.o_merged, &acts.proj_acts[3], &d_h, grads)?;
        let heads = self.self_attn.heads;
        let d_o = heads_first(&d_o, heads)?;
        let [q, k, v] = &acts.qkv;
        let scale = (q.dim(3) as f32).powf(-0.5);
        let (dq, dk, dv) = g::attention_backward(q, k, v, &acts.o, &d_o, scale, true)?;
        // The q, k and v projections' input gradients, summed in that order.
        let mut d_ln1: Option<Tensor> = None;
        for (i, d) in [dq, dk, dv].iter().enumerate() {
            let part = acts.proj[i].backward(&acts.ln1, &acts.proj_acts[i], &super::layers::merge_heads(d)?, grads)?;
            d_ln1 = Some(match d_ln1 {
                Some(sum) => sum.add(&part)?,
                None => part,
            });
        }
        let d_ln1 = d_ln1.expect("three projections");
        d_h.add(&ln(&self.layer_norm1.weight, self.layer_norm1.eps, &acts.x, &d_ln1)?)
    }
}

impl ClipActs<'_> {
    /// The prompt's token count.
    pub fn tokens(&self) -> usize {
        self.last.dim(1)
    }
}

impl ClipTextModel {
    /// [`ClipTextModel::forward`] (no clip_skip) with `adapters` (by module name,
    /// `text_model.encoder.layers.{i}.self_attn.q_proj`), keeping its activations.
    pub fn forward_adapted<'a>(
        &'a self,
        ids: &[i64],
        adapters: &'a Adapters,
    ) -> anyhow::Result<(super::clip::ClipOutput, ClipActs<'a>)> {
        let c = self.config();
        let mut h = self.embed(ids)?;
        let penultimate = c.num_hidden_layers.checked_sub(1).context("CLIP: no layers")?;
        let mut out_penultimate = (penultimate == 0).then(|| h.clone());
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for (i, layer) in self.layers.iter().enumerate() {
            let acts = layer.forward_adapted(&format!("text_model.encoder.layers.{i}"), &h, adapters)?;
            h = layer.output(&acts)?;
            layers.push(acts);
            if i + 1 == penultimate {
                out_penultimate = Some(h.clone());
            }
        }
        let pooled_index = super::clip::pooled_index(ids, c.eos_token_id);
        let pooled = self.pooled(&h, pooled_index)?;
        let output = super::clip::ClipOutput { penultimate: out_penultimate.expect("set"), pooled };
        Ok((output, ClipActs { layers, last: h, pooled_index, penultimate }))
    }

    /// The adapters' gradients (f32) from `d_penultimate` (`[1, N, hidden]`) and `d_pooled` (`[1, projection_dim]`).
    pub fn backward_adapters(
        &self,
        acts: &ClipActs,
        d_penultimate: &Tensor,
        d_pooled: &Tensor,
    ) -> anyhow::Result<AdapterGrads> {
        let mut grads = Grads::adapters_only();
        let c = self.config();
        // The pooled token: text_projection(final_layer_norm(last)[eos]).
        let d_token = d_pooled.matmul(&self.text_projection.weight)?; // [1, hidden]
        let n = acts.last.dim(1);
        let d_normed = acts.last.backend().zeros(&[1, n, c.hidden_size], acts.last.dtype())?;
        d_normed.narrow(1, acts.pooled_index, 1)?.copy_from(&d_token.unsqueeze(1)?)?;
        let fln = &self.final_layer_norm;
        let mut d = g::layer_norm_backward(&acts.last, &d_normed.mul(&fln.weight)?, fln.eps)?;
        for (i, (layer, layer_acts)) in self.layers.iter().zip(&acts.layers).enumerate().rev() {
            if i + 1 == acts.penultimate {
                d = d.add(d_penultimate)?;
            }
            d = layer.backward_adapters(layer_acts, &d, &mut grads)?;
        }
        let mut out = AdapterGrads::new();
        for (name, [a, b]) in grads.adapters {
            out.insert(name, [a.to_dtype(sd3_core::DType::F32)?, b.to_dtype(sd3_core::DType::F32)?]);
        }
        Ok(out)
    }
}
