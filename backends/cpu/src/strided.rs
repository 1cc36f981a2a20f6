//! Strided views of host buffers and the generic (any dtype, any strides) gather/scatter every kernel builds on.
//!
//! A [`View`] addresses the elements of one operand in *logical* row-major order. Kernels work on f32 (or f64
//! for casts) runs of that order: [`View::gather`] converts a logical range into a contiguous slice,
//! [`View::scatter`] writes one back, and contiguous f32 views hand out slices directly (no copy).

use crate::memory::Buffer;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use sd3_core::{DType, Error, Result, TensorDesc, MAX_RANK};
use std::marker::PhantomData;

/// An operand: a buffer, a dtype and a strided logical view of it, with its dims coalesced.
#[derive(Clone, Copy)]
pub struct View<'a> {
    base: *mut u8,
    pub dtype: DType,
    /// Offset of logical element 0, in elements.
    pub offset: usize,
    /// Coalesced dims (size-1 dims dropped, mergeable neighbours merged); same logical order as the original.
    rank: usize,
    shape: [usize; MAX_RANK],
    strides: [usize; MAX_RANK],
    len: usize,
    _buf: PhantomData<&'a Buffer>,
}

// SAFETY: a view is a pointer into a buffer kept alive for 'a; the device hands out views only for one op,
// during which no one else touches the buffer, and kernels write disjoint elements from different threads.
unsafe impl Send for View<'_> {}
unsafe impl Sync for View<'_> {}

impl<'a> View<'a> {
    /// The view of `desc` in `buf`, checking that every element it addresses lies inside the buffer.
    pub fn new(buf: &'a Buffer, desc: &TensorDesc) -> Result<View<'a>> {
        let l = &desc.layout;
        if l.shape.len() != l.strides.len() || l.shape.len() > MAX_RANK {
            return Err(Error::InvalidArgument(format!(
                "cpu: layout with shape {:?} and strides {:?} (rank at most {MAX_RANK}, one stride per dim)",
                l.shape, l.strides
            )));
        }
        let es = desc.dtype.size_in_bytes();
        let end = l.span_end().checked_mul(es);
        if end.is_none_or(|e| e > buf.len()) {
            return Err(Error::InvalidArgument(format!(
                "cpu: {} view {:?} (strides {:?}, offset {}) overflows its {}-byte buffer",
                desc.dtype,
                l.shape,
                l.strides,
                l.offset,
                buf.len()
            )));
        }
        Ok(Self::from_raw(buf.ptr(), desc.dtype, &l.shape, &l.strides, l.offset))
    }

    /// A view of raw memory; the caller guarantees it is valid for 'a.
    pub fn from_raw(base: *mut u8, dtype: DType, shape: &[usize], strides: &[usize], offset: usize) -> View<'a> {
        let mut v = View {
            base,
            dtype,
            offset,
            rank: 0,
            shape: [1; MAX_RANK],
            strides: [0; MAX_RANK],
            len: shape.iter().product(),
            _buf: PhantomData,
        };
        for (&d, &s) in shape.iter().zip(strides) {
            if d == 1 {
                continue;
            }
            if v.rank > 0 && v.strides[v.rank - 1] == s * d {
                v.shape[v.rank - 1] *= d;
                v.strides[v.rank - 1] = s;
            } else {
                v.shape[v.rank] = d;
                v.strides[v.rank] = s;
                v.rank += 1;
            }
        }
        v
    }

    /// A contiguous f32 view of a host slice (for scratch tensors).
    pub fn of_f32_slice(data: &'a mut [f32], shape: &[usize]) -> View<'a> {
        let strides = sd3_core::layout::contiguous_strides(shape);
        View::from_raw(data.as_mut_ptr() as *mut u8, DType::F32, shape, &strides, 0)
    }

    /// Number of logical elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Whether the logical order is the memory order with unit stride.
    pub fn is_contiguous(&self) -> bool {
        self.rank == 0 || (self.rank == 1 && self.strides[0] == 1)
    }

    /// Typed pointer to the element at buffer element index `i`.
    pub fn elem_ptr<T>(&self, i: usize) -> *mut T {
        debug_assert_eq!(std::mem::size_of::<T>(), self.dtype.size_in_bytes());
        // SAFETY: in-bounds for every index the view addresses (checked in `new`).
        unsafe { (self.base as *mut T).add(i) }
    }

    /// Buffer byte range this view can touch.
    pub fn byte_range(&self) -> std::ops::Range<usize> {
        let es = self.dtype.size_in_bytes();
        if self.len == 0 {
            return 0..0;
        }
        let last: usize = (0..self.rank).map(|d| (self.shape[d] - 1) * self.strides[d]).sum();
        self.offset * es..(self.offset + last + 1) * es
    }

    /// Whether two views may touch a common byte.
    pub fn overlaps(&self, other: &View) -> bool {
        let (a, b) = (self.byte_range(), other.byte_range());
        self.base == other.base && a.start < b.end && b.start < a.end
    }

    /// Whether two logical elements might share memory (a broadcast or otherwise overlapping view).
    /// Conservative: `true` may be returned for exotic layouts that do not actually overlap.
    pub fn may_self_overlap(&self) -> bool {
        let mut dims: Vec<(usize, usize)> = (0..self.rank).map(|d| (self.strides[d], self.shape[d])).collect();
        dims.sort_unstable();
        let mut extent = 1;
        for (s, d) in dims {
            if s < extent {
                return true;
            }
            extent += s * (d - 1);
        }
        false
    }

    /// The contiguous f32 slice of logical elements `start..start + n`, if this view is contiguous f32.
    pub fn f32_slice(&self, start: usize, n: usize) -> Option<&'a [f32]> {
        (self.dtype == DType::F32 && self.is_contiguous() && start + n <= self.len)
            // SAFETY: in bounds; nothing writes to an input during an op.
            .then(|| unsafe { std::slice::from_raw_parts(self.elem_ptr::<f32>(self.offset + start), n) })
    }

    /// The f32 elements `start..start + n` when they lie in one unit-stride run of the innermost dim (e.g. a
    /// row of a broadcast `[B, 1, D]` scale), borrowed in place.
    pub fn f32_run(&self, start: usize, n: usize) -> Option<&'a [f32]> {
        let r = self.rank;
        if self.dtype != DType::F32
            || r == 0
            || self.strides[r - 1] != 1
            || start % self.shape[r - 1] + n > self.shape[r - 1]
        {
            return None;
        }
        let mut pos = self.offset;
        let mut rem = start;
        for d in (0..r).rev() {
            pos += (rem % self.shape[d]) * self.strides[d];
            rem /= self.shape[d];
        }
        // SAFETY: a run inside the validated view; nothing writes to an input during an op.
        Some(unsafe { std::slice::from_raw_parts(self.elem_ptr::<f32>(pos), n) })
    }

    /// Mutable form of [`View::f32_slice`] for outputs.
    ///
    /// # Safety
    /// No other live reference may cover the range: the device checks outputs never alias inputs, and
    /// kernels hand disjoint ranges to different threads.
    pub unsafe fn f32_slice_mut(&self, start: usize, n: usize) -> Option<&'a mut [f32]> {
        (self.dtype == DType::F32 && self.is_contiguous() && start + n <= self.len)
            .then(|| unsafe { std::slice::from_raw_parts_mut(self.elem_ptr::<f32>(self.offset + start), n) })
    }

    /// Call `f(buffer_index, stride, count, logical_offset_from_start)` for each run of the logical range
    /// `start..start + n` that is evenly strided in memory.
    pub fn for_runs(&self, start: usize, n: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        assert!(start + n <= self.len, "logical range {start}..{} outside a view of {}", start + n, self.len);
        if n == 0 {
            return;
        }
        if self.rank == 0 {
            return f(self.offset, 0, n, 0);
        }
        let r = self.rank;
        let mut idx = [0usize; MAX_RANK];
        let mut rem = start;
        for d in (0..r).rev() {
            idx[d] = rem % self.shape[d];
            rem /= self.shape[d];
        }
        let mut done = 0;
        while done < n {
            let pos = self.offset + (0..r).map(|d| idx[d] * self.strides[d]).sum::<usize>();
            let run = (self.shape[r - 1] - idx[r - 1]).min(n - done);
            f(pos, self.strides[r - 1], run, done);
            done += run;
            idx[r - 1] += run;
            let mut d = r - 1;
            while idx[d] == self.shape[d] && d > 0 {
                idx[d] = 0;
                idx[d - 1] += 1;
                d -= 1;
            }
        }
    }

    /// Convert logical elements `start..start + out.len()` into `out`.
    pub fn gather<T: Scalar>(&self, start: usize, out: &mut [T]) {
        self.for_runs(start, out.len(), |pos, stride, n, o| {
            // SAFETY: `for_runs` only yields in-bounds runs.
            unsafe { T::load_run(self.dtype, self.base, pos, stride, &mut out[o..o + n]) }
        });
    }

    /// Write `vals` into logical elements `start..start + vals.len()`, rounding to the view's dtype.
    pub fn scatter<T: Scalar>(&self, start: usize, vals: &[T]) {
        self.for_runs(start, vals.len(), |pos, stride, n, o| {
            // SAFETY: in-bounds runs; the caller owns these output elements (see the type's docs).
            unsafe { T::store_run(self.dtype, self.base, pos, stride, &vals[o..o + n]) }
        });
    }

    /// Copy logical elements into `out` bit for bit (`T` must have the dtype's size).
    pub fn gather_raw<T: Copy>(&self, start: usize, out: &mut [T]) {
        assert_eq!(std::mem::size_of::<T>(), self.dtype.size_in_bytes());
        self.for_runs(start, out.len(), |pos, stride, n, o| {
            let p = self.elem_ptr::<T>(pos);
            for (i, v) in out[o..o + n].iter_mut().enumerate() {
                // SAFETY: in-bounds run.
                *v = unsafe { *p.add(i * stride) };
            }
        });
    }

    /// Write `vals` bit for bit into logical elements `start..`.
    pub fn scatter_raw<T: Copy>(&self, start: usize, vals: &[T]) {
        assert_eq!(std::mem::size_of::<T>(), self.dtype.size_in_bytes());
        self.for_runs(start, vals.len(), |pos, stride, n, o| {
            let p = self.elem_ptr::<T>(pos);
            for (i, v) in vals[o..o + n].iter().enumerate() {
                // SAFETY: in-bounds run owned by the caller.
                unsafe { *p.add(i * stride) = *v };
            }
        });
    }

    /// Logical range as f32: borrowed when contiguous f32, else converted into `scratch`.
    pub fn read_f32<'s>(&self, start: usize, n: usize, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        if let Some(s) = self.f32_slice(start, n) {
            return s;
        }
        if let Some(s) = self.f32_run(start, n) {
            return s;
        }
        scratch.clear();
        scratch.resize(n, 0.0);
        self.gather(start, scratch);
        scratch
    }
}

/// An intermediate element type kernels compute in (f32, or f64 for exact casts), with run conversions
/// from and to every storage dtype.
pub trait Scalar: Copy + Default + Send + Sync + 'static {
    /// # Safety
    /// `base` must address a buffer in which `pos + i * stride` is a valid element index for `i < out.len()`.
    unsafe fn load_run(dtype: DType, base: *const u8, pos: usize, stride: usize, out: &mut [Self]);
    /// # Safety
    /// As [`Scalar::load_run`], and the elements must be writable by this thread.
    unsafe fn store_run(dtype: DType, base: *mut u8, pos: usize, stride: usize, vals: &[Self]);
}

macro_rules! load_strided {
    ($base:expr, $ty:ty, $pos:expr, $stride:expr, $out:expr, |$x:ident| $conv:expr) => {{
        let p = ($base as *const $ty).add($pos);
        for (i, o) in $out.iter_mut().enumerate() {
            let $x = *p.add(i * $stride);
            *o = $conv;
        }
    }};
}

macro_rules! store_strided {
    ($base:expr, $ty:ty, $pos:expr, $stride:expr, $vals:expr, |$x:ident| $conv:expr) => {{
        let p = ($base as *mut $ty).add($pos);
        for (i, &$x) in $vals.iter().enumerate() {
            *p.add(i * $stride) = $conv;
        }
    }};
}

impl Scalar for f32 {
    unsafe fn load_run(dtype: DType, base: *const u8, pos: usize, stride: usize, out: &mut [f32]) {
        unsafe {
            if stride == 1 {
                match dtype {
                    DType::F32 => {
                        return out
                            .copy_from_slice(std::slice::from_raw_parts((base as *const f32).add(pos), out.len()))
                    }
                    DType::F16 => {
                        return std::slice::from_raw_parts((base as *const f16).add(pos), out.len())
                            .convert_to_f32_slice(out)
                    }
                    _ => {}
                }
            }
            match dtype {
                DType::F32 => load_strided!(base, f32, pos, stride, out, |x| x),
                DType::F16 => load_strided!(base, f16, pos, stride, out, |x| x.to_f32()),
                DType::BF16 => load_strided!(base, u16, pos, stride, out, |x| f32::from_bits((x as u32) << 16)),
                DType::I32 => load_strided!(base, i32, pos, stride, out, |x| x as f32),
                DType::I64 => load_strided!(base, i64, pos, stride, out, |x| x as f32),
                DType::U8 => load_strided!(base, u8, pos, stride, out, |x| x as f32),
            }
        }
    }
    unsafe fn store_run(dtype: DType, base: *mut u8, pos: usize, stride: usize, vals: &[f32]) {
        unsafe {
            if stride == 1 {
                match dtype {
                    DType::F32 => {
                        return std::slice::from_raw_parts_mut((base as *mut f32).add(pos), vals.len())
                            .copy_from_slice(vals)
                    }
                    DType::F16 => {
                        return std::slice::from_raw_parts_mut((base as *mut f16).add(pos), vals.len())
                            .convert_from_f32_slice(vals)
                    }
                    _ => {}
                }
            }
            match dtype {
                DType::F32 => store_strided!(base, f32, pos, stride, vals, |x| x),
                DType::F16 => store_strided!(base, f16, pos, stride, vals, |x| f16::from_f32(x)),
                DType::BF16 => store_strided!(base, bf16, pos, stride, vals, |x| bf16::from_f32(x)),
                DType::I32 => store_strided!(base, i32, pos, stride, vals, |x| x as i32),
                DType::I64 => store_strided!(base, i64, pos, stride, vals, |x| x as i64),
                DType::U8 => store_strided!(base, u8, pos, stride, vals, |x| x as u8),
            }
        }
    }
}

/// f64 holds every f32/f16/bf16/i32/u8 value exactly (and i64 up to 2^53), so casts through it round once,
/// exactly as the reference does.
impl Scalar for f64 {
    unsafe fn load_run(dtype: DType, base: *const u8, pos: usize, stride: usize, out: &mut [f64]) {
        unsafe {
            match dtype {
                DType::F32 => load_strided!(base, f32, pos, stride, out, |x| x as f64),
                DType::F16 => load_strided!(base, f16, pos, stride, out, |x| x.to_f64()),
                DType::BF16 => load_strided!(base, bf16, pos, stride, out, |x| x.to_f64()),
                DType::I32 => load_strided!(base, i32, pos, stride, out, |x| x as f64),
                DType::I64 => load_strided!(base, i64, pos, stride, out, |x| x as f64),
                DType::U8 => load_strided!(base, u8, pos, stride, out, |x| x as f64),
            }
        }
    }
    unsafe fn store_run(dtype: DType, base: *mut u8, pos: usize, stride: usize, vals: &[f64]) {
        unsafe {
            match dtype {
                DType::F32 => store_strided!(base, f32, pos, stride, vals, |x| x as f32),
                DType::F16 => store_strided!(base, f16, pos, stride, vals, |x| f16::from_f64(x)),
                DType::BF16 => store_strided!(base, bf16, pos, stride, vals, |x| bf16::from_f64(x)),
                DType::I32 => store_strided!(base, i32, pos, stride, vals, |x| x as i32),
                DType::I64 => store_strided!(base, i64, pos, stride, vals, |x| x as i64),
                DType::U8 => store_strided!(base, u8, pos, stride, vals, |x| x as u8),
            }
        }
    }
}
