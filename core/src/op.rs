//! The op set: what a backend is asked to compute. Each op's exact semantics is in `docs/ops.md`; the
//! reference implementation is [`crate::reference`].
//!
//! An op is *data*: an [`Op`] (kind and parameters) plus input and output [`TensorDesc`]s. Inputs and outputs
//! never overlap. Outputs may be strided views (e.g. a slice of a larger buffer, which is how concat works).
//! Broadcasting is resolved by the core before a backend sees an op: broadcast inputs arrive with the output's
//! rank and stride 0 in the broadcast dimensions.
//!
//! ABI: [`Op::encode`] / [`Op::decode`] map an op to the C descriptor (`kind`, `sub`, `iparams`, `fparams`).
//! Kind ids are stable (`SD3_OP_*` in the C header): never renumber, only append.

use crate::TensorDesc;

/// Elementwise functions of one argument.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg = 0,
    Exp = 1,
    Log = 2,
    Sqrt = 3,
    Rsqrt = 4,
    Recip = 5,
    Square = 6,
    Abs = 7,
    Tanh = 8,
    Sigmoid = 9,
    Relu = 10,
    /// SiLU: `x·σ(x)`.
    Silu = 11,
    /// GELU with erf: `0.5·x·(1+erf(x/√2))`.
    GeluErf = 12,
    /// GELU, tanh approximation: `0.5·x·(1+tanh(√(2/π)·(x+0.044715·x³)))`.
    GeluTanh = 13,
    /// Quick-GELU (CLIP): `x·σ(1.702·x)`.
    QuickGelu = 14,
    Sin = 15,
    Cos = 16,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 17] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Square,
        UnaryOp::Abs,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Silu,
        UnaryOp::GeluErf,
        UnaryOp::GeluTanh,
        UnaryOp::QuickGelu,
        UnaryOp::Sin,
        UnaryOp::Cos,
    ];
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Square => "square",
            UnaryOp::Abs => "abs",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::Silu => "silu",
            UnaryOp::GeluErf => "gelu_erf",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::QuickGelu => "quick_gelu",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
        }
    }
    pub fn from_id(id: u32) -> Option<UnaryOp> {
        UnaryOp::ALL.into_iter().find(|u| *u as u32 == id)
    }
}

/// Elementwise functions of two arguments (with broadcasting).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
    Max = 4,
    Min = 5,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 6] =
        [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min];
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
        }
    }
    pub fn from_id(id: u32) -> Option<BinaryOp> {
        BinaryOp::ALL.into_iter().find(|b| *b as u32 == id)
    }
}

/// One kernel op with its parameters. Inputs and outputs are listed per variant: `in: a, b; out: y`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// Copy with optional dtype conversion (cast). `in: x; out: y` (same shape, any strides).
    Copy,
    /// Set every element of the output to `value`. `out: y`.
    Fill { value: f32 },
    /// `in: x; out: y = f(x)` (same shape).
    Unary(UnaryOp),
    /// `in: a, b; out: y = a ∘ b` (a, b already broadcast to y's shape).
    Binary(BinaryOp),
    /// The scale op: `in: x; out: y = x·mul + add`.
    Affine { mul: f32, add: f32 },
    /// Batched matrix product with f32 accumulation. `in: a [.., M, K], b [.., K, N], bias [N] (if bias);
    /// out: y [.., M, N] = act(a·b (+ bias))`. Batch dims of a and b are already broadcast to y's.
    /// Each matrix of a and b has unit stride in one of its two last dims (row- or column-major).
    /// `act` is an optional elementwise epilogue (e.g. GELU after a feed-forward projection), applied to the f32
    /// accumulator before rounding; a device that declines it gets the matmul and a separate unary op instead.
    Matmul { bias: bool, act: Option<UnaryOp> },
    /// A linear with the MM-DiT's gated residual as its epilogue (ABI 1.2):
    /// `in: a [.., M, K], b [.., K, N], bias [N] (if bias), x [.., M, N], gate [.., M, N]; out: y = x + gate·(a·b
    /// (+ bias))`, the product in f32 and rounded once. `gate` is usually a broadcast view (one row per sample).
    /// A device that declines it gets the matmul into a temporary and a [`Op::GatedResidual`] from it.
    MatmulGatedResidual { bias: bool },
    /// Softmax over the last dim. `in: x; out: y`.
    Softmax,
    /// Layer norm over the last dim (biased variance). `in: x, weight [D], bias [D] (if affine); out: y`.
    LayerNorm { eps: f32, affine: bool },
    /// RMS norm over the last dim: `x / sqrt(mean(x²) + eps) · weight`. `in: x, weight [D]; out: y`.
    RmsNorm { eps: f32 },
    /// Fused adaLN: `in: x, scale, shift; out: y = LN(x)·(1 + scale) + shift` (LN without affine over the last dim).
    LayerNormModulate { eps: f32 },
    /// `in: x, scale, shift; out: y = x·(1 + scale) + shift`.
    Modulate,
    /// `in: x, gate, r; out: y = x + gate·r`.
    GatedResidual,
    /// Fused multi-head attention, never materialising more than a tile of scores.
    /// `in: q [B,H,Nq,Dh], k [B,H,Nk,Dh], v [B,H,Nk,Dv], bias [B,H,Nq,Nk] (if bias; broadcast),
    /// q_norm [Dh], k_norm [Dh] (if qk_norm); out: o [B,H,Nq,Dv]`.
    /// `o = softmax(scale · q̃·k̃ᵀ + bias + causal_mask) · v`, where q̃, k̃ are RMS-normed per head when qk_norm.
    Attention { scale: f32, causal: bool, bias: bool, qk_norm: bool, norm_eps: f32 },
    /// The gradients of a self-attention's plain form (no bias, no q/k norm), for training (ABI 1.3):
    /// `in: q, k, v, o, do, each [B,H,N,D]; out: [3,B,H,N,D] = (dq, dk, dv)`, where `o` is the forward's output
    /// and `do` the loss's gradient with respect to it. With `P = softmax(scale·q·kᵀ + causal_mask)`:
    /// `dv = Pᵀ·do`, `dS = P ∘ (do·vᵀ − rowsum(do ∘ o))`, `dq = scale·dS·k`, `dk = scale·dSᵀ·q`. A fused kernel
    /// recomputes `P` tile by tile instead of storing it; callers fall back to the same products as separate ops
    /// where a device declines it ([`crate::Backend::supports`]).
    AttentionBackward { scale: f32, causal: bool },
    /// 2-D convolution (NCHW, OIHW, dilation 1, groups 1). `in: x [N,C,H,W], w [O,C,KH,KW], bias [O] (if bias);
    /// out: y [N,O,OH,OW]`.
    Conv2d { stride: [usize; 2], padding: [usize; 2], bias: bool },
    /// Group norm over (C/groups, H, W...). `in: x [N,C,...], weight [C], bias [C] (if affine); out: y`.
    GroupNorm { groups: usize, eps: f32, affine: bool },
    /// Nearest-neighbour upsampling of the last two dims by an integer factor. `in: x [N,C,H,W]; out: y [N,C,H·f,W·f]`.
    UpsampleNearest2d { factor: usize },
    /// Row gather (embedding lookup). `in: table [V, D], ids [N] (i32 or i64); out: y [N, D]`.
    /// An id outside `0..V` is an error.
    Gather,
}

/// Stable op kind ids (`SD3_OP_*`).
pub mod kind {
    pub const COPY: u32 = 0;
    pub const FILL: u32 = 1;
    pub const UNARY: u32 = 2;
    pub const BINARY: u32 = 3;
    pub const AFFINE: u32 = 4;
    pub const MATMUL: u32 = 5;
    pub const SOFTMAX: u32 = 6;
    pub const LAYER_NORM: u32 = 7;
    pub const RMS_NORM: u32 = 8;
    pub const LAYER_NORM_MODULATE: u32 = 9;
    pub const MODULATE: u32 = 10;
    pub const GATED_RESIDUAL: u32 = 11;
    pub const ATTENTION: u32 = 12;
    pub const CONV2D: u32 = 13;
    pub const GROUP_NORM: u32 = 14;
    pub const UPSAMPLE_NEAREST2D: u32 = 15;
    pub const GATHER: u32 = 16;
    pub const MATMUL_GATED_RESIDUAL: u32 = 17;
    pub const ATTENTION_BACKWARD: u32 = 18;
    /// One past the largest kind id this version knows.
    pub const COUNT: u32 = 19;
}

/// An op in its ABI form: the fields of `sd3_op_desc` other than the operands.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EncodedOp {
    pub kind: u32,
    pub sub: u32,
    pub iparams: [i64; 8],
    pub fparams: [f32; 8],
}

impl Op {
    /// A matmul without an activation epilogue.
    pub fn matmul(bias: bool) -> Op {
        Op::Matmul { bias, act: None }
    }

    /// Short name used in reports: `matmul`, `matmul.gelu_tanh`, `unary.silu`, ...
    pub fn name(&self) -> String {
        match self {
            Op::Unary(u) => format!("unary.{}", u.name()),
            Op::Matmul { act: Some(u), .. } => format!("matmul.{}", u.name()),
            Op::Binary(b) => format!("binary.{}", b.name()),
            other => other.kind_name().to_string(),
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self {
            Op::Copy => "copy",
            Op::Fill { .. } => "fill",
            Op::Unary(_) => "unary",
            Op::Binary(_) => "binary",
            Op::Affine { .. } => "affine",
            Op::Matmul { .. } => "matmul",
            Op::MatmulGatedResidual { .. } => "matmul_gated_residual",
            Op::Softmax => "softmax",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::LayerNormModulate { .. } => "layer_norm_modulate",
            Op::Modulate => "modulate",
            Op::GatedResidual => "gated_residual",
            Op::Attention { .. } => "attention",
            Op::AttentionBackward { .. } => "attention_backward",
            Op::Conv2d { .. } => "conv2d",
            Op::GroupNorm { .. } => "group_norm",
            Op::UpsampleNearest2d { .. } => "upsample_nearest2d",
            Op::Gather => "gather",
        }
    }

    /// Number of inputs this op takes (depends on its flags).
    pub fn n_inputs(&self) -> usize {
        match *self {
            Op::Copy | Op::Unary(_) | Op::Affine { .. } | Op::Softmax | Op::UpsampleNearest2d { .. } => 1,
            Op::Fill { .. } => 0,
            Op::Binary(_) | Op::RmsNorm { .. } | Op::Gather => 2,
            Op::Matmul { bias, .. } => 2 + bias as usize,
            Op::MatmulGatedResidual { bias } => 4 + bias as usize,
            Op::LayerNorm { affine, .. } | Op::GroupNorm { affine, .. } => 1 + 2 * affine as usize,
            Op::LayerNormModulate { .. } | Op::Modulate | Op::GatedResidual => 3,
            Op::Attention { bias, qk_norm, .. } => 3 + bias as usize + 2 * qk_norm as usize,
            Op::AttentionBackward { .. } => 5,
            Op::Conv2d { bias, .. } => 2 + bias as usize,
        }
    }

    pub fn encode(&self) -> EncodedOp {
        let mut e = EncodedOp::default();
        match *self {
            Op::Copy => e.kind = kind::COPY,
            Op::Fill { value } => {
                e.kind = kind::FILL;
                e.fparams[0] = value;
            }
            Op::Unary(u) => {
                e.kind = kind::UNARY;
                e.sub = u as u32;
            }
            Op::Binary(b) => {
                e.kind = kind::BINARY;
                e.sub = b as u32;
            }
            Op::Affine { mul, add } => {
                e.kind = kind::AFFINE;
                e.fparams[0] = mul;
                e.fparams[1] = add;
            }
            Op::Matmul { bias, act } => {
                e.kind = kind::MATMUL;
                e.iparams[0] = bias as i64;
                // 0: none, else 1 + the unary id (ABI 1.1; a 1.0 plugin never sees a non-zero value).
                e.iparams[1] = act.map_or(0, |u| u as i64 + 1);
            }
            Op::MatmulGatedResidual { bias } => {
                e.kind = kind::MATMUL_GATED_RESIDUAL;
                e.iparams[0] = bias as i64;
            }
            Op::Softmax => e.kind = kind::SOFTMAX,
            Op::LayerNorm { eps, affine } => {
                e.kind = kind::LAYER_NORM;
                e.fparams[0] = eps;
                e.iparams[0] = affine as i64;
            }
            Op::RmsNorm { eps } => {
                e.kind = kind::RMS_NORM;
                e.fparams[0] = eps;
            }
            Op::LayerNormModulate { eps } => {
                e.kind = kind::LAYER_NORM_MODULATE;
                e.fparams[0] = eps;
            }
            Op::Modulate => e.kind = kind::MODULATE,
            Op::GatedResidual => e.kind = kind::GATED_RESIDUAL,
            Op::Attention { scale, causal, bias, qk_norm, norm_eps } => {
                e.kind = kind::ATTENTION;
                e.fparams[0] = scale;
                e.fparams[1] = norm_eps;
                e.iparams[0] = causal as i64;
                e.iparams[1] = bias as i64;
                e.iparams[2] = qk_norm as i64;
            }
            Op::AttentionBackward { scale, causal } => {
                e.kind = kind::ATTENTION_BACKWARD;
                e.fparams[0] = scale;
                e.iparams[0] = causal as i64;
            }
            Op::Conv2d { stride, padding, bias } => {
                e.kind = kind::CONV2D;
                e.iparams[0] = stride[0] as i64;
                e.iparams[1] = stride[1] as i64;
                e.iparams[2] = padding[0] as i64;
                e.iparams[3] = padding[1] as i64;
                e.iparams[4] = bias as i64;
            }
            Op::GroupNorm { groups, eps, affine } => {
                e.kind = kind::GROUP_NORM;
                e.iparams[0] = groups as i64;
                e.iparams[1] = affine as i64;
                e.fparams[0] = eps;
            }
            Op::UpsampleNearest2d { factor } => {
                e.kind = kind::UPSAMPLE_NEAREST2D;
                e.iparams[0] = factor as i64;
            }
            Op::Gather => e.kind = kind::GATHER,
        }
        e
    }

    /// Inverse of [`Op::encode`]; `None` for a kind or sub-kind this version does not know.
    pub fn decode(e: &EncodedOp) -> Option<Op> {
        let flag = |i: usize| e.iparams[i] != 0;
        let us = |i: usize| usize::try_from(e.iparams[i]).ok();
        Some(match e.kind {
            kind::COPY => Op::Copy,
            kind::FILL => Op::Fill { value: e.fparams[0] },
            kind::UNARY => Op::Unary(UnaryOp::from_id(e.sub)?),
            kind::BINARY => Op::Binary(BinaryOp::from_id(e.sub)?),
            kind::AFFINE => Op::Affine { mul: e.fparams[0], add: e.fparams[1] },
            kind::MATMUL => Op::Matmul {
                bias: flag(0),
                act: match e.iparams[1] {
                    0 => None,
                    id => Some(UnaryOp::from_id(u32::try_from(id - 1).ok()?)?),
                },
            },
            kind::MATMUL_GATED_RESIDUAL => Op::MatmulGatedResidual { bias: flag(0) },
            kind::SOFTMAX => Op::Softmax,
            kind::LAYER_NORM => Op::LayerNorm { eps: e.fparams[0], affine: flag(0) },
            kind::RMS_NORM => Op::RmsNorm { eps: e.fparams[0] },
            kind::LAYER_NORM_MODULATE => Op::LayerNormModulate { eps: e.fparams[0] },
            kind::MODULATE => Op::Modulate,
            kind::GATED_RESIDUAL => Op::GatedResidual,
            kind::ATTENTION => Op::Attention {
                scale: e.fparams[0],
                norm_eps: e.fparams[1],
                causal: flag(0),
                bias: flag(1),
                qk_norm: flag(2),
            },
            kind::ATTENTION_BACKWARD => Op::AttentionBackward { scale: e.fparams[0], causal: flag(0) },
            kind::CONV2D => Op::Conv2d { stride: [us(0)?, us(1)?], padding: [us(2)?, us(3)?], bias: flag(4) },
            kind::GROUP_NORM => Op::GroupNorm { groups: us(0)?, affine: flag(1), eps: e.fparams[0] },
            kind::UPSAMPLE_NEAREST2D => Op::UpsampleNearest2d { factor: us(0)? },
            kind::GATHER => Op::Gather,
            _ => return None,
        })
    }
}

/// An op with its operands, as handed to [`crate::Device::execute`].
#[derive(Clone, Debug)]
pub struct OpCall<'a> {
    pub op: Op,
    pub inputs: &'a [TensorDesc],
    pub outputs: &'a [TensorDesc],
}
