//! The PyTorch building blocks the text encoders and the VAE share (`nn.Linear`, `nn.LayerNorm`, `nn.Conv2d`,
//! `nn.GroupNorm`, transformers' `ACT2FN`), each loaded by name and shape through [`crate::weights::Weights`]
//! (so LoRA merging and the loader's error messages apply) and run with `sd3_core::Tensor` ops.

use crate::weights::{Weights, WeightsError};
use sd3_core::{Backend, DType, Tensor};
use std::cell::RefCell;
use std::path::Path;

/// A semantic problem in `dir/config.json` (an unsupported activation, inconsistent sizes).
pub fn config_error(dir: &Path, reason: impl Into<String>) -> WeightsError {
    WeightsError::Config { path: dir.join("config.json"), reason: reason.into() }
}

/// Where a model's parameters come from, and the backend and dtype they are uploaded in.
///
/// Every request is logged by name and shape, so a model can say exactly which tensors it loads. A *dry run*
/// ([`Loader::dry_run`]) has no weights: it only logs, handing back a one-element placeholder for each tensor;
/// that is how `expected_tensors` tables for the published checkpoints are derived from the loading code itself.
pub struct Loader<'a> {
    weights: Option<&'a Weights>,
    backend: Backend,
    pub dtype: DType,
    log: RefCell<Vec<(String, Vec<usize>)>>,
}

impl<'a> Loader<'a> {
    pub fn new(weights: &'a Weights, backend: &Backend, dtype: DType) -> Self {
        Loader { weights: Some(weights), backend: backend.clone(), dtype, log: RefCell::default() }
    }

    /// A loader with no weights behind it, on the CPU backend: see the type's docs.
    pub fn dry_run() -> Loader<'static> {
        let backend = Backend::new("cpu", sd3_backend_cpu::cpu_device());
        Loader { weights: None, backend, dtype: DType::F32, log: RefCell::default() }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Whether the weights hold `name` (false in a dry run).
    pub fn contains(&self, name: &str) -> bool {
        self.weights.is_some_and(|w| w.contains(name))
    }

    /// The tensor `name`, which must have `shape`, in the loader's dtype.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor, WeightsError> {
        self.tensor_as(name, shape, self.dtype)
    }

    /// The tensor `name`, which must have `shape`, in `dtype`.
    pub fn tensor_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor, WeightsError> {
        self.log.borrow_mut().push((name.to_string(), shape.to_vec()));
        match self.weights {
            Some(w) => w.tensor_checked(name, shape, &self.backend, dtype),
            None => {
                self.backend.zeros(&[1], dtype).map_err(|source| WeightsError::Upload { name: name.into(), source })
            }
        }
    }

    /// Every `(name, shape)` requested so far, in order.
    pub fn requested(&self) -> Vec<(String, Vec<usize>)> {
        self.log.borrow().clone()
    }
}

/// `nn.Linear(in, out, bias)`: weight `[out, in]`.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(l: &Loader, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self, WeightsError> {
        Self::load_as(l, prefix, in_dim, out_dim, bias, l.dtype)
    }

    pub fn load_as(
        l: &Loader,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        dtype: DType,
    ) -> Result<Self, WeightsError> {
        let weight = l.tensor_as(&format!("{prefix}.weight"), &[out_dim, in_dim], dtype)?;
        let bias = if bias { Some(l.tensor_as(&format!("{prefix}.bias"), &[out_dim], dtype)?) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// `nn.LayerNorm(dim, eps)` with affine weight and bias.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(l: &Loader, prefix: &str, dim: usize, eps: f32) -> Result<Self, WeightsError> {
        let weight = l.tensor(&format!("{prefix}.weight"), &[dim])?;
        let bias = l.tensor(&format!("{prefix}.bias"), &[dim])?;
        Ok(LayerNorm { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        x.layer_norm(Some(&self.weight), Some(&self.bias), self.eps)
    }
}

/// `nn.Conv2d(in, out, kernel, stride=1, padding, bias=True)`: weight `[out, in, k, k]`.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub padding: usize,
}

impl Conv2d {
    pub fn load(l: &Loader, prefix: &str, in_ch: usize, out_ch: usize, kernel: usize) -> Result<Self, WeightsError> {
        let weight = l.tensor(&format!("{prefix}.weight"), &[out_ch, in_ch, kernel, kernel])?;
        let bias = l.tensor(&format!("{prefix}.bias"), &[out_ch])?;
        // Every conv of the VAE decoder is "same" padded: 3×3 with padding 1, 1×1 with padding 0.
        Ok(Conv2d { weight, bias, padding: kernel / 2 })
    }

    pub fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        x.conv2d(&self.weight, Some(&self.bias), 1, self.padding)
    }
}

/// `nn.GroupNorm(groups, channels, eps, affine=True)`.
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    pub fn load(l: &Loader, prefix: &str, groups: usize, channels: usize, eps: f32) -> Result<Self, WeightsError> {
        let weight = l.tensor(&format!("{prefix}.weight"), &[channels])?;
        let bias = l.tensor(&format!("{prefix}.bias"), &[channels])?;
        Ok(GroupNorm { weight, bias, groups, eps })
    }

    pub fn forward(&self, x: &Tensor) -> sd3_core::Result<Tensor> {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps)
    }
}

/// The activations of transformers' `ACT2FN` that CLIP and T5 configs name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x·σ(1.702x)` (OpenAI CLIP).
    QuickGelu,
    /// `gelu`: the exact, erf form (OpenCLIP bigG).
    GeluErf,
    /// `gelu_new` / `gelu_pytorch_tanh` / `gelu_fast`: the tanh approximation (T5 v1.1).
    GeluTanh,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    /// The activation transformers' `ACT2FN[name]` gives, if supported.
    pub fn from_name(name: &str) -> Option<Activation> {
        Some(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    pub fn forward(self, x: &Tensor) -> sd3_core::Result<Tensor> {
        match self {
            Activation::QuickGelu => x.quick_gelu(),
            Activation::GeluErf => x.gelu_erf(),
            Activation::GeluTanh => x.gelu_tanh(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}

/// `[B, N, H·Dh]` → the `[B, H, N, Dh]` view attention takes (no copy).
pub fn split_heads(x: &Tensor, heads: usize) -> sd3_core::Result<Tensor> {
    let (b, n, d) = (x.dim(0), x.dim(1), x.dim(2));
    x.reshape(&[b, n, heads, d / heads])?.permute(&[0, 2, 1, 3])
}

/// `[B, H, N, Dh]` → `[B, N, H·Dh]` (one copy).
pub fn merge_heads(x: &Tensor) -> sd3_core::Result<Tensor> {
    let (b, h, n, dh) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    x.permute(&[0, 2, 1, 3])?.reshape(&[b, n, h * dh])
}
