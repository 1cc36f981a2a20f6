//! `JointTransformerBlock` (diffusers `attention.py`) with its norms (`normalization.py`): `AdaLayerNormZero`
//! (6-way), `SD35AdaLayerNormZeroX` (9-way, dual-attention blocks), `AdaLayerNormContinuous` (last block's context
//! norm and `norm_out`, chunks **(scale, shift)**), and `FeedForward` (`gelu-approximate`).

use super::attention::{JointAttention, SelfAttention};
use super::parallel::{Comm, RowParallelLinear, Shard};
use super::params::{Linear, Params};
use super::MmditError;
use sd3_core::{Backend, DType, PreparedCall, Tensor, UnaryOp};

pub const LN_EPS: f32 = 1e-6;

/// `emb = linear(silu(temb))` `[B, k·D]` split into k views `[B, 1, D]` (broadcast over tokens).
pub(super) fn modulation(linear: &Linear, temb_silu: &Tensor, k: usize) -> sd3_core::Result<Vec<Tensor>> {
    let emb = linear.forward(temb_silu)?;
    emb.chunk(k, 1)?.into_iter().map(|c| c.unsqueeze(1)).collect()
}

/// `AdaLayerNormContinuous(D, D, elementwise_affine=False, eps=1e-6)`: `LN(x)·(1+scale)+shift`, (scale, shift) order.
pub struct AdaLayerNormContinuous {
    pub(super) linear: Linear,
}

impl AdaLayerNormContinuous {
    pub fn load(p: &Params, name: &str, dim: usize, backend: &Backend, dtype: DType) -> Result<Self, MmditError> {
        Ok(AdaLayerNormContinuous { linear: Linear::load(p, &format!("{name}.linear"), dim, 2 * dim, backend, dtype)? })
    }
    pub fn forward(&self, x: &Tensor, temb_silu: &Tensor) -> sd3_core::Result<Tensor> {
        let m = modulation(&self.linear, temb_silu, 2)?;
        let (scale, shift) = (&m[0], &m[1]);
        x.layer_norm_modulate(scale, shift, LN_EPS)
    }
}

/// `FeedForward(D, D, activation_fn="gelu-approximate")`: `net.0.proj` (D→4D), GELU(tanh), `net.2` (4D→D).
/// The GELU is the epilogue of the first matmul (`Op::Matmul { act }`), not a pass of its own. A tensor-parallel
/// rank holds hidden units `shard.range(4D)`.
pub struct FeedForward {
    pub(super) proj_in: Linear,
    pub(super) proj_out: RowParallelLinear,
}

impl FeedForward {
    pub fn load(
        p: &Params,
        name: &str,
        dim: usize,
        shard: Shard,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        let proj_in = format!("{name}.net.0.proj");
        let proj_in = match shard.size {
            1 => Linear::load(p, &proj_in, dim, 4 * dim, backend, dtype)?,
            _ => Linear::load_fused_rows(p, &[proj_in], dim, 4 * dim, shard.range(4 * dim), backend, dtype)?,
        };
        Ok(FeedForward {
            proj_in,
            proj_out: RowParallelLinear::load(p, &format!("{name}.net.2"), 4 * dim, dim, shard, backend, dtype)?,
        })
    }
    pub fn forward(&self, x: &Tensor, comm: &Comm) -> sd3_core::Result<Tensor> {
        self.down(&self.up(x)?, comm)
    }
    /// `GELU(net.0.proj(x))`, the hidden activations (this rank's units).
    pub fn up(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        self.proj_in.forward_act(x, UnaryOp::GeluTanh)
    }
    /// `net.2(h)`, summed over the group.
    pub fn down(&self, h: &Tensor, comm: &Comm) -> sd3_core::Result<Tensor> {
        self.proj_out.forward(h, comm)
    }
    /// [`Self::down_gated_residual`] as one fused call ready to run, where the device takes it.
    pub fn prepare_down_gated_residual(
        &self,
        h: &Tensor,
        residual: &Tensor,
        gate: &Tensor,
        comm: &Comm,
    ) -> sd3_core::Result<Option<PreparedCall>> {
        self.proj_out.prepare_gated_residual(h, residual, gate, comm)
    }
    /// `residual + gate·net.2(h)`, the block's gated residual fused into the projection where the device can.
    pub fn down_gated_residual(
        &self,
        h: &Tensor,
        residual: &Tensor,
        gate: &Tensor,
        comm: &Comm,
    ) -> sd3_core::Result<Tensor> {
        self.proj_out.forward_gated_residual(h, residual, gate, comm)
    }
}

/// The text stream's half of a block that is not the last one.
pub(super) struct ContextStream {
    pub(super) norm1: Linear, // AdaLayerNormZero: 6 chunks
    pub(super) ff: FeedForward,
}

pub struct JointTransformerBlock {
    /// `norm1.linear`: 6·D outputs, or 9·D for a dual-attention block.
    pub(super) norm1: Linear,
    pub(super) attn: JointAttention,
    pub(super) attn2: Option<SelfAttention>,
    pub(super) ff: FeedForward,
    /// `None` in the last block, whose context norm is [`AdaLayerNormContinuous`] and whose text output is dropped.
    pub(super) context: Option<ContextStream>,
    pub(super) context_norm_last: Option<AdaLayerNormContinuous>,
}

/// Shapes the block needs to load.
#[derive(Clone, Copy, Debug)]
pub struct BlockSpec {
    pub heads: usize,
    pub head_dim: usize,
    pub qk_norm: bool,
    pub dual: bool,
    pub last: bool,
    /// The slice of the block a tensor-parallel rank holds ([`Shard::WHOLE`] on one device).
    pub shard: Shard,
}

impl JointTransformerBlock {
    pub fn load(p: &Params, prefix: &str, s: BlockSpec, backend: &Backend, dtype: DType) -> Result<Self, MmditError> {
        let dim = s.heads * s.head_dim;
        let chunks = if s.dual { 9 } else { 6 };
        let attn = JointAttention::load(
            p,
            &format!("{prefix}.attn"),
            s.heads,
            s.head_dim,
            s.qk_norm,
            s.last,
            s.shard,
            backend,
            dtype,
        )?;
        let attn2 = if s.dual {
            Some(SelfAttention::load(
                p,
                &format!("{prefix}.attn2"),
                s.heads,
                s.head_dim,
                s.qk_norm,
                s.shard,
                backend,
                dtype,
            )?)
        } else {
            None
        };
        let (context, context_norm_last) = if s.last {
            (None, Some(AdaLayerNormContinuous::load(p, &format!("{prefix}.norm1_context"), dim, backend, dtype)?))
        } else {
            let ctx = ContextStream {
                norm1: Linear::load(p, &format!("{prefix}.norm1_context.linear"), dim, 6 * dim, backend, dtype)?,
                ff: FeedForward::load(p, &format!("{prefix}.ff_context"), dim, s.shard, backend, dtype)?,
            };
            (Some(ctx), None)
        };
        Ok(JointTransformerBlock {
            norm1: Linear::load(p, &format!("{prefix}.norm1.linear"), dim, chunks * dim, backend, dtype)?,
            attn,
            attn2,
            ff: FeedForward::load(p, &format!("{prefix}.ff"), dim, s.shard, backend, dtype)?,
            context,
            context_norm_last,
        })
    }

    /// `(c, x) → (c', x')`; `c'` is `None` after the last block.
    ///
    /// The two streams' ops are issued in pairs (image, then text) of the same step: the text stream's are small
    /// (333 tokens against 4096 at 1024²), and a device that runs independent work side by side (the Vulkan
    /// plugin puts no barrier between dispatches that share no bytes) then runs them beside the image stream's.
    ///
    /// A tensor-parallel rank runs its slice and sums the attention and MLP outputs over `comm`.
    pub fn forward(
        &self,
        x: &Tensor,
        c: &Tensor,
        temb_silu: &Tensor,
        comm: &Comm,
    ) -> sd3_core::Result<(Option<Tensor>, Tensor)> {
        let n = if self.attn2.is_some() { 9 } else { 6 };
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (, shift_msa2, scale_msa2, gate_msa2)
        let m = modulation(&self.norm1, temb_silu, n)?;
        let cm = match &self.context {
            Some(ctx) => Some(modulation(&ctx.norm1, temb_silu, 6)?),
            None => None,
        };
        let x_hat = x.layer_norm_modulate(&m[1], &m[0], LN_EPS)?;
        let c_hat = match (&cm, &self.context_norm_last) {
            (Some(cm), _) => c.layer_norm_modulate(&cm[1], &cm[0], LN_EPS)?,
            (None, Some(norm)) => norm.forward(c, temb_silu)?,
            (None, None) => unreachable!("a block has one of the two context norms"),
        };
        // Dual blocks: x̂2 = LN(x)·(1+scale_msa2)+shift_msa2, from the block's input.
        let x_hat2 = if self.attn2.is_some() { Some(x.layer_norm_modulate(&m[7], &m[6], LN_EPS)?) } else { None };
        // The attention's output projections with the gated residuals as their epilogue (where the device fuses it).
        let context = cm.as_ref().map(|cm| (c, &cm[2]));
        let (mut x, c) = self.attn.forward_gated_residual(&x_hat, &c_hat, (x, &m[2]), context, comm)?;
        if let (Some(attn2), Some(x_hat2)) = (&self.attn2, &x_hat2) {
            // Image-only self-attention, added after the joint-attention residual, before the MLP.
            x = x.gated_residual(&m[8], &attn2.forward(x_hat2, comm)?)?;
        }
        let x_ff = x.layer_norm_modulate(&m[4], &m[3], LN_EPS)?;
        let (Some(ctx), Some(cm), Some(c)) = (&self.context, &cm, c) else {
            return Ok((None, self.ff.down_gated_residual(&self.ff.up(&x_ff)?, &x, &m[5], comm)?));
        };
        let c_ff = c.layer_norm_modulate(&cm[4], &cm[3], LN_EPS)?;
        let (h_x, h_c) = (self.ff.up(&x_ff)?, ctx.ff.up(&c_ff)?);
        let fused_x = self.ff.prepare_down_gated_residual(&h_x, &x, &m[5], comm)?;
        if let (Some(fx), Some(fc)) = (fused_x, ctx.ff.prepare_down_gated_residual(&h_c, &c, &cm[5], comm)?) {
            let x = fx.run()?;
            return Ok((Some(fc.run()?), x));
        }
        // Unfused: both down projections, then both residuals, so that the projections run side by side.
        let (f_x, f_c) = (self.ff.down(&h_x, comm)?, ctx.ff.down(&h_c, comm)?);
        Ok((Some(c.gated_residual(&cm[5], &f_c)?), x.gated_residual(&m[5], &f_x)?))
    }
}
