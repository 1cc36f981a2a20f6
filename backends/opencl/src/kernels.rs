//! The OpenCL C sources (`kernels/*.cl`), composed into one program per op family.

use crate::device::Tuning;

const COMMON: &str = include_str!("../kernels/common.cl");
const ELEMENTWISE: &str = include_str!("../kernels/elementwise.cl");
const ELEMENTWISE_HALF: &str = include_str!("../kernels/elementwise_half.cl");
const REDUCE: &str = include_str!("../kernels/reduce.cl");
const GEMM_TILE: &str = include_str!("../kernels/gemm_tile.cl");
const MATMUL: &str = include_str!("../kernels/matmul.cl");
const CONV2D: &str = include_str!("../kernels/conv2d.cl");
const MMA: &str = include_str!("../kernels/mma.cl");
const GEMM_MMA: &str = include_str!("../kernels/gemm_mma.cl");
const ATTENTION: &str = include_str!("../kernels/attention.cl");
const ATTENTION_MMA: &str = include_str!("../kernels/attention_mma.cl");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    Elementwise,
    /// f16 arithmetic for the elementwise ops that allow it (needs `-DHALF_MATH=1`; see elementwise_half.cl).
    ElementwiseHalf,
    Reduce,
    Gemm,
    /// The tensor-core GEMM (NVIDIA sm_80+ only; needs `-DMMA_BF16=0|1`).
    GemmMma,
    Attention,
    /// The tensor-core attention (NVIDIA sm_80+ only; needs `-DMMA_BF16=0|1 -DD=<head dim>`).
    AttentionMma,
}

impl ProgramKind {
    pub fn name(self) -> &'static str {
        match self {
            ProgramKind::Elementwise => "elementwise",
            ProgramKind::ElementwiseHalf => "elementwise_half",
            ProgramKind::Reduce => "reduce",
            ProgramKind::Gemm => "gemm",
            ProgramKind::GemmMma => "gemm_mma",
            ProgramKind::Attention => "attention",
            ProgramKind::AttentionMma => "attention_mma",
        }
    }
}

/// The full source of a program: the shared header, then the family's files (the GEMM body is instantiated
/// once for matmul and once for conv2d).
pub fn source(kind: ProgramKind) -> String {
    let parts: &[&str] = match kind {
        ProgramKind::Elementwise => &[COMMON, ELEMENTWISE],
        ProgramKind::ElementwiseHalf => &[COMMON, ELEMENTWISE_HALF],
        ProgramKind::Reduce => &[COMMON, REDUCE],
        ProgramKind::Gemm => &[COMMON, MATMUL, GEMM_TILE, CONV2D, GEMM_TILE],
        ProgramKind::GemmMma => &[COMMON, MMA, MATMUL, GEMM_MMA, CONV2D, GEMM_MMA],
        ProgramKind::Attention => &[COMMON, ATTENTION],
        ProgramKind::AttentionMma => &[COMMON, MMA, ATTENTION_MMA],
    };
    parts.join("\n")
}

/// Build options every program gets: the language version and the device class's tile shapes.
pub fn base_options(t: &Tuning) -> String {
    format!("-cl-std=CL1.2 -DRWG={} -DRM={} -DRN={} -DTK={}", t.reduce_wg, t.gemm_rm, t.gemm_rn, t.gemm_tk)
}
