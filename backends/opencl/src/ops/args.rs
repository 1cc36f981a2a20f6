//! Host mirrors of the kernels' `Shape` and `View` structs (kernels/common.cl), dimension collapsing, and a
//! helper that sets a kernel's arguments in order.

use crate::cl_error;
use ocl::core::{self, ArgVal, Kernel, Mem};
use sd3_core::{DType, Result, TensorDesc, MAX_RANK};
use std::ffi::c_void;

/// `Shape` in common.cl: a row-major logical shape of at most 8 dims.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClShape {
    pub d: [u32; MAX_RANK],
    pub rank: u32,
    pub pad: u32,
}

/// `View` in common.cl: element strides over a [`ClShape`] and the element offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClView {
    pub st: [u64; MAX_RANK],
    pub off: u64,
}

impl ClShape {
    pub fn new(dims: &[usize]) -> ClShape {
        let mut s = ClShape { rank: dims.len() as u32, ..Default::default() };
        for (i, &d) in dims.iter().enumerate() {
            s.d[i] = d as u32;
        }
        s
    }
}

impl ClView {
    pub fn new(strides: &[usize], offset: usize) -> ClView {
        let mut v = ClView { off: offset as u64, ..Default::default() };
        for (i, &s) in strides.iter().enumerate() {
            v.st[i] = s as u64;
        }
        v
    }
    /// The view of a tensor desc, strides in its own dim order.
    pub fn of(t: &TensorDesc) -> ClView {
        ClView::new(t.strides(), t.layout.offset)
    }
}

/// The dtype code the kernels use (`DT_*` in common.cl, equal to the ABI ids).
pub fn dt(d: DType) -> u32 {
    d as u32
}

/// Simplify a shape shared by several views: drop size-1 dims and merge neighbours that every view walks
/// contiguously (`stride[d-1] == stride[d] * shape[d]`). Logical element order is preserved. Returns the
/// collapsed shape, each view over it, and for each view whether it is plain contiguous (index = off + i).
pub fn collapse(shape: &[usize], views: &[(&[usize], usize)]) -> (ClShape, Vec<ClView>, Vec<bool>) {
    let mut dims: Vec<usize> = Vec::new();
    let mut strides: Vec<Vec<usize>> = vec![Vec::new(); views.len()];
    for (d, &n) in shape.iter().enumerate() {
        if n == 1 {
            continue;
        }
        let mergeable =
            !dims.is_empty() && views.iter().enumerate().all(|(v, (st, _))| strides[v].last() == Some(&(st[d] * n)));
        if mergeable {
            *dims.last_mut().unwrap() *= n;
            for (v, (st, _)) in views.iter().enumerate() {
                *strides[v].last_mut().unwrap() = st[d];
            }
        } else {
            dims.push(n);
            for (v, (st, _)) in views.iter().enumerate() {
                strides[v].push(st[d]);
            }
        }
    }
    let contiguous = sd3_core::layout::contiguous_strides(&dims);
    let out_views = views.iter().zip(&strides).map(|((_, off), st)| ClView::new(st, *off)).collect();
    let contig = strides.iter().map(|st| *st == contiguous).collect();
    (ClShape::new(&dims), out_views, contig)
}

/// Bitmask of `contig` flags at the given bit positions.
pub fn contig_bits(flags: &[bool], bits: &[u32]) -> u32 {
    flags.iter().zip(bits).filter(|(f, _)| **f).fold(0, |m, (_, b)| m | (1 << b))
}

/// Sets a kernel's arguments in order; the first failure is kept and returned by [`Args::done`].
pub struct Args<'k> {
    kernel: &'k Kernel,
    idx: u32,
    err: Option<sd3_core::Error>,
}

impl<'k> Args<'k> {
    pub fn new(kernel: &'k Kernel) -> Args<'k> {
        Args { kernel, idx: 0, err: None }
    }

    fn set(&mut self, v: ArgVal) -> &mut Self {
        if self.err.is_none() {
            if let Err(e) = core::set_kernel_arg(self.kernel, self.idx, v) {
                self.err = Some(cl_error(&format!("clSetKernelArg #{}", self.idx), e));
            }
        }
        self.idx += 1;
        self
    }

    pub fn mem(&mut self, m: &Mem) -> &mut Self {
        self.set(ArgVal::mem(m))
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.set(ArgVal::scalar(&v))
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.set(ArgVal::scalar(&v))
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.set(ArgVal::scalar(&v))
    }
    pub fn shape(&mut self, s: &ClShape) -> &mut Self {
        // SAFETY: ClShape is repr(C), plain data, and outlives the call.
        self.set(unsafe { ArgVal::from_raw(size_of::<ClShape>(), s as *const ClShape as *const c_void, false) })
    }
    pub fn view(&mut self, v: &ClView) -> &mut Self {
        // SAFETY: as for `shape`.
        self.set(unsafe { ArgVal::from_raw(size_of::<ClView>(), v as *const ClView as *const c_void, false) })
    }
    /// A buffer, its dtype code and a view: the triple most kernels take per operand.
    pub fn operand(&mut self, m: &Mem, dtype: DType, v: &ClView) -> &mut Self {
        self.mem(m).u32(dt(dtype)).view(v)
    }

    pub fn done(&mut self) -> Result<()> {
        match self.err.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_merges_contiguous_and_keeps_broadcast() {
        // [2, 3, 4] contiguous and a [4] row broadcast over the first two dims.
        let (s, v, c) = collapse(&[2, 3, 4], &[(&[12, 4, 1], 0), (&[0, 0, 1], 5)]);
        assert_eq!(s, ClShape::new(&[6, 4]));
        assert_eq!(&v[0].st[..2], &[4, 1]);
        assert_eq!(&v[1].st[..2], &[0, 1]);
        assert_eq!(v[1].off, 5);
        assert_eq!(c, vec![true, false]);
        // A transposed view cannot merge.
        let (s, _, c) = collapse(&[3, 4], &[(&[1, 3], 0)]);
        assert_eq!(s.rank, 2);
        assert_eq!(c, vec![false]);
        // All-ones shape collapses to rank 0 (one element at the offset).
        let (s, _, c) = collapse(&[1, 1], &[(&[7, 7], 3)]);
        assert_eq!(s.rank, 0);
        assert_eq!(c, vec![true]);
    }
}
