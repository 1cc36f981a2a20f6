//! Row-wise ops (softmax, layer norm, RMS norm, fused adaLN): which kernel of `kernels/rows.cu` runs a call.

use crate::device::CudaDevice;
use crate::params::{RowParams, Td};
use sd3_core::{DType, Result};

impl CudaDevice {
    pub(crate) fn row_op(&self, p: RowParams) -> Result<()> {
        if p.rows == 0 {
            return Ok(());
        }
        if row_warp_applies(&p) {
            let half = p.x.dtype != DType::F32 as i32;
            let size = if p.d <= 1024 {
                0
            } else if p.d <= 1536 {
                1
            } else {
                2
            };
            let kernel = &self.kernels.row_warp[half as usize][size];
            // 4 rows (warps) per block: small blocks pack the SMs tighter at ~96 registers a thread.
            return self.launch(kernel, (p.rows as u64).div_ceil(4), 128, p);
        }
        self.launch(&self.kernels.row_op, p.rows as u64, 256, p)
    }
}

/// Whether `row_warp` (kernels/rows.cu) can run these row params: a norm (not softmax) over rows of at most
/// 32·8·12 elements, a multiple of 8, every operand with unit last stride and rows starting 8-element aligned
/// (16-byte loads). Per-`[D]` weights need the same of their one dim.
fn row_warp_applies(p: &RowParams) -> bool {
    const ROW_OP_SOFTMAX: i32 = 0;
    const ROW_OP_LN_MODULATE: i32 = 3;
    let rows_aligned = |t: &Td| {
        let r = t.rank as usize;
        r >= 1 && t.strides[r - 1] == 1 && t.offset % 8 == 0 && t.strides[..r - 1].iter().all(|s| s % 8 == 0)
    };
    let vector_aligned = |t: &Td| t.rank == 1 && t.strides[0] == 1 && t.offset % 8 == 0;
    let float = |t: &Td| (0..3).contains(&t.dtype);
    let operands_ok = match p.op {
        ROW_OP_SOFTMAX => false,
        ROW_OP_LN_MODULATE => rows_aligned(&p.a) && rows_aligned(&p.b) && float(&p.a) && float(&p.b),
        1 if p.affine == 0 => true,
        1 => vector_aligned(&p.a) && vector_aligned(&p.b) && float(&p.a) && float(&p.b),
        _ => vector_aligned(&p.a) && float(&p.a),
    };
    // Modulate's scale/shift are indexed with x's row decomposition, so they must have x's shape.
    let same_rows = |t: &Td| t.rank == p.x.rank && t.shape == p.x.shape;
    let shapes_ok = p.op != ROW_OP_LN_MODULATE || (same_rows(&p.a) && same_rows(&p.b));
    operands_ok
        && shapes_ok
        && same_rows(&p.out)
        && p.rows < (1 << 31)
        && p.d % 8 == 0
        && p.d <= 32 * 8 * 12
        && rows_aligned(&p.x)
        && rows_aligned(&p.out)
        && float(&p.x)
        && float(&p.out)
}
