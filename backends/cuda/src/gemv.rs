//! Linear layers with at most 8 rows (`kernels/gemv.cu`): the MM-DiT's adaLN modulation multiplies 2 rows by a
//! `[9216, 1536]` weight 47 times per forward, where cuBLAS reads the weight at a quarter of the bandwidth.

use crate::device::CudaDevice;
use crate::params::GemvParams;
use sd3_core::{DType, Result, TensorDesc};

const MAX_ROWS: usize = 8;

/// Runs `out = a · b (+ bias)` when it is a few-row linear this kernel takes: rank 2, one float dtype, `b` the
/// transposed view of a row-major weight (`b[k][n]` at `n·w_rs + k`), rows 8-element aligned for 16-byte loads.
/// Returns `None` (nothing queued) otherwise.
pub fn try_gemv(
    dev: &CudaDevice,
    a: &TensorDesc,
    b: &TensorDesc,
    bias: Option<&TensorDesc>,
    out: &TensorDesc,
) -> Option<Result<()>> {
    let dt = out.dtype;
    if out.rank() != 2 || a.rank() != 2 || b.rank() != 2 || !matches!(dt, DType::F32 | DType::F16 | DType::BF16) {
        return None;
    }
    let (m, n, k) = (out.shape()[0], out.shape()[1], a.shape()[1]);
    let aligned = |v: usize| v.is_multiple_of(8);
    let ok = (1..=MAX_ROWS).contains(&m)
        && n > 0
        && k > 0
        && aligned(k)
        && n <= i32::MAX as usize
        && k <= i32::MAX as usize
        && a.dtype == dt
        && b.dtype == dt
        && a.strides()[1] == 1
        && (m == 1 || aligned(a.strides()[0]))
        && aligned(a.layout.offset)
        && b.strides()[0] == 1
        && (n == 1 || aligned(b.strides()[1]))
        && aligned(b.layout.offset)
        && (out.strides()[1] == 1 || n == 1)
        && bias.is_none_or(|t| t.dtype == dt && (t.strides()[0] == 1 || n == 1));
    if !ok {
        return None;
    }
    let p = GemvParams {
        x: a.buffer.0,
        w: b.buffer.0,
        bias: bias.map_or(0, |t| t.buffer.0),
        out: out.buffer.0,
        x_off: a.layout.offset as i64,
        w_off: b.layout.offset as i64,
        b_off: bias.map_or(0, |t| t.layout.offset as i64),
        o_off: out.layout.offset as i64,
        x_rs: a.strides()[0] as i64,
        w_rs: b.strides()[1] as i64,
        o_rs: out.strides()[0] as i64,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        dtype: dt as i32,
        has_bias: bias.is_some() as i32,
    };
    // 8 output features (warps) per block.
    Some(dev.launch(&dev.kernels.gemv_rows, (n as u64).div_ceil(8), 256, p))
}
