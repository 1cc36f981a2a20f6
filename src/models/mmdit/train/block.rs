//! A `JointTransformerBlock`'s training forward (with adapters, keeping its activations) and backward.

use super::super::block::{modulation, JointTransformerBlock, LN_EPS};
use super::grads::{modulate_chunks, token_sum, Grads};
use super::layers::{
    attend, attend_backward, ff_backward, ff_forward, heads, merged, AdaptedLinear, FfActs, LinearActs, Qkv, QkvActs,
    PROBABILITY_BYTES,
};
use super::Adapters;
use crate::train::grad_ops as g;
use sd3_core::Tensor;

/// Everything one block's backward needs, from its forward.
pub(super) struct BlockActs<'a> {
    /// `transformer_blocks.{i}`.
    pub(super) prefix: String,
    pub(super) x: Tensor,
    pub(super) c: Tensor,
    /// The image stream's modulation chunks (6, or 9 in a dual-attention block) and the text stream's (6, or
    /// `[scale, shift]` in the last block).
    pub(super) m: Vec<Tensor>,
    pub(super) cm: Vec<Tensor>,
    pub(super) x_hat: Tensor,
    pub(super) c_hat: Tensor,
    pub(super) image: Qkv<'a>,
    pub(super) context: Qkv<'a>,
    pub(super) image_acts: QkvActs,
    pub(super) context_acts: QkvActs,
    pub(super) o: Tensor,
    pub(super) to_out: AdaptedLinear<'a>,
    pub(super) to_out_acts: LinearActs,
    pub(super) o_x: Tensor,
    pub(super) to_add_out: Option<(AdaptedLinear<'a>, LinearActs, Tensor)>,
    pub(super) dual: Option<DualActs<'a>>,
    pub(super) x1: Tensor,
    pub(super) c1: Option<Tensor>,
    pub(super) ff_x: FfActs,
    pub(super) ff_c: Option<FfActs>,
}

/// `attn2` of a dual-attention block (no adapters: the script's targets are `attn.*`).
pub(super) struct DualActs<'a> {
    pub(super) x_hat2: Tensor,
    pub(super) qkv: Qkv<'a>,
    pub(super) acts: QkvActs,
    pub(super) o: Tensor,
    pub(super) to_out: AdaptedLinear<'a>,
    pub(super) to_out_acts: LinearActs,
}

impl JointTransformerBlock {
    /// The block's forward with adapters, keeping what [`Self::backward`] needs. Returns the
    /// activations and `(c', x')` (`c'` `None` after the last block).
    pub(super) fn forward_adapted<'a>(
        &'a self,
        prefix: &str,
        x: &Tensor,
        c: &Tensor,
        temb_silu: &Tensor,
        adapters: &'a Adapters,
    ) -> sd3_core::Result<(BlockActs<'a>, Option<Tensor>, Tensor)> {
        let n_chunks = if self.attn2.is_some() { 9 } else { 6 };
        let m = modulation(&self.norm1, temb_silu, n_chunks)?;
        let cm = match (&self.context, &self.context_norm_last) {
            (Some(ctx), _) => modulation(&ctx.norm1, temb_silu, 6)?,
            (None, Some(norm)) => modulation(&norm.linear, temb_silu, 2)?,
            (None, None) => unreachable!("a block has one of the two context norms"),
        };
        let x_hat = x.layer_norm_modulate(&m[1], &m[0], LN_EPS)?;
        // The last block's context norm is AdaLayerNormContinuous: chunks (scale, shift).
        let c_hat = match self.context {
            Some(_) => c.layer_norm_modulate(&cm[1], &cm[0], LN_EPS)?,
            None => c.layer_norm_modulate(&cm[0], &cm[1], LN_EPS)?,
        };
        let attn = &self.attn;
        let prefix_attn = format!("{prefix}.attn");
        let (names, norms) = (["to_q", "to_k", "to_v"], ["norm_q", "norm_k"]);
        let image = Qkv::new(&attn.image, &prefix_attn, names, norms, Some(adapters))?;
        let (names, norms) = (["add_q_proj", "add_k_proj", "add_v_proj"], ["norm_added_q", "norm_added_k"]);
        let context = Qkv::new(&attn.context, &prefix_attn, names, norms, Some(adapters))?;
        let image_acts = image.forward(&x_hat)?;
        let context_acts = context.forward(&c_hat)?;
        let joint = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 1);
        let q = joint(&image_acts.q, &context_acts.q)?;
        let k = joint(&image_acts.k, &context_acts.k)?;
        let v = joint(&image.v(&image_acts)?, &context.v(&context_acts)?)?;
        let o = attend(&q, &k, &v, attn.scale)?;
        let (n, s) = (x.dim(1), c.dim(1));
        let o_merged = merged(&o)?;
        let o_x = o_merged.narrow(1, 0, n)?.contiguous()?;
        let to_out = AdaptedLinear::new(&attn.to_out.linear, format!("{prefix}.attn.to_out.0"), adapters);
        let to_out_acts = to_out.forward(&o_x)?;
        let mut x1 = x.gated_residual(&m[2], &to_out_acts.y)?;
        let to_add_out = match &attn.to_add_out {
            Some(p) => {
                let o_c = o_merged.narrow(1, n, s)?.contiguous()?;
                let lin = AdaptedLinear::new(&p.linear, format!("{prefix}.attn.to_add_out"), adapters);
                let acts = lin.forward(&o_c)?;
                Some((lin, acts, o_c))
            }
            None => None,
        };
        let c1 = match &to_add_out {
            Some((_, acts, _)) => Some(c.gated_residual(&cm[2], &acts.y)?),
            None => None,
        };
        let dual = match &self.attn2 {
            Some(attn2) => {
                let x_hat2 = x.layer_norm_modulate(&m[7], &m[6], LN_EPS)?;
                let names = (["to_q", "to_k", "to_v"], ["norm_q", "norm_k"]);
                let qkv = Qkv::new(&attn2.qkv, &format!("{prefix}.attn2"), names.0, names.1, None)?;
                let acts = qkv.forward(&x_hat2)?;
                let o = attend(&acts.q, &acts.k, &qkv.v(&acts)?, attn2.scale)?;
                let to_out = AdaptedLinear::plain(&attn2.to_out.linear, format!("{prefix}.attn2.to_out.0"));
                let to_out_acts = to_out.forward(&merged(&o)?)?;
                x1 = x1.gated_residual(&m[8], &to_out_acts.y)?;
                Some(DualActs { x_hat2, qkv, acts, o, to_out, to_out_acts })
            }
            None => None,
        };
        let ff_x = ff_forward(&self.ff, &x1.layer_norm_modulate(&m[4], &m[3], LN_EPS)?)?;
        let x2 = x1.gated_residual(&m[5], &ff_x.out)?;
        let (ff_c, c2) = match (&self.context, &c1) {
            (Some(ctx), Some(c1)) => {
                let acts = ff_forward(&ctx.ff, &c1.layer_norm_modulate(&cm[4], &cm[3], LN_EPS)?)?;
                let c2 = c1.gated_residual(&cm[5], &acts.out)?;
                (Some(acts), Some(c2))
            }
            _ => (None, None),
        };
        let acts = BlockActs {
            prefix: prefix.to_string(),
            x: x.clone(),
            c: c.clone(),
            m,
            cm,
            x_hat,
            c_hat,
            image,
            context,
            image_acts,
            context_acts,
            o,
            to_out,
            to_out_acts,
            o_x,
            to_add_out,
            dual,
            x1,
            c1,
            ff_x,
            ff_c,
        };
        Ok((acts, c2, x2))
    }

    /// `(dx, dc)` for the gradients of the block's outputs (`dc2` `None` for the last block, whose text output
    /// is dropped), adding the adapters' gradients (and in a full step every parameter's) to `grads`.
    pub(super) fn backward(
        &self,
        a: &BlockActs,
        temb_silu: &Tensor,
        dx2: &Tensor,
        dc2: Option<&Tensor>,
        grads: &mut Grads,
    ) -> sd3_core::Result<(Tensor, Tensor)> {
        let (m, cm, prefix) = (&a.m, &a.cm, &a.prefix);
        let full = grads.modulations();
        // d(chunk) of each modulation, filled in as the backward meets them (full fine-tuning only).
        let mut dm: Vec<Option<Tensor>> = vec![None; m.len()];
        let mut dcm: Vec<Option<Tensor>> = vec![None; cm.len()];
        // Feed-forwards and their residuals.
        let d_ff = ff_backward(&self.ff, &format!("{prefix}.ff.net"), &a.ff_x, &dx2.mul(&m[5])?, grads)?;
        if full {
            dm[5] = Some(token_sum(&dx2.mul(&a.ff_x.out)?)?);
            let (scale, shift) = modulate_chunks(&a.x1, &d_ff)?;
            (dm[4], dm[3]) = (Some(scale), Some(shift));
        }
        let mut dx1 = dx2.add(&g::layer_norm_modulate_backward(&a.x1, &m[4], &d_ff, LN_EPS)?)?;
        let dc1 = match (&self.context, &a.ff_c, &a.c1, dc2) {
            (Some(ctx), Some(ff_c), Some(c1), Some(dc2)) => {
                let name = format!("{prefix}.ff_context.net");
                let d_ff = ff_backward(&ctx.ff, &name, ff_c, &dc2.mul(&cm[5])?, grads)?;
                if full {
                    dcm[5] = Some(token_sum(&dc2.mul(&ff_c.out)?)?);
                    let (scale, shift) = modulate_chunks(c1, &d_ff)?;
                    (dcm[4], dcm[3]) = (Some(scale), Some(shift));
                }
                Some(dc2.add(&g::layer_norm_modulate_backward(c1, &cm[4], &d_ff, LN_EPS)?)?)
            }
            _ => None,
        };
        // The dual block's self-attention (its residual sits on x1).
        let mut dx = dx1.clone();
        if let (Some(attn2), Some(d)) = (&self.attn2, &a.dual) {
            if full {
                dm[8] = Some(token_sum(&dx1.mul(&d.to_out_acts.y)?)?);
            }
            let d_out = dx1.mul(&m[8])?;
            let d_o = heads(&d.to_out.backward(&merged(&d.o)?, &d.to_out_acts, &d_out, grads)?, d.qkv.heads)?;
            let grads_qkv = attend_backward(
                [&d.acts.q, &d.acts.k, &d.qkv.v(&d.acts)?],
                &d.o,
                &d_o,
                attn2.scale,
                PROBABILITY_BYTES,
            )?;
            let dx_hat2 = d.qkv.backward(&d.x_hat2, &d.acts, grads_qkv, grads)?;
            if full {
                let (scale, shift) = modulate_chunks(&a.x, &dx_hat2)?;
                (dm[7], dm[6]) = (Some(scale), Some(shift));
            }
            dx = dx.add(&g::layer_norm_modulate_backward(&a.x, &m[7], &dx_hat2, LN_EPS)?)?;
        }
        // The joint attention's output projections.
        if full {
            dm[2] = Some(token_sum(&dx1.mul(&a.to_out_acts.y)?)?);
        }
        dx1 = dx1.mul(&m[2])?;
        let do_x = a.to_out.backward(&a.o_x, &a.to_out_acts, &dx1, grads)?;
        let (b, s, d) = (a.c.dim(0), a.c.dim(1), a.c.dim(2));
        let (do_c, mut dc) = match (&a.to_add_out, &dc1) {
            (Some((lin, acts, o_c)), Some(dc1)) => {
                if full {
                    dcm[2] = Some(token_sum(&dc1.mul(&acts.y)?)?);
                }
                (lin.backward(o_c, acts, &dc1.mul(&cm[2])?, grads)?, dc1.clone())
            }
            // The last block: its text output is dropped, so its text queries get no gradient.
            _ => {
                let zeros = a.c.backend().zeros(&[b, s, d], a.c.dtype())?;
                (zeros.clone(), zeros)
            }
        };
        let heads_n = a.image.heads;
        let d_o = Tensor::cat(&[&heads(&do_x, heads_n)?, &heads(&do_c, heads_n)?], 1)?;
        let v = Tensor::cat(&[&a.image.v(&a.image_acts)?, &a.context.v(&a.context_acts)?], 1)?;
        let q = Tensor::cat(&[&a.image_acts.q, &a.context_acts.q], 1)?;
        let k = Tensor::cat(&[&a.image_acts.k, &a.context_acts.k], 1)?;
        let d_qkv = attend_backward([&q, &k, &v], &a.o, &d_o, self.attn.scale, PROBABILITY_BYTES)?;
        let n = a.x.dim(1);
        let image_part = |t: &Tensor| t.narrow(1, 0, n)?.contiguous();
        let text_part = |t: &Tensor| t.narrow(1, n, s)?.contiguous();
        let [dq, dk, dv] = &d_qkv;
        let dx_hat =
            a.image.backward(&a.x_hat, &a.image_acts, [image_part(dq)?, image_part(dk)?, image_part(dv)?], grads)?;
        let dc_hat =
            a.context.backward(&a.c_hat, &a.context_acts, [text_part(dq)?, text_part(dk)?, text_part(dv)?], grads)?;
        dx = dx.add(&g::layer_norm_modulate_backward(&a.x, &m[1], &dx_hat, LN_EPS)?)?;
        let c_scale = if self.context.is_some() { &cm[1] } else { &cm[0] };
        dc = dc.add(&g::layer_norm_modulate_backward(&a.c, c_scale, &dc_hat, LN_EPS)?)?;
        if full {
            let (scale, shift) = modulate_chunks(&a.x, &dx_hat)?;
            (dm[1], dm[0]) = (Some(scale), Some(shift));
            let (scale, shift) = modulate_chunks(&a.c, &dc_hat)?;
            // AdaLayerNormZero's chunks start (shift, scale); the last block's AdaLayerNormContinuous is (scale, shift).
            if self.context.is_some() {
                (dcm[1], dcm[0]) = (Some(scale), Some(shift));
            } else {
                (dcm[0], dcm[1]) = (Some(scale), Some(shift));
            }
            let chunks = |d: Vec<Option<Tensor>>| -> Vec<Tensor> {
                d.into_iter().map(|c| c.expect("every chunk met")).collect()
            };
            grads.modulation(&self.norm1, &format!("{prefix}.norm1.linear"), temb_silu, &chunks(dm))?;
            let context_norm = match (&self.context, &self.context_norm_last) {
                (Some(ctx), _) => &ctx.norm1,
                (None, Some(norm)) => &norm.linear,
                (None, None) => unreachable!("a block has one of the two context norms"),
            };
            grads.modulation(context_norm, &format!("{prefix}.norm1_context.linear"), temb_silu, &chunks(dcm))?;
        }
        Ok((dx, dc))
    }
}
