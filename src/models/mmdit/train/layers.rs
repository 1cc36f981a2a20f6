//! The pieces of a block with their backward: linears with an adapter, a stream's q/k/v projections with their
//! RMS norms, softmax attention (its backward in groups of heads), the feed-forward.

use super::super::attention::{QkNorm, QkvProjection, QK_NORM_EPS};
use super::super::block::FeedForward;
use super::super::params::Linear;
use super::grads::{column_sum, Grads};
use super::{Adapters, LoraPair};
use crate::train::grad_ops as g;
use sd3_core::{AttentionParams, Tensor};

/// A frozen linear (views of the model's weights) with the adapter of its module, if any.
pub(crate) struct AdaptedLinear<'a> {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    pub(crate) name: String,
    pub(crate) lora: Option<&'a LoraPair>,
}

/// An adapted linear's forward: its output and, with an adapter, `x·Aᵀ` (the backward needs it).
pub(crate) struct LinearActs {
    pub(crate) y: Tensor,
    pub(crate) xa: Option<Tensor>,
}

impl<'a> AdaptedLinear<'a> {
    pub(crate) fn new(linear: &Linear, name: String, adapters: &'a Adapters) -> Self {
        let lora = adapters.get(&name);
        AdaptedLinear { weight: linear.weight.clone(), bias: linear.bias.clone(), name, lora }
    }

    /// A linear from its tensors (`weight [out, in]`, `bias [out]`), with `lora` if an adapter targets it.
    pub(crate) fn from_parts(weight: Tensor, bias: Option<Tensor>, name: String, lora: Option<&'a LoraPair>) -> Self {
        AdaptedLinear { weight, bias, name, lora }
    }

    /// A linear no adapter targets.
    pub(crate) fn plain(linear: &Linear, name: String) -> Self {
        AdaptedLinear { weight: linear.weight.clone(), bias: linear.bias.clone(), name, lora: None }
    }

    /// Rows `part·d .. (part+1)·d` of a fused projection (`to_q`, `to_k`, `to_v` of `[3d, d]`).
    pub(crate) fn part(
        linear: &Linear,
        part: usize,
        d: usize,
        name: String,
        lora: Option<&'a LoraPair>,
    ) -> sd3_core::Result<Self> {
        let bias = linear.bias.as_ref().map(|b| b.narrow(0, part * d, d)).transpose()?;
        Ok(AdaptedLinear { weight: linear.weight.narrow(0, part * d, d)?, bias, name, lora })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> sd3_core::Result<LinearActs> {
        let y = x.linear(&self.weight, self.bias.as_ref())?;
        let Some(p) = self.lora else { return Ok(LinearActs { y, xa: None }) };
        let xa = x.linear(&p.a, None)?;
        Ok(LinearActs { y: y.add(&xa.linear(&p.b, None)?.scale(p.scale)?)?, xa: Some(xa) })
    }

    /// `dL/dx` for `dy`, adding the adapter's `(dA, dB)` (and in a full step the weight's and bias's gradients) to
    /// `grads`.
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        acts: &LinearActs,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> sd3_core::Result<Tensor> {
        let dx = dy.matmul(&self.weight)?;
        grads.linear(&self.name, x, dy, self.bias.is_some())?;
        let (Some(p), Some(xa)) = (self.lora, &acts.xa) else { return Ok(dx) };
        let dy_b = dy.matmul(&p.b)?.scale(p.scale)?; // dL/d(x·Aᵀ)
        let d_b = g::weight_grad(dy, xa)?.scale(p.scale)?;
        let d_a = g::weight_grad(&dy_b, x)?;
        let dx = dx.add(&dy_b.matmul(&p.a)?)?;
        match grads.adapters.remove(&self.name) {
            Some([a0, b0]) => grads.adapters.insert(self.name.clone(), [a0.add(&d_a)?, b0.add(&d_b)?]),
            None => grads.adapters.insert(self.name.clone(), [d_a, d_b]),
        };
        Ok(dx)
    }
}

/// One stream's q/k/v projections (`[B, n, H, Dh]` each, tokens first) before and after the q/k RMS norm.
pub(crate) struct QkvActs {
    pub(crate) proj: [LinearActs; 3],
    /// q and k after the norm (equal to the projections without one); v is `proj[2]`.
    pub(crate) q: Tensor,
    pub(crate) k: Tensor,
}

pub(crate) struct Qkv<'a> {
    pub(crate) parts: [AdaptedLinear<'a>; 3],
    pub(crate) norm: Option<&'a QkNorm>,
    /// The norms' parameter names (`{prefix}.norm_q.weight`, …).
    pub(crate) norm_names: [String; 2],
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
}

impl<'a> Qkv<'a> {
    /// `adapters` `None`: a projection without adapters (`attn2`).
    pub(crate) fn new(
        p: &'a QkvProjection,
        prefix: &str,
        names: [&str; 3],
        norm_names: [&str; 2],
        adapters: Option<&'a Adapters>,
    ) -> sd3_core::Result<Self> {
        let d = p.heads * p.head_dim;
        let part = |i: usize| {
            let name = format!("{prefix}.{}", names[i]);
            let lora = adapters.and_then(|a| a.get(&name));
            AdaptedLinear::part(&p.qkv, i, d, name, lora)
        };
        Ok(Qkv {
            parts: [part(0)?, part(1)?, part(2)?],
            norm: p.norm.as_ref(),
            norm_names: norm_names.map(|n| format!("{prefix}.{n}.weight")),
            heads: p.heads,
            head_dim: p.head_dim,
        })
    }

    pub(crate) fn split(&self, t: &Tensor) -> sd3_core::Result<Tensor> {
        t.reshape(&[t.dim(0), t.dim(1), self.heads, self.head_dim])
    }

    pub(crate) fn forward(&self, x: &Tensor) -> sd3_core::Result<QkvActs> {
        let proj = [self.parts[0].forward(x)?, self.parts[1].forward(x)?, self.parts[2].forward(x)?];
        let (mut q, mut k) = (self.split(&proj[0].y)?, self.split(&proj[1].y)?);
        if let Some(norm) = self.norm {
            q = q.rms_norm(&norm.q, QK_NORM_EPS)?;
            k = k.rms_norm(&norm.k, QK_NORM_EPS)?;
        }
        Ok(QkvActs { proj, q, k })
    }

    pub(crate) fn v(&self, acts: &QkvActs) -> sd3_core::Result<Tensor> {
        self.split(&acts.proj[2].y)
    }

    /// `dL/dx` from the gradients of q, k, v (`[B, n, H, Dh]`, after the norm).
    pub(crate) fn backward(
        &self,
        x: &Tensor,
        acts: &QkvActs,
        [mut dq, mut dk, dv]: [Tensor; 3],
        grads: &mut Grads,
    ) -> sd3_core::Result<Tensor> {
        if let Some(norm) = self.norm {
            let (q_raw, k_raw) = (self.split(&acts.proj[0].y)?, self.split(&acts.proj[1].y)?);
            // The norm weights' gradients: Σ dy · x/rms(x).
            for (raw, d, name) in [(&q_raw, &dq, &self.norm_names[0]), (&k_raw, &dk, &self.norm_names[1])] {
                grads.param(name.clone(), || {
                    let ones = raw.backend().full(&[self.head_dim], raw.dtype(), 1.0)?;
                    column_sum(&d.mul(&raw.rms_norm(&ones, QK_NORM_EPS)?)?)
                })?;
            }
            dq = g::rms_norm_backward(&q_raw, &norm.q, &dq, QK_NORM_EPS)?;
            dk = g::rms_norm_backward(&k_raw, &norm.k, &dk, QK_NORM_EPS)?;
        }
        let flat = |t: Tensor| t.contiguous()?.reshape(&[t.dim(0), t.dim(1), self.heads * self.head_dim]);
        let mut dx = self.parts[0].backward(x, &acts.proj[0], &flat(dq)?, grads)?;
        dx = dx.add(&self.parts[1].backward(x, &acts.proj[1], &flat(dk)?, grads)?)?;
        dx.add(&self.parts[2].backward(x, &acts.proj[2], &flat(dv)?, grads)?)
    }
}

/// Softmax attention over `[B, n, H, Dh]` tokens-first q, k, v: the output `[B, n, H, Dh]` (contiguous).
pub(crate) fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> sd3_core::Result<Tensor> {
    let hf = |t: &Tensor| t.permute(&[0, 2, 1, 3]);
    let o = Tensor::attention(&hf(q)?, &hf(k)?, &hf(v)?, &AttentionParams::new(scale))?;
    o.permute(&[0, 2, 1, 3])?.contiguous()
}

/// The most bytes of one `[B, h, T, T]` probability matrix in [`attend_backward`]: heads go through in groups
/// under it (at 1024² one head's is 72 MB in f32 for two samples).
pub(crate) const PROBABILITY_BYTES: usize = 256 << 20;

/// [`attend`]'s backward: `(dq, dk, dv)`, tokens first. On the device's fused kernel where it has one
/// ([`Tensor::attention_backward_into`]: the probabilities are recomputed tile by tile, never stored); elsewhere
/// from products, heads in groups so that the recomputed probabilities and their gradient stay under `limit` bytes
/// each ([`PROBABILITY_BYTES`]).
pub(crate) fn attend_backward(
    [q, k, v]: [&Tensor; 3],
    o: &Tensor,
    d_o: &Tensor,
    scale: f32,
    limit: usize,
) -> sd3_core::Result<[Tensor; 3]> {
    let hf = |t: &Tensor| t.permute(&[0, 2, 1, 3]);
    let (b, t, heads, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    // The fused op writes [3, B, H, T, D] into a tokens-first buffer, so each gradient comes out [B, T, H, D].
    let fused = q.backend().empty(&[3, b, t, heads, d], q.dtype())?;
    let fused_hf = fused.permute(&[0, 1, 3, 2, 4])?;
    let operands = [hf(q)?, hf(k)?, hf(v)?, hf(o)?, hf(d_o)?];
    let [qh, kh, vh, oh, doh] = &operands;
    if Tensor::attention_backward_into(qh, kh, vh, oh, doh, scale, false, &fused_hf)? {
        let part = |i: usize| fused.narrow(0, i, 1)?.reshape(&[b, t, heads, d]);
        return Ok([part(0)?, part(1)?, part(2)?]);
    }
    drop(fused_hf);
    drop(fused);
    let per_head = b * t * t * q.dtype().size_in_bytes();
    let group = (limit / per_head.max(1)).clamp(1, heads);
    let mut parts: [Vec<Tensor>; 3] = Default::default();
    for h0 in (0..heads).step_by(group) {
        let n = group.min(heads - h0);
        let sel = |x: &Tensor| hf(x)?.narrow(1, h0, n)?.contiguous();
        let (dq, dk, dv) = g::attention_backward(&sel(q)?, &sel(k)?, &sel(v)?, &sel(o)?, &sel(d_o)?, scale, false)?;
        for (part, grad) in parts.iter_mut().zip([dq, dk, dv]) {
            part.push(grad);
        }
    }
    let joined = |p: &[Tensor]| -> sd3_core::Result<Tensor> {
        let refs: Vec<&Tensor> = p.iter().collect();
        hf(&Tensor::cat(&refs, 1)?)?.contiguous()
    };
    Ok([joined(&parts[0])?, joined(&parts[1])?, joined(&parts[2])?])
}

/// `[B, n, D]` → `[B, n, H, Dh]`.
pub(crate) fn heads(t: &Tensor, h: usize) -> sd3_core::Result<Tensor> {
    t.contiguous()?.reshape(&[t.dim(0), t.dim(1), h, t.dim(2) / h])
}

/// `[B, n, H, Dh]` → `[B, n, D]`.
pub(crate) fn merged(t: &Tensor) -> sd3_core::Result<Tensor> {
    t.contiguous()?.reshape(&[t.dim(0), t.dim(1), t.dim(2) * t.dim(3)])
}

/// A feed-forward's activations: its input, the pre-activation `x·W₁ᵀ + b₁` and the output.
pub(crate) struct FfActs {
    pub(crate) input: Tensor,
    pub(crate) pre: Tensor,
    pub(crate) out: Tensor,
}

pub(crate) fn ff_forward(ff: &FeedForward, x: &Tensor) -> sd3_core::Result<FfActs> {
    let pre = ff.proj_in.forward(x)?;
    let out = ff.proj_out.linear.forward(&pre.gelu_tanh()?)?;
    Ok(FfActs { input: x.clone(), pre, out })
}

/// `dL/d input` of the feed-forward `name` (`…ff.net`), adding its parameters' gradients in a full step.
pub(crate) fn ff_backward(
    ff: &FeedForward,
    name: &str,
    acts: &FfActs,
    d_out: &Tensor,
    grads: &mut Grads,
) -> sd3_core::Result<Tensor> {
    if grads.full() {
        grads.linear(&format!("{name}.2"), &acts.pre.gelu_tanh()?, d_out, true)?;
    }
    let d_pre = d_out.matmul(&ff.proj_out.linear.weight)?.mul(&g::gelu_tanh_derivative(&acts.pre)?)?;
    grads.linear(&format!("{name}.0.proj"), &acts.input, &d_pre, true)?;
    d_pre.matmul(&ff.proj_in.weight)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd3_core::{Backend, DType};

    /// Heads in groups (here one at a time) give what all heads at once give.
    #[test]
    fn attention_backward_by_head_groups() {
        let be = Backend::new("cpu", sd3_backend_cpu::cpu_device());
        let shape = [2, 7, 3, 4]; // [B, T, H, Dh], tokens first
        let t = |seed| be.from_f32(&crate::noise::standard_normal(seed, 168), &shape, DType::F32).unwrap();
        let (q, k, v, d_o) = (t(1), t(2), t(3), t(4));
        let o = attend(&q, &k, &v, 0.5).unwrap();
        let whole = attend_backward([&q, &k, &v], &o, &d_o, 0.5, usize::MAX).unwrap();
        let by_head = attend_backward([&q, &k, &v], &o, &d_o, 0.5, 1).unwrap();
        for (a, b) in whole.iter().zip(&by_head) {
            assert_eq!(a.shape(), b.shape());
            assert_eq!(a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        }
    }
}
