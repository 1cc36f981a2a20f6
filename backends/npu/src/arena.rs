//! The emulated device memory: one zero-initialised host allocation, addressed by byte offset, that only the
//! device's copies and kernels touch. Host data enters and leaves it by explicit copies (upload / download).
//!
//! Kernels address it through [`DevPtr`] (a raw pointer, so that several threads can write disjoint parts of
//! one output). Soundness rests on two rules the device enforces before any kernel runs: every operand's byte
//! span lies inside its buffer, and all device work is serialised by the device lock.

use half::{bf16, f16};
use sd3_core::DType;

/// The arena's backing store.
pub struct Arena {
    // `Vec` of zeroes: calloc'ed, so the OS maps pages only when they are first written.
    storage: Vec<u8>,
    base: *mut u8,
}

// SAFETY: the arena is plain bytes; every access goes through the device, which serialises it.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    pub fn new(bytes: usize) -> Arena {
        let mut storage = vec![0u8; bytes];
        let base = storage.as_mut_ptr();
        Arena { storage, base }
    }

    pub fn len(&self) -> usize {
        self.storage.len()
    }

    pub fn is_empty(&self) -> bool {
        self.storage.is_empty()
    }

    /// Pointer to byte `offset`. The caller has checked the range it will touch is inside the arena.
    pub fn ptr(&self, offset: usize) -> DevPtr {
        debug_assert!(offset <= self.len());
        // SAFETY: offset is within the allocation (checked by the caller, asserted in debug builds).
        DevPtr(unsafe { self.base.add(offset) })
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
