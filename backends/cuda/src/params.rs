//! Kernel parameter structs, passed by value to the kernels. Each mirrors a struct in `kernels/*.cu`
//! field for field (`#[repr(C)]`, same order); keep the two in step.

use cudarc::driver::DeviceRepr;
use sd3_core::{TensorDesc, MAX_RANK};

/// A tensor view on the device (`struct TD` in `kernels/common.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Td {
    pub shape: [i64; MAX_RANK],
    pub strides: [i64; MAX_RANK],
    pub offset: i64,
    pub ptr: u64,
    pub rank: i32,
    pub dtype: i32,
}

impl Td {
    /// Describe `desc` whose buffer starts at device address `base`.
    pub fn new(desc: &TensorDesc, base: u64) -> Td {
        let mut t = Td {
            offset: desc.layout.offset as i64,
            ptr: base,
            rank: desc.rank() as i32,
            dtype: desc.dtype as i32,
            ..Td::default()
        };
        for (i, (&d, &s)) in desc.layout.shape.iter().zip(&desc.layout.strides).enumerate() {
            t.shape[i] = d as i64;
            t.strides[i] = s as i64;
        }
        t
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EwParams {
    pub inputs: [Td; 3],
    pub out: Td,
    pub n: i64,
    pub op: i32,
    pub sub: i32,
    pub f0: f32,
    pub f1: f32,
    pub contiguous: i32,
    pub small: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UpsampleParams {
    pub input: Td,
    pub out: Td,
    pub n: i64,
    pub factor: i32,
    pub pad: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GatherParams {
    pub table: Td,
    pub ids: Td,
    pub out: Td,
    pub error_flag: u64,
    pub n: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RowParams {
    pub x: Td,
    pub a: Td,
    pub b: Td,
    pub out: Td,
    pub rows: i64,
    pub d: i64,
    pub op: i32,
    pub affine: i32,
    pub eps: f32,
    /// Softmax only: mask column j of row r when j > causal_base + (r % causal_rows); -1 = no mask.
    pub causal_base: i32,
    pub causal_rows: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupNormParams {
    pub x: Td,
    pub w: Td,
    pub b: Td,
    pub out: Td,
    pub channels: i64,
    pub spatial: i64,
    pub groups: i32,
    pub affine: i32,
    pub eps: f32,
    pub contiguous: i32,
    pub stats: u64,
    pub chunk: i64,
    pub coeffs: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Im2colParams {
    pub x: Td,
    pub cols: u64,
    pub n: i64,
    pub kh: i32,
    pub kw: i32,
    pub sh: i32,
    pub sw: i32,
    pub ph: i32,
    pub pw: i32,
    pub oh: i64,
    pub ow: i64,
    pub cols_dtype: i32,
    pub pad: i32,
}

/// `struct FlashBwdParams` in `kernels/flash_bwd.cu`: operands q, k, v, o, do, dq, dk, dv.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlashBwdParams {
    pub ptr: [u64; 8],
    pub s: [[i64; 3]; 8],
    pub off: [i64; 8],
    pub lse: u64,
    pub delta: u64,
    pub heads: i32,
    pub n: i32,
    pub scale: f32,
    pub scale_log2: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FlashParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub q_s: [i64; 3],
    pub k_s: [i64; 3],
    pub v_s: [i64; 3],
    pub o_s: [i64; 3],
    pub q_off: i64,
    pub k_off: i64,
    pub v_off: i64,
    pub o_off: i64,
    pub heads: i32,
    pub nq: i32,
    pub nk: i32,
    pub scale_log2: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EwVecParams {
    pub ptr: [u64; 4],
    pub off: [i64; 4],
    pub s0: [i64; 4],
    pub s1: [i64; 4],
    pub s2: [i64; 4],
    pub d0: i64,
    pub d1: i64,
    pub d2: i64,
    pub d3: i64,
    pub nvec: i64,
    pub op: i32,
    pub sub: i32,
    pub n_in: i32,
    pub dtype: i32,
    pub f0: f32,
    pub f1: f32,
}

// SAFETY: plain-old-data structs of integers and floats with a C layout matching the kernels'.
unsafe impl DeviceRepr for EwParams {}
unsafe impl DeviceRepr for UpsampleParams {}
unsafe impl DeviceRepr for GatherParams {}
unsafe impl DeviceRepr for RowParams {}
unsafe impl DeviceRepr for GroupNormParams {}
unsafe impl DeviceRepr for Im2colParams {}
unsafe impl DeviceRepr for FlashParams {}
unsafe impl DeviceRepr for FlashBwdParams {}
unsafe impl DeviceRepr for EwVecParams {}

/// `struct GemvParams` in `kernels/gemv.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GemvParams {
    pub x: u64,
    pub w: u64,
    pub bias: u64,
    pub out: u64,
    pub x_off: i64,
    pub w_off: i64,
    pub b_off: i64,
    pub o_off: i64,
    pub x_rs: i64,
    pub w_rs: i64,
    pub o_rs: i64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub dtype: i32,
    pub has_bias: i32,
}

unsafe impl DeviceRepr for GemvParams {}
