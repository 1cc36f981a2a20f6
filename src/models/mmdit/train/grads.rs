//! Where a training step's gradients go, and the sums the backward needs (over rows, over tokens).

use super::super::block::LN_EPS;
use super::super::params::Linear;
use super::{AdapterGrads, ParamGrads};
use crate::train::grad_ops as g;
use sd3_core::Tensor;
use std::collections::BTreeMap;

/// Where a backward puts its gradients: the adapters', and in a full fine-tuning step every parameter's, with the
/// gradient of `silu(temb)` gathered from every modulation on the way.
pub(crate) struct Grads {
    pub(crate) adapters: AdapterGrads,
    pub(crate) params: Option<ParamGrads>,
    pub(crate) temb_silu: Option<Tensor>,
    /// Whether the modulations' gradients are formed (a full step, or one that wants the text inputs' gradient).
    pub(crate) through_modulations: bool,
}

impl Grads {
    /// Adapters' gradients only.
    pub(crate) fn adapters_only() -> Self {
        Grads { adapters: AdapterGrads::new(), params: None, temb_silu: None, through_modulations: false }
    }

    pub(crate) fn full(&self) -> bool {
        self.params.is_some()
    }

    /// Whether the backward forms the modulation chunks' gradients (into `d silu(temb)`).
    pub(crate) fn modulations(&self) -> bool {
        self.through_modulations
    }

    pub(crate) fn add(map: &mut BTreeMap<String, Tensor>, name: String, g: Tensor) -> sd3_core::Result<()> {
        let g = match map.remove(&name) {
            Some(prev) => prev.add(&g)?,
            None => g,
        };
        map.insert(name, g);
        Ok(())
    }

    /// Adds `g` to parameter `name`'s gradient (full fine-tuning only).
    pub(crate) fn param(&mut self, name: String, g: impl FnOnce() -> sd3_core::Result<Tensor>) -> sd3_core::Result<()> {
        match &mut self.params {
            Some(params) => Self::add(params, name, g()?),
            None => Ok(()),
        }
    }

    /// A frozen-or-trained linear `y = x·Wᵀ + b`: `dW = dyᵀ·x`, `db = Σ dy` under `name.weight`, `name.bias`.
    pub(crate) fn linear(&mut self, name: &str, x: &Tensor, dy: &Tensor, bias: bool) -> sd3_core::Result<()> {
        self.param(format!("{name}.weight"), || g::weight_grad(dy, x))?;
        if bias {
            self.param(format!("{name}.bias"), || column_sum(dy))?;
        }
        Ok(())
    }

    /// The backward of a modulation `emb = linear(silu(temb))` split into chunks `[B, 1, D]`, from each chunk's
    /// gradient (same order): the linear's parameters and `d silu(temb)` (full fine-tuning only).
    pub(crate) fn modulation(
        &mut self,
        linear: &Linear,
        name: &str,
        temb_silu: &Tensor,
        chunks: &[Tensor],
    ) -> sd3_core::Result<()> {
        if !self.through_modulations {
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
pub(crate) fn column_sum(t: &Tensor) -> sd3_core::Result<Tensor> {
    let d = t.dim(t.rank() - 1);
    let rows = t.elem_count() / d.max(1);
    let ones = t.backend().full(&[1, rows], t.dtype(), 1.0)?;
    ones.matmul(&t.contiguous()?.reshape(&[rows, d])?)?.reshape(&[d])
}

/// `Σ` over the tokens: `[B, N, D]` → `[B, 1, D]` (a modulation chunk's shape).
pub(crate) fn token_sum(t: &Tensor) -> sd3_core::Result<Tensor> {
    t.backend().full(&[1, t.dim(1)], t.dtype(), 1.0)?.matmul(t)
}

/// `σ(x)·(1 + x·(1 - σ(x)))`, the derivative of SiLU.
pub(crate) fn silu_derivative(x: &Tensor) -> sd3_core::Result<Tensor> {
    let sig = x.unary(sd3_core::UnaryOp::Sigmoid)?;
    sig.mul(&x.mul(&sig.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)
}

/// `LN(x)` without affine: the normalised input of a modulated norm.
pub(crate) fn normed(x: &Tensor) -> sd3_core::Result<Tensor> {
    x.layer_norm(None, None, LN_EPS)
}

/// The gradients of a modulated norm's `(scale, shift)` from its output's `dy`: `(Σ dy·LN(x), Σ dy)`.
pub(crate) fn modulate_chunks(x: &Tensor, dy: &Tensor) -> sd3_core::Result<(Tensor, Tensor)> {
    Ok((token_sum(&dy.mul(&normed(x)?)?)?, token_sum(dy)?))
}
