//! `Attention` with `JointAttnProcessor2_0` (diffusers `attention_processor.py`), written on the fused ops.
//!
//! q/k/v projections of a stream are fused into one linear (`[3D, D]`); its output `[B, N, 3D]` is viewed as
//! `[B, N, 3, H, Dh]`, so q, k and v are strided views `[B, H, N, Dh]` (reshape then permute, no copies).
//! Joint attention concatenates **image tokens first**, then text, along the sequence; that concatenation is the
//! one copy, and it produces contiguous `[B, H, N+S, Dh]`.

use super::params::{Linear, Params};
use super::MmditError;
use sd3_core::{AttentionParams, Backend, DType, Tensor};

pub const QK_NORM_EPS: f32 = 1e-6;

/// Per-head RMS norm weights `[Dh]` of q and k (`norm_q`, `norm_k` or `norm_added_q`, `norm_added_k`).
pub struct QkNorm {
    q: Tensor,
    k: Tensor,
}

impl QkNorm {
    fn load(
        p: &Params,
        q: &str,
        k: &str,
        head_dim: usize,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        Ok(QkNorm {
            q: p.tensor(&format!("{q}.weight"), &[head_dim], backend, dtype)?,
            k: p.tensor(&format!("{k}.weight"), &[head_dim], backend, dtype)?,
        })
    }
}

/// One stream's fused q/k/v projection and optional q/k RMS norm.
pub struct QkvProjection {
    qkv: Linear,
    norm: Option<QkNorm>,
    heads: usize,
    head_dim: usize,
}

impl QkvProjection {
    #[allow(clippy::too_many_arguments)]
    fn load(
        p: &Params,
        prefix: &str,
        names: [&str; 3],
        norms: Option<[&str; 2]>,
        heads: usize,
        head_dim: usize,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        let dim = heads * head_dim;
        let full: Vec<String> = names.iter().map(|n| format!("{prefix}.{n}")).collect();
        let norm = match norms {
            Some([q, k]) => {
                Some(QkNorm::load(p, &format!("{prefix}.{q}"), &format!("{prefix}.{k}"), head_dim, backend, dtype)?)
            }
            None => None,
        };
        Ok(QkvProjection { qkv: Linear::load_fused(p, &full, dim, dim, backend, dtype)?, norm, heads, head_dim })
    }

    /// `x [B, N, D]` → `[B, N, 3, H, Dh]`, with q and k RMS-normed per head when the norm is on.
    /// Returns (q, k, v), each `[B, N, H, Dh]` (views when no norm).
    fn forward(&self, x: &Tensor) -> sd3_core::Result<[Tensor; 3]> {
        let (b, n) = (x.dim(0), x.dim(1));
        let qkv = self.qkv.forward(x)?.reshape(&[b, n, 3, self.heads, self.head_dim])?;
        let part = |i: usize| qkv.narrow(2, i, 1).and_then(|t| t.squeeze(2));
        let (mut q, mut k, v) = (part(0)?, part(1)?, part(2)?);
        if let Some(norm) = &self.norm {
            q = q.rms_norm(&norm.q, QK_NORM_EPS)?;
            k = k.rms_norm(&norm.k, QK_NORM_EPS)?;
        }
        Ok([q, k, v])
    }
}

/// `[B, N, H, Dh]` → `[B, H, N, Dh]` (a view).
fn heads_first(t: &Tensor) -> sd3_core::Result<Tensor> {
    t.permute(&[0, 2, 1, 3])
}

/// Attention output `[B, H, N, Dh]`, tokens `start..start+len` → `[B, len, H·Dh]`.
fn merge_heads(o: &Tensor, start: usize, len: usize) -> sd3_core::Result<Tensor> {
    let (b, h, dh) = (o.dim(0), o.dim(1), o.dim(3));
    o.permute(&[0, 2, 1, 3])?.narrow(1, start, len)?.reshape(&[b, len, h * dh])
}

/// The joint attention of a `JointTransformerBlock` (`attn`): image stream `to_q/to_k/to_v/to_out.0`, text stream
/// `add_q_proj/add_k_proj/add_v_proj/to_add_out` (no `to_add_out` in the last, `context_pre_only` block).
pub struct JointAttention {
    image: QkvProjection,
    context: QkvProjection,
    to_out: Linear,
    to_add_out: Option<Linear>,
    scale: f32,
}

impl JointAttention {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        p: &Params,
        prefix: &str,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        context_pre_only: bool,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        let dim = heads * head_dim;
        let image_norm = qk_norm.then_some(["norm_q", "norm_k"]);
        let context_norm = qk_norm.then_some(["norm_added_q", "norm_added_k"]);
        Ok(JointAttention {
            image: QkvProjection::load(
                p,
                prefix,
                ["to_q", "to_k", "to_v"],
                image_norm,
                heads,
                head_dim,
                backend,
                dtype,
            )?,
            context: QkvProjection::load(
                p,
                prefix,
                ["add_q_proj", "add_k_proj", "add_v_proj"],
                context_norm,
                heads,
                head_dim,
                backend,
                dtype,
            )?,
            to_out: Linear::load(p, &format!("{prefix}.to_out.0"), dim, dim, backend, dtype)?,
            to_add_out: if context_pre_only {
                None
            } else {
                Some(Linear::load(p, &format!("{prefix}.to_add_out"), dim, dim, backend, dtype)?)
            },
            scale: (head_dim as f32).powf(-0.5),
        })
    }

    /// `x̂ [B, N, D]`, `ĉ [B, S, D]` → (image output `[B, N, D]`, text output `[B, S, D]` unless context_pre_only).
    pub fn forward(&self, x: &Tensor, c: &Tensor) -> sd3_core::Result<(Tensor, Option<Tensor>)> {
        let (n, s) = (x.dim(1), c.dim(1));
        let [qx, kx, vx] = self.image.forward(x)?;
        let [qc, kc, vc] = self.context.forward(c)?;
        // The concatenation copies anyway, so it writes the head-first layout: contiguous [B, H, N+S, Dh].
        let joint = |a: &Tensor, b: &Tensor| Tensor::cat(&[&heads_first(a)?, &heads_first(b)?], 2);
        let (k, v) = (joint(&kx, &kc)?, joint(&vx, &vc)?);
        let params = AttentionParams::new(self.scale);
        match &self.to_add_out {
            Some(to_add_out) => {
                let q = joint(&qx, &qc)?;
                let o = Tensor::attention(&q, &k, &v, &params)?;
                let ox = self.to_out.forward(&merge_heads(&o, 0, n)?)?;
                let oc = to_add_out.forward(&merge_heads(&o, n, s)?)?;
                Ok((ox, Some(oc)))
            }
            None => {
                // The text output of the last block is discarded: only image tokens need to be queries.
                let o = Tensor::attention(&heads_first(&qx)?, &k, &v, &params)?;
                Ok((self.to_out.forward(&merge_heads(&o, 0, n)?)?, None))
            }
        }
    }
}

/// `attn2` of a dual-attention (MMDiT-X) block: self-attention over image tokens only.
pub struct SelfAttention {
    qkv: QkvProjection,
    to_out: Linear,
    scale: f32,
}

impl SelfAttention {
    pub fn load(
        p: &Params,
        prefix: &str,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        let dim = heads * head_dim;
        let norm = qk_norm.then_some(["norm_q", "norm_k"]);
        Ok(SelfAttention {
            qkv: QkvProjection::load(p, prefix, ["to_q", "to_k", "to_v"], norm, heads, head_dim, backend, dtype)?,
            to_out: Linear::load(p, &format!("{prefix}.to_out.0"), dim, dim, backend, dtype)?,
            scale: (head_dim as f32).powf(-0.5),
        })
    }

    pub fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        let [q, k, v] = self.qkv.forward(x)?;
        let o = Tensor::attention(
            &heads_first(&q)?,
            &heads_first(&k)?,
            &heads_first(&v)?,
            &AttentionParams::new(self.scale),
        )?;
        self.to_out.forward(&merge_heads(&o, 0, x.dim(1))?)
    }
}
