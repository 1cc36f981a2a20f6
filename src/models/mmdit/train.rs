//! LoRA fine-tuning of the MM-DiT: the forward with LoRA adapters on the joint attention's projections, and the
//! backward to the adapters' parameters, as PEFT computes them for diffusers' `train_dreambooth_lora_sd3.py`
//! (checked against it by `tests/training.rs`; the trainer is `crate::train`).
//!
//! The gradient reaches the adapters through the image and text streams only: the modulations (from the timestep
//! and pooled text embedding), the patch embedding and the context embedder are frozen with no adapter before
//! them, so their gradients are never formed. The forward keeps every block's activations, or with gradient
//! checkpointing (as `--gradient_checkpointing` does) each block's inputs only, and the backward then recomputes
//! one block's activations at a time: training memory is the inference memory plus one block's activations.
//!
//! One device only (no tensor-parallel shard), no skip layers.

use super::attention::{QkNorm, QkvProjection, QK_NORM_EPS};
use super::block::{modulation, JointTransformerBlock, LN_EPS};
use super::params::Linear;
use super::{MmditError, Sd3Transformer2DModel};
use crate::train::grad_ops as g;
use sd3_core::{AttentionParams, Tensor};
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

/// Where a backward puts its gradients: the adapters', and in a full fine-tuning step every parameter's, with the
/// gradient of `silu(temb)` gathered from every modulation on the way.
struct Grads {
    adapters: AdapterGrads,
    params: Option<ParamGrads>,
    temb_silu: Option<Tensor>,
}

impl Grads {
    fn full(&self) -> bool {
        self.params.is_some()
    }

    fn add(map: &mut BTreeMap<String, Tensor>, name: String, g: Tensor) -> sd3_core::Result<()> {
        let g = match map.remove(&name) {
            Some(prev) => prev.add(&g)?,
            None => g,
        };
        map.insert(name, g);
        Ok(())
    }

    /// Adds `g` to parameter `name`'s gradient (full fine-tuning only).
    fn param(&mut self, name: String, g: impl FnOnce() -> sd3_core::Result<Tensor>) -> sd3_core::Result<()> {
        match &mut self.params {
            Some(params) => Self::add(params, name, g()?),
            None => Ok(()),
        }
    }

    /// A frozen-or-trained linear `y = x·Wᵀ + b`: `dW = dyᵀ·x`, `db = Σ dy` under `name.weight`, `name.bias`.
    fn linear(&mut self, name: &str, x: &Tensor, dy: &Tensor, bias: bool) -> sd3_core::Result<()> {
        self.param(format!("{name}.weight"), || g::weight_grad(dy, x))?;
        if bias {
            self.param(format!("{name}.bias"), || column_sum(dy))?;
        }
        Ok(())
    }

    /// The backward of a modulation `emb = linear(silu(temb))` split into chunks `[B, 1, D]`, from each chunk's
    /// gradient (same order): the linear's parameters and `d silu(temb)` (full fine-tuning only).
    fn modulation(
        &mut self,
        linear: &Linear,
        name: &str,
        temb_silu: &Tensor,
        chunks: &[Tensor],
    ) -> sd3_core::Result<()> {
        if !self.full() {
            return Ok(());
        }
        let refs: Vec<&Tensor> = chunks.iter().collect();
        let d_emb = Tensor::cat(&refs, 2)?;
        let d_emb = d_emb.reshape(&[d_emb.dim(0), d_emb.dim(2)])?;
        self.linear(name, temb_silu, &d_emb, linear.bias.is_some())?;
        let d_temb = d_emb.matmul(&linear.weight)?;
        self.temb_silu = Some(match self.temb_silu.take() {
            Some(prev) => prev.add(&d_temb)?,
            None => d_temb,
        });
        Ok(())
    }
}

/// `Σ` over every dim but the last: `[.., D]` → `[D]`.
fn column_sum(t: &Tensor) -> sd3_core::Result<Tensor> {
    let d = t.dim(t.rank() - 1);
    let rows = t.elem_count() / d.max(1);
    let ones = t.backend().full(&[1, rows], t.dtype(), 1.0)?;
    ones.matmul(&t.contiguous()?.reshape(&[rows, d])?)?.reshape(&[d])
}

/// `Σ` over the tokens: `[B, N, D]` → `[B, 1, D]` (a modulation chunk's shape).
fn token_sum(t: &Tensor) -> sd3_core::Result<Tensor> {
    t.backend().full(&[1, t.dim(1)], t.dtype(), 1.0)?.matmul(t)
}

/// `σ(x)·(1 + x·(1 - σ(x)))`, the derivative of SiLU.
fn silu_derivative(x: &Tensor) -> sd3_core::Result<Tensor> {
    let sig = x.unary(sd3_core::UnaryOp::Sigmoid)?;
    sig.mul(&x.mul(&sig.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)
}

/// `LN(x)` without affine: the normalised input of a modulated norm.
fn normed(x: &Tensor) -> sd3_core::Result<Tensor> {
    x.layer_norm(None, None, LN_EPS)
}

/// The gradients of a modulated norm's `(scale, shift)` from its output's `dy`: `(Σ dy·LN(x), Σ dy)`.
fn modulate_chunks(x: &Tensor, dy: &Tensor) -> sd3_core::Result<(Tensor, Tensor)> {
    Ok((token_sum(&dy.mul(&normed(x)?)?)?, token_sum(dy)?))
}

/// A frozen linear (views of the model's weights) with the adapter of its module, if any.
struct AdaptedLinear<'a> {
    weight: Tensor,
    bias: Option<Tensor>,
    name: String,
    lora: Option<&'a LoraPair>,
}

/// An adapted linear's forward: its output and, with an adapter, `x·Aᵀ` (the backward needs it).
struct LinearActs {
    y: Tensor,
    xa: Option<Tensor>,
}

impl<'a> AdaptedLinear<'a> {
    fn new(linear: &Linear, name: String, adapters: &'a Adapters) -> Self {
        let lora = adapters.get(&name);
        AdaptedLinear { weight: linear.weight.clone(), bias: linear.bias.clone(), name, lora }
    }

    /// A linear no adapter targets.
    fn plain(linear: &Linear, name: String) -> Self {
        AdaptedLinear { weight: linear.weight.clone(), bias: linear.bias.clone(), name, lora: None }
    }

    /// Rows `part·d .. (part+1)·d` of a fused projection (`to_q`, `to_k`, `to_v` of `[3d, d]`).
    fn part(
        linear: &Linear,
        part: usize,
        d: usize,
        name: String,
        lora: Option<&'a LoraPair>,
    ) -> sd3_core::Result<Self> {
        let bias = linear.bias.as_ref().map(|b| b.narrow(0, part * d, d)).transpose()?;
        Ok(AdaptedLinear { weight: linear.weight.narrow(0, part * d, d)?, bias, name, lora })
    }

    fn forward(&self, x: &Tensor) -> sd3_core::Result<LinearActs> {
        let y = x.linear(&self.weight, self.bias.as_ref())?;
        let Some(p) = self.lora else { return Ok(LinearActs { y, xa: None }) };
        let xa = x.linear(&p.a, None)?;
        Ok(LinearActs { y: y.add(&xa.linear(&p.b, None)?.scale(p.scale)?)?, xa: Some(xa) })
    }

    /// `dL/dx` for `dy`, adding the adapter's `(dA, dB)` (and in a full step the weight's and bias's gradients) to
    /// `grads`.
    fn backward(&self, x: &Tensor, acts: &LinearActs, dy: &Tensor, grads: &mut Grads) -> sd3_core::Result<Tensor> {
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
struct QkvActs {
    proj: [LinearActs; 3],
    /// q and k after the norm (equal to the projections without one); v is `proj[2]`.
    q: Tensor,
    k: Tensor,
}

struct Qkv<'a> {
    parts: [AdaptedLinear<'a>; 3],
    norm: Option<&'a QkNorm>,
    /// The norms' parameter names (`{prefix}.norm_q.weight`, …).
    norm_names: [String; 2],
    heads: usize,
    head_dim: usize,
}

impl<'a> Qkv<'a> {
    /// `adapters` `None`: a projection without adapters (`attn2`).
    fn new(
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

    fn split(&self, t: &Tensor) -> sd3_core::Result<Tensor> {
        t.reshape(&[t.dim(0), t.dim(1), self.heads, self.head_dim])
    }

    fn forward(&self, x: &Tensor) -> sd3_core::Result<QkvActs> {
        let proj = [self.parts[0].forward(x)?, self.parts[1].forward(x)?, self.parts[2].forward(x)?];
        let (mut q, mut k) = (self.split(&proj[0].y)?, self.split(&proj[1].y)?);
        if let Some(norm) = self.norm {
            q = q.rms_norm(&norm.q, QK_NORM_EPS)?;
            k = k.rms_norm(&norm.k, QK_NORM_EPS)?;
        }
        Ok(QkvActs { proj, q, k })
    }

    fn v(&self, acts: &QkvActs) -> sd3_core::Result<Tensor> {
        self.split(&acts.proj[2].y)
    }

    /// `dL/dx` from the gradients of q, k, v (`[B, n, H, Dh]`, after the norm).
    fn backward(
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
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> sd3_core::Result<Tensor> {
    let hf = |t: &Tensor| t.permute(&[0, 2, 1, 3]);
    let o = Tensor::attention(&hf(q)?, &hf(k)?, &hf(v)?, &AttentionParams::new(scale))?;
    o.permute(&[0, 2, 1, 3])?.contiguous()
}

/// The most bytes of one `[B, h, T, T]` probability matrix in [`attend_backward`]: heads go through in groups
/// under it (at 1024² one head's is 72 MB in f32 for two samples).
const PROBABILITY_BYTES: usize = 256 << 20;

/// [`attend`]'s backward: `(dq, dk, dv)`, tokens first; heads in groups so that the recomputed probabilities and
/// their gradient stay under `limit` bytes each ([`PROBABILITY_BYTES`]).
fn attend_backward(
    [q, k, v]: [&Tensor; 3],
    o: &Tensor,
    d_o: &Tensor,
    scale: f32,
    limit: usize,
) -> sd3_core::Result<[Tensor; 3]> {
    let hf = |t: &Tensor| t.permute(&[0, 2, 1, 3]);
    let (b, t, heads) = (q.dim(0), q.dim(1), q.dim(2));
    let per_head = b * t * t * q.dtype().size_in_bytes();
    let group = (limit / per_head.max(1)).clamp(1, heads);
    let mut parts: [Vec<Tensor>; 3] = Default::default();
    for h0 in (0..heads).step_by(group) {
        let n = group.min(heads - h0);
        let sel = |x: &Tensor| hf(x)?.narrow(1, h0, n)?.contiguous();
        let (dq, dk, dv) = g::attention_backward(&sel(q)?, &sel(k)?, &sel(v)?, &sel(o)?, &sel(d_o)?, scale)?;
        for (p, d) in parts.iter_mut().zip([dq, dk, dv]) {
            p.push(d);
        }
    }
    let joined = |p: &[Tensor]| -> sd3_core::Result<Tensor> {
        let refs: Vec<&Tensor> = p.iter().collect();
        hf(&Tensor::cat(&refs, 1)?)?.contiguous()
    };
    Ok([joined(&parts[0])?, joined(&parts[1])?, joined(&parts[2])?])
}

/// `[B, n, D]` → `[B, n, H, Dh]`.
fn heads(t: &Tensor, h: usize) -> sd3_core::Result<Tensor> {
    t.contiguous()?.reshape(&[t.dim(0), t.dim(1), h, t.dim(2) / h])
}

/// `[B, n, H, Dh]` → `[B, n, D]`.
fn merged(t: &Tensor) -> sd3_core::Result<Tensor> {
    t.contiguous()?.reshape(&[t.dim(0), t.dim(1), t.dim(2) * t.dim(3)])
}

/// A feed-forward's activations: its input, the pre-activation `x·W₁ᵀ + b₁` and the output.
struct FfActs {
    input: Tensor,
    pre: Tensor,
    out: Tensor,
}

fn ff_forward(ff: &super::block::FeedForward, x: &Tensor) -> sd3_core::Result<FfActs> {
    let pre = ff.proj_in.forward(x)?;
    let out = ff.proj_out.linear.forward(&pre.gelu_tanh()?)?;
    Ok(FfActs { input: x.clone(), pre, out })
}

/// `dL/d input` of the feed-forward `name` (`…ff.net`), adding its parameters' gradients in a full step.
fn ff_backward(
    ff: &super::block::FeedForward,
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

/// Everything one block's backward needs, from its forward.
struct BlockActs<'a> {
    /// `transformer_blocks.{i}`.
    prefix: String,
    x: Tensor,
    c: Tensor,
    /// The image stream's modulation chunks (6, or 9 in a dual-attention block) and the text stream's (6, or
    /// `[scale, shift]` in the last block).
    m: Vec<Tensor>,
    cm: Vec<Tensor>,
    x_hat: Tensor,
    c_hat: Tensor,
    image: Qkv<'a>,
    context: Qkv<'a>,
    image_acts: QkvActs,
    context_acts: QkvActs,
    o: Tensor,
    to_out: AdaptedLinear<'a>,
    to_out_acts: LinearActs,
    o_x: Tensor,
    to_add_out: Option<(AdaptedLinear<'a>, LinearActs, Tensor)>,
    dual: Option<DualActs<'a>>,
    x1: Tensor,
    c1: Option<Tensor>,
    ff_x: FfActs,
    ff_c: Option<FfActs>,
}

/// `attn2` of a dual-attention block (no adapters: the script's targets are `attn.*`).
struct DualActs<'a> {
    x_hat2: Tensor,
    qkv: Qkv<'a>,
    acts: QkvActs,
    o: Tensor,
    to_out: AdaptedLinear<'a>,
    to_out_acts: LinearActs,
}

impl JointTransformerBlock {
    /// The block's forward with adapters, keeping what [`Self::backward`] needs. Returns the
    /// activations and `(c', x')` (`c'` `None` after the last block).
    fn forward_adapted<'a>(
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
    fn backward(
        &self,
        a: &BlockActs,
        temb_silu: &Tensor,
        dx2: &Tensor,
        dc2: Option<&Tensor>,
        grads: &mut Grads,
    ) -> sd3_core::Result<(Tensor, Tensor)> {
        let (m, cm, prefix) = (&a.m, &a.cm, &a.prefix);
        let full = grads.full();
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
    Activations(Box<BlockActs<'a>>),
    Inputs(Tensor, Tensor),
}

/// What a step's backward returns: the adapters' gradients, and in a full step every parameter's (f32).
pub struct StepGradients {
    pub adapters: AdapterGrads,
    pub params: Option<ParamGrads>,
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
        let (grads, extra) = self.step_gradients(batch, adapters, checkpointing, false, loss_grad)?;
        Ok((grads.adapters, extra))
    }

    /// [`Self::adapter_gradients`] for full fine-tuning: the gradient of every parameter, no adapters.
    pub fn parameter_gradients<T>(
        &self,
        batch: &TrainingBatch,
        checkpointing: bool,
        loss_grad: impl FnOnce(&Tensor) -> anyhow::Result<(Tensor, T)>,
    ) -> anyhow::Result<(ParamGrads, T)> {
        let (grads, extra) = self.step_gradients(batch, &Adapters::new(), checkpointing, true, loss_grad)?;
        Ok((grads.params.expect("a full step forms every parameter's gradient"), extra))
    }

    fn step_gradients<T>(
        &self,
        batch: &TrainingBatch,
        adapters: &Adapters,
        checkpointing: bool,
        full: bool,
        loss_grad: impl FnOnce(&Tensor) -> anyhow::Result<(Tensor, T)>,
    ) -> anyhow::Result<(StepGradients, T)> {
        let c = &self.config;
        let TrainingBatch { hidden_states, encoder_hidden_states, pooled, timesteps } = *batch;
        let b = hidden_states.dim(0);
        self.check_inputs(hidden_states, encoder_hidden_states, pooled, timesteps)?;
        if let Some(name) = adapters.keys().find(|n| !self.adapter_shapes().contains_key(*n)) {
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
        let mut grads = Grads { adapters: AdapterGrads::new(), params: full.then(ParamGrads::new), temb_silu: None };
        grads.linear("proj_out", &normed_out, &d_out, true)?;
        let d_normed = d_out.matmul(&self.proj_out.weight)?;
        if full {
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
        Ok((StepGradients { adapters: grads.adapters, params: grads.params }, extra))
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
