//! The NPU stub's kernels: f32 arithmetic on arena memory, reading every operand through its strides.
//!
//! Each kernel works on [`Operand`]s (device memory + dtype + layout). Whole tensors are never staged in host
//! memory: kernels stream rows or tiles of their operands into small local buffers (the emulated on-chip
//! buffers, as Ascend's Unified Buffer / L0 buffers) and write results straight back into the arena.
//! The device (`crate::device`) checks shapes and buffer bounds before any kernel runs, and applies the flags
//! (contiguous copies, private storage formats, the scale path) around them.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod format;
pub mod matmul;
pub mod rows;

use crate::arena::Mem;
use sd3_core::Layout;

/// One operand as a kernel sees it.
#[derive(Clone, Debug)]
pub struct Operand {
    pub mem: Mem,
    pub layout: Layout,
}

impl Operand {
    pub fn shape(&self) -> &[usize] {
        &self.layout.shape
    }

    /// Element at buffer element index `i` (see [`Mem::load`]).
    ///
    /// # Safety
    /// `i` must be an index of this view (the device checked the view lies inside its buffer).
    #[inline]
    pub unsafe fn load(&self, i: usize) -> f32 {
        self.mem.load(i)
    }

    /// # Safety
    /// As [`Operand::load`]; the element must not be accessed by another thread meanwhile.
    #[inline]
    pub unsafe fn store(&self, i: usize, v: f32) {
        self.mem.store(i, v)
    }

    /// Number of rows: the product of every dim but the last (1 for rank 0).
    pub fn rows(&self) -> usize {
        let r = self.layout.rank();
        if r == 0 {
            1
        } else {
            self.layout.shape[..r - 1].iter().product()
        }
    }

    /// Length of a row: the last dim (1 for rank 0).
    pub fn row_len(&self) -> usize {
        self.layout.shape.last().copied().unwrap_or(1)
    }

    /// Element stride along a row.
    pub fn row_stride(&self) -> usize {
        self.layout.strides.last().copied().unwrap_or(1)
    }

    /// Buffer element index of the first element of row `row` (rows in row-major order).
    pub fn row_base(&self, mut row: usize) -> usize {
        let r = self.layout.rank();
        let mut pos = self.layout.offset;
        for d in (0..r.saturating_sub(1)).rev() {
            let n = self.layout.shape[d];
            pos += (row % n) * self.layout.strides[d];
            row /= n;
        }
        pos
    }

    /// Buffer element index of a multi-index.
    #[inline]
    pub fn at(&self, idx: &[usize]) -> usize {
        self.layout.index(idx)
    }

    /// The same memory with a row-major contiguous layout of this shape at `offset` (used for workspaces).
    pub fn contiguous(mem: Mem, shape: &[usize]) -> Operand {
        Operand { mem, layout: Layout::contiguous(shape) }
    }
}
