//! Shapes, strides and the tensor descriptor a backend receives with every op.
//!
//! Strides and offsets are counted in *elements*, not bytes. A stride of 0 is a broadcast dimension.
//! Strides are never negative.

use crate::DType;

/// The most dimensions a tensor may have (`SD3_MAX_RANK` in the C header).
pub const MAX_RANK: usize = 8;

/// Opaque handle of a device buffer, chosen by the backend. `0` is never a valid handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufferId(pub u64);

/// Logical shape and element strides of a view into a buffer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
    /// Offset of element `[0, 0, ...]` from the start of the buffer, in elements.
    pub offset: usize,
}

impl Layout {
    /// A row-major contiguous layout.
    pub fn contiguous(shape: &[usize]) -> Layout {
        Layout { shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// One past the largest element index this view touches (0 for an empty view).
    pub fn span_end(&self) -> usize {
        if self.shape.contains(&0) {
            return self.offset;
        }
        self.offset + self.shape.iter().zip(&self.strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>() + 1
    }

    /// Element index of a multi-index.
    pub fn index(&self, idx: &[usize]) -> usize {
        self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>()
    }

    /// Visit the buffer element index of every logical element, in row-major logical order.
    pub fn for_each_index(&self, mut f: impl FnMut(usize)) {
        let n = self.elem_count();
        if n == 0 {
            return;
        }
        let rank = self.rank();
        let mut idx = vec![0usize; rank];
        let mut pos = self.offset;
        for _ in 0..n {
            f(pos);
            for d in (0..rank).rev() {
                idx[d] += 1;
                pos += self.strides[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                pos -= self.strides[d] * self.shape[d];
                idx[d] = 0;
            }
        }
    }
}

pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut s = 1;
    for (i, &d) in shape.iter().enumerate().rev() {
        strides[i] = s;
        s *= d.max(1);
    }
    strides
}

/// Everything a backend knows about one operand of an op: which buffer, which view of it, which dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    pub buffer: BufferId,
    pub dtype: DType,
    pub layout: Layout,
}

impl TensorDesc {
    pub fn shape(&self) -> &[usize] {
        &self.layout.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.layout.strides
    }
    pub fn rank(&self) -> usize {
        self.layout.rank()
    }
    pub fn elem_count(&self) -> usize {
        self.layout.elem_count()
    }
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }
    /// Byte range of the buffer this view can touch.
    pub fn byte_span(&self) -> std::ops::Range<usize> {
        let es = self.dtype.size_in_bytes();
        // Strides are never negative, so the view's first element is its lowest.
        self.layout.offset * es..self.layout.span_end() * es
    }
}
