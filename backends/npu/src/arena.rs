//! The emulated device memory: one zero-initialised host allocation, addressed by byte offset, that only the
//! device's copies and kernels touch. Host data enters and leaves it by explicit copies (upload / download).
//!
//! Kernels address it through [`DevPtr`] (a raw pointer, so that several threads can write disjoint parts of
//! one output). Soundness rests on two rules the device enforces before any kernel runs: every operand's byte
//! span lies inside its buffer, and all device work is serialised by the device lock.

use half::{bf16, f16};
use sd3_core::{DType, Error, Result};

/// The arena's backing store: zeroed host memory from the allocator (`calloc`-like, so the OS maps pages only
/// when they are first written and an unused arena costs address space, not RAM).
pub struct Arena {
    base: *mut u8,
    len: usize,
}

// SAFETY: the arena is plain bytes; every access goes through the device, which serialises it.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

const ARENA_ALIGN: usize = 4096;

impl Arena {
    /// Reserve `bytes` of zeroed memory; an error (not an abort) when the host cannot provide it.
    pub fn new(bytes: usize) -> Result<Arena> {
        if bytes == 0 {
            return Ok(Arena { base: std::ptr::NonNull::<u8>::dangling().as_ptr(), len: 0 });
        }
        let layout = std::alloc::Layout::from_size_align(bytes, ARENA_ALIGN)
            .map_err(|e| Error::InvalidArgument(format!("npu: arena of {bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        if base.is_null() {
            return Err(Error::OutOfMemory {
                backend: "npu".into(),
                requested: bytes as u64,
                available: 0,
                detail: "the host could not reserve the device arena; lower SD3_NPU_ARENA_MB or arena_mb".into(),
            });
        }
        Ok(Arena { base, len: bytes })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pointer to byte `offset`. The caller has checked the range it will touch is inside the arena.
    pub fn ptr(&self, offset: usize) -> DevPtr {
        debug_assert!(offset <= self.len());
        // SAFETY: offset is within the allocation (checked by the caller, asserted in debug builds).
        DevPtr(unsafe { self.base.add(offset) })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `new` with this very layout.
            unsafe {
                std::alloc::dealloc(self.base, std::alloc::Layout::from_size_align_unchecked(self.len, ARENA_ALIGN))
            };
        }
    }
}

/// A pointer into the arena that may cross threads inside one kernel.
#[derive(Clone, Copy, Debug)]
pub struct DevPtr(pub *mut u8);

// SAFETY: kernels partition their outputs between threads; inputs are only read.
unsafe impl Send for DevPtr {}
unsafe impl Sync for DevPtr {}

/// A typed view of device memory: a base pointer and an element type. Indices are in elements.
#[derive(Clone, Copy, Debug)]
pub struct Mem {
    pub ptr: DevPtr,
    pub dtype: DType,
}

impl Mem {
    /// Element `i` as f32 (integers convert as `as f32` does).
    ///
    /// # Safety
    /// Element `i` must lie inside the buffer this view was made from.
    #[inline]
    pub unsafe fn load(&self, i: usize) -> f32 {
        let p = self.ptr.0;
        match self.dtype {
            DType::F32 => (p as *const f32).add(i).read_unaligned(),
            DType::F16 => f16::from_bits((p as *const u16).add(i).read_unaligned()).to_f32(),
            DType::BF16 => bf16::from_bits((p as *const u16).add(i).read_unaligned()).to_f32(),
            DType::I32 => (p as *const i32).add(i).read_unaligned() as f32,
            DType::I64 => (p as *const i64).add(i).read_unaligned() as f32,
            DType::U8 => *p.add(i) as f32,
        }
    }

    /// Store `v`, rounded to nearest even for f16/bf16, truncated toward 0 for integers.
    ///
    /// # Safety
    /// As [`Mem::load`]; no other thread may access element `i` concurrently.
    #[inline]
    pub unsafe fn store(&self, i: usize, v: f32) {
        let p = self.ptr.0;
        match self.dtype {
            DType::F32 => (p as *mut f32).add(i).write_unaligned(v),
            DType::F16 => (p as *mut u16).add(i).write_unaligned(f16::from_f32(v).to_bits()),
            DType::BF16 => (p as *mut u16).add(i).write_unaligned(bf16::from_f32(v).to_bits()),
            DType::I32 => (p as *mut i32).add(i).write_unaligned(v as i32),
            DType::I64 => (p as *mut i64).add(i).write_unaligned(v as i64),
            DType::U8 => *p.add(i) = v as u8,
        }
    }

    /// Element `i` as f64: exact for every dtype but i64 beyond 2^53 (used by copies and ids).
    ///
    /// # Safety
    /// As [`Mem::load`].
    #[inline]
    pub unsafe fn load_f64(&self, i: usize) -> f64 {
        let p = self.ptr.0;
        match self.dtype {
            DType::I32 => (p as *const i32).add(i).read_unaligned() as f64,
            DType::I64 => (p as *const i64).add(i).read_unaligned() as f64,
            _ => self.load(i) as f64,
        }
    }

    /// Store an f64, converting as [`Mem::store`] does.
    ///
    /// # Safety
    /// As [`Mem::store`].
    #[inline]
    pub unsafe fn store_f64(&self, i: usize, v: f64) {
        let p = self.ptr.0;
        match self.dtype {
            DType::I32 => (p as *mut i32).add(i).write_unaligned(v as i32),
            DType::I64 => (p as *mut i64).add(i).write_unaligned(v as i64),
            DType::F16 => (p as *mut u16).add(i).write_unaligned(f16::from_f64(v).to_bits()),
            DType::BF16 => (p as *mut u16).add(i).write_unaligned(bf16::from_f64(v).to_bits()),
            _ => self.store(i, v as f32),
        }
    }

    /// Copy element `src_i` of `src` to element `i` of `self` bit for bit (same dtype).
    ///
    /// # Safety
    /// As [`Mem::store`] for `self` and [`Mem::load`] for `src`.
    #[inline]
    pub unsafe fn copy_elem_from(&self, i: usize, src: &Mem, src_i: usize) {
        let es = self.dtype.size_in_bytes();
        std::ptr::copy_nonoverlapping(src.ptr.0.add(src_i * es), self.ptr.0.add(i * es), es);
    }
}
