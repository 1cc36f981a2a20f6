//! `Attention` with `JointAttnProcessor2_0` (diffusers `attention_processor.py`), written on the fused ops.
//!
//! q/k/v projections of a stream are fused into one linear (`[3D, D]`). Joint attention concatenates **image
//! tokens first**, then text, along the sequence; here that concatenation costs nothing: both streams' projections
//! write their rows of one joint buffer `[B, N+S, 3, H, Dh]` (image rows `0..N`, text rows `N..N+S`), and q, k, v
//! are strided views `[B, H, N+S, Dh]` of it (token stride `3·H·Dh`). Attention writes its output through a
//! heads-first view of a `[B, N+S, H, Dh]` buffer, so merging the heads back is a view too: rows `0..N` feed
//! `to_out`, rows `N..N+S` `to_add_out`. A device that cannot read such views gets contiguous copies from the
//! core's legalisation, never a host round trip.

use super::parallel::{Comm, RowParallelLinear, Shard};
use super::params::{Linear, Params};
use super::MmditError;
use sd3_core::{AttentionParams, Backend, DType, PreparedCall, Tensor};

pub const QK_NORM_EPS: f32 = 1e-6;

/// Per-head RMS norm weights `[Dh]` of q and k (`norm_q`, `norm_k` or `norm_added_q`, `norm_added_k`).
pub struct QkNorm {
    pub(super) q: Tensor,
    pub(super) k: Tensor,
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
    pub(super) qkv: Linear,
    pub(super) norm: Option<QkNorm>,
    pub(super) heads: usize,
    pub(super) head_dim: usize,
}

impl QkvProjection {
    /// A tensor-parallel rank holds heads `shard.range(heads)` (q, k and v of each).
    #[allow(clippy::too_many_arguments)]
    fn load(
        p: &Params,
        prefix: &str,
        names: [&str; 3],
        norms: Option<[&str; 2]>,
        heads: usize,
        head_dim: usize,
        shard: Shard,
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
        let local = shard.range(heads);
        let rows = local.start * head_dim..local.end * head_dim;
        let qkv = Linear::load_fused_rows(p, &full, dim, dim, rows, backend, dtype)?;
        Ok(QkvProjection { qkv, norm, heads: local.len(), head_dim })
    }

    /// `x [B, N, D]` → q, k, v views `[B, N, H, Dh]` of a fresh `[B, N, 3, H, Dh]` buffer, q and k RMS-normed per
    /// head (into buffers of their own) when the norm is on.
    fn forward(&self, x: &Tensor) -> sd3_core::Result<[Tensor; 3]> {
        let [mut q, mut k, v] = split_qkv(&self.qkv.forward(x)?, self.heads, self.head_dim)?;
        if let Some(norm) = &self.norm {
            q = q.rms_norm(&norm.q, QK_NORM_EPS)?;
            k = k.rms_norm(&norm.k, QK_NORM_EPS)?;
        }
        Ok([q, k, v])
    }

    /// `x [B, n, D]` projected into `out`, rows of the joint buffer `[B, n, 3·D]` (a strided view).
    fn project_into(&self, x: &Tensor, out: &Tensor) -> sd3_core::Result<()> {
        self.qkv.forward_into(x, out)
    }
}

/// `[B, N, H, Dh]` → `[B, H, N, Dh]` (a view).
fn heads_first(t: &Tensor) -> sd3_core::Result<Tensor> {
    t.permute(&[0, 2, 1, 3])
}

/// `[B, N, H, Dh]` views q, k, v of a `[B, N, 3, H, Dh]` buffer.
fn split_qkv(qkv: &Tensor, heads: usize, head_dim: usize) -> sd3_core::Result<[Tensor; 3]> {
    let (b, n) = (qkv.dim(0), qkv.dim(1));
    let qkv = qkv.reshape(&[b, n, 3, heads, head_dim])?;
    let part = |i: usize| qkv.narrow(2, i, 1).and_then(|t| t.squeeze(2));
    Ok([part(0)?, part(1)?, part(2)?])
}

/// The joint attention of a `JointTransformerBlock` (`attn`): image stream `to_q/to_k/to_v/to_out.0`, text stream
/// `add_q_proj/add_k_proj/add_v_proj/to_add_out` (no `to_add_out` in the last, `context_pre_only` block).
pub struct JointAttention {
    pub(super) image: QkvProjection,
    pub(super) context: QkvProjection,
    pub(super) to_out: RowParallelLinear,
    pub(super) to_add_out: Option<RowParallelLinear>,
    pub(super) scale: f32,
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
        shard: Shard,
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
                shard,
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
                shard,
                backend,
                dtype,
            )?,
            to_out: RowParallelLinear::load(p, &format!("{prefix}.to_out.0"), dim, dim, shard, backend, dtype)?,
            to_add_out: if context_pre_only {
                None
            } else {
                Some(RowParallelLinear::load(p, &format!("{prefix}.to_add_out"), dim, dim, shard, backend, dtype)?)
            },
            scale: (head_dim as f32).powf(-0.5),
        })
    }

    /// `x̂ [B, N, D]`, `ĉ [B, S, D]` and each stream's residual and gate → `(x + gate_x·to_out(o_x), c +
    /// gate_c·to_add_out(o_c))`, `[B, N, D]` and `[B, S, D]`, the second only with `context` (not in the last,
    /// context_pre_only block). The gated residuals are the projections' epilogue where the device fuses them
    /// ([`Tensor::linear_gated_residual`]). A tensor-parallel rank attends over its heads and sums the output
    /// projections over `comm` before the residuals.
    pub fn forward_gated_residual(
        &self,
        x_hat: &Tensor,
        c_hat: &Tensor,
        (x, gate_x): (&Tensor, &Tensor),
        context: Option<(&Tensor, &Tensor)>,
        comm: &Comm,
    ) -> sd3_core::Result<(Tensor, Option<Tensor>)> {
        let (o, n, s) = self.attend(x_hat, c_hat)?;
        let o_x = o.narrow(1, 0, n)?;
        let text = match (&self.to_add_out, context) {
            (Some(to_add_out), Some((c, gate_c))) => Some((to_add_out, o.narrow(1, n, s)?, c, gate_c)),
            _ => None,
        };
        let fused_x = self.to_out.prepare_gated_residual(&o_x, x, gate_x, comm)?;
        let fused_c = match &text {
            Some((p, o_c, c, gate_c)) => p.prepare_gated_residual(o_c, c, gate_c, comm)?.map(Some),
            None => Some(None),
        };
        if let (Some(fx), Some(fc)) = (fused_x, fused_c) {
            let x = fx.run()?;
            return Ok((x, fc.map(PreparedCall::run).transpose()?));
        }
        // Unfused: both streams' projections, then both residuals, so that the projections run side by side.
        let a_x = self.to_out.forward(&o_x, comm)?;
        let a_c = match &text {
            Some((p, o_c, ..)) => Some(p.forward(o_c, comm)?),
            None => None,
        };
        let x = x.gated_residual(gate_x, &a_x)?;
        let c = match (&text, a_c) {
            (Some((_, _, c, gate_c)), Some(a_c)) => Some(c.gated_residual(gate_c, &a_c)?),
            _ => None,
        };
        Ok((x, c))
    }

    /// The joint attention before the output projections: `o [B, Nq, D]` (this rank's heads) with N and S.
    fn attend(&self, x: &Tensor, c: &Tensor) -> sd3_core::Result<(Tensor, usize, usize)> {
        let (b, n, s) = (x.dim(0), x.dim(1), c.dim(1));
        let (h, dh) = (self.image.heads, self.image.head_dim);
        let (d, t) = (h * dh, n + s);
        let backend = x.backend();
        // The joint q/k/v buffer: each stream's projection writes its own rows.
        let qkv = backend.empty(&[b, t, 3 * d], x.dtype())?;
        self.image.project_into(x, &qkv.narrow(1, 0, n)?)?;
        self.context.project_into(c, &qkv.narrow(1, n, s)?)?;
        let [mut q, mut k, v] = split_qkv(&qkv, h, dh)?;
        // The last block's text queries are never used: only image tokens are queries there.
        let nq = if self.to_add_out.is_some() { t } else { n };
        if let (Some(image_norm), Some(context_norm)) = (&self.image.norm, &self.context.norm) {
            let normed =
                |src: &Tensor, rows: usize, w_image: &Tensor, w_context: &Tensor| -> sd3_core::Result<Tensor> {
                    let out = backend.empty(&[b, rows, h, dh], x.dtype())?;
                    src.narrow(1, 0, n)?.rms_norm_into(w_image, QK_NORM_EPS, &out.narrow(1, 0, n)?)?;
                    if rows > n {
                        src.narrow(1, n, s)?.rms_norm_into(w_context, QK_NORM_EPS, &out.narrow(1, n, s)?)?;
                    }
                    Ok(out)
                };
            q = normed(&q, nq, &image_norm.q, &context_norm.q)?;
            k = normed(&k, t, &image_norm.k, &context_norm.k)?;
        }
        let q = q.narrow(1, 0, nq)?;
        // Output tokens-first, written through a heads-first view: merging the heads is then a view.
        let o = backend.empty(&[b, nq, h, dh], x.dtype())?;
        let params = AttentionParams::new(self.scale);
        Tensor::attention_into(&heads_first(&q)?, &heads_first(&k)?, &heads_first(&v)?, &params, &heads_first(&o)?)?;
        Ok((o.reshape(&[b, nq, d])?, n, s))
    }
}

/// `attn2` of a dual-attention (MMDiT-X) block: self-attention over image tokens only.
pub struct SelfAttention {
    pub(super) qkv: QkvProjection,
    pub(super) to_out: RowParallelLinear,
    pub(super) scale: f32,
}

impl SelfAttention {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        p: &Params,
        prefix: &str,
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        shard: Shard,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        let dim = heads * head_dim;
        let norm = qk_norm.then_some(["norm_q", "norm_k"]);
        let names = ["to_q", "to_k", "to_v"];
        Ok(SelfAttention {
            qkv: QkvProjection::load(p, prefix, names, norm, heads, head_dim, shard, backend, dtype)?,
            to_out: RowParallelLinear::load(p, &format!("{prefix}.to_out.0"), dim, dim, shard, backend, dtype)?,
            scale: (head_dim as f32).powf(-0.5),
        })
    }

    pub fn forward(&self, x: &Tensor, comm: &Comm) -> sd3_core::Result<Tensor> {
        let [q, k, v] = self.qkv.forward(x)?;
        let (b, n) = (x.dim(0), x.dim(1));
        let o = x.backend().empty(&[b, n, self.qkv.heads, self.qkv.head_dim], x.dtype())?;
        let params = AttentionParams::new(self.scale);
        Tensor::attention_into(&heads_first(&q)?, &heads_first(&k)?, &heads_first(&v)?, &params, &heads_first(&o)?)?;
        self.to_out.forward(&o.reshape(&[b, n, self.qkv.heads * self.qkv.head_dim])?, comm)
    }
}
