//! Helpers shared by the NPU tests: the same op on the NPU device and on `sd3_core::reference::ReferenceDevice`,
//! from the same random inputs, compared element by element.
#![allow(dead_code)]

use sd3_backend_npu::{NpuConfig, NpuDevice, NpuFlags};
use sd3_core::reference::ReferenceDevice;
use sd3_core::{Backend, DType, Op, Result, Tensor};
use std::cell::Cell;
use std::sync::Arc;

/// A tensor on the NPU and its twin on the reference device.
#[derive(Clone, Debug)]
pub struct T2 {
    pub n: Tensor,
    pub r: Tensor,
}

impl T2 {
    /// The same view (or op) on both twins.
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> T2 {
        T2 { n: f(&self.n).unwrap(), r: f(&self.r).unwrap() }
    }
}

pub struct Pair {
    pub dev: Arc<NpuDevice>,
    pub npu: Backend,
    pub reff: Backend,
    rng: Cell<u64>,
}

/// Allowed |npu - reference| per element: `tol · (1 + |reference|)`, by output dtype. f32 is the f32-compute
/// error of the NPU against the f64 reference; f16/bf16 allow one rounding step of the output type.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 5e-5,
        DType::F16 => 3e-3,
        DType::BF16 => 2e-2,
        _ => 0.0,
    }
}

impl Pair {
    pub fn new(flags: NpuFlags, arena_mb: u64) -> Pair {
        let dev = Arc::new(NpuDevice::new(NpuConfig::new(flags, arena_mb << 20)).unwrap());
        Pair {
            npu: Backend::new("npu", dev.clone()),
            reff: Backend::new("reference", Arc::new(ReferenceDevice::new())),
            dev,
            rng: Cell::new(0x9E37_79B9_7F4A_7C15),
        }
    }

    /// Uniform in [-1, 1) (xorshift64*).
    pub fn next(&self) -> f32 {
        let mut x = self.rng.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        v as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn upload(&self, values: &[f32], shape: &[usize], dtype: DType) -> T2 {
        T2 { n: self.npu.from_f32(values, shape, dtype).unwrap(), r: self.reff.from_f32(values, shape, dtype).unwrap() }
    }

    pub fn rand(&self, shape: &[usize], dtype: DType) -> T2 {
        let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| self.next()).collect();
        self.upload(&v, shape, dtype)
    }

    /// Uniform in [0.1, 2.1): for log, sqrt, rsqrt, recip.
    pub fn rand_pos(&self, shape: &[usize], dtype: DType) -> T2 {
        let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| self.next() + 1.1).collect();
        self.upload(&v, shape, dtype)
    }

    pub fn ids(&self, ids: &[i64], dtype: DType) -> T2 {
        let v: Vec<f32> = ids.iter().map(|&i| i as f32).collect();
        self.upload(&v, &[ids.len()], dtype)
    }

    /// An output filled with a sentinel, so that elements an op must not touch are compared too.
    pub fn out(&self, shape: &[usize], dtype: DType) -> T2 {
        T2 { n: self.npu.full(shape, dtype, 7.0).unwrap(), r: self.reff.full(shape, dtype, 7.0).unwrap() }
    }

    /// Run `op` on both devices into `out` (a view of `whole`) and compare `whole`.
    pub fn run_into(&self, what: &str, op: Op, ins: &[&T2], out: &T2, whole: &T2) {
        let ni: Vec<&Tensor> = ins.iter().map(|t| &t.n).collect();
        let ri: Vec<&Tensor> = ins.iter().map(|t| &t.r).collect();
        self.npu.run(op, &ni, &[&out.n]).unwrap_or_else(|e| panic!("{what}: npu failed: {e}"));
        self.reff.run(op, &ri, &[&out.r]).unwrap_or_else(|e| panic!("{what}: reference failed: {e}"));
        assert_close(what, &whole.n, &whole.r);
    }

    /// Run `op` into a fresh contiguous output of `shape` and compare; returns the output.
    pub fn run(&self, what: &str, op: Op, ins: &[&T2], shape: &[usize], dtype: DType) -> T2 {
        let out = self.out(shape, dtype);
        self.run_into(what, op, ins, &out, &out);
        out
    }
}

pub fn assert_close(what: &str, npu: &Tensor, reference: &Tensor) {
    assert_eq!(npu.shape(), reference.shape(), "{what}: shapes");
    let a = npu.to_f32_vec().unwrap();
    let b = reference.to_f32_vec().unwrap();
    let tol = tolerance(npu.dtype());
    let mut worst = (0.0f32, 0usize);
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        assert!(!x.is_nan() || y.is_nan(), "{what}: NaN at {i} (reference {y})");
        let err = (x - y).abs() / (1.0 + y.abs());
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{what} ({}): element {} is {} on the npu, {} on the reference (relative error {:e} > {tol:e})",
        npu.dtype(),
        worst.1,
        a[worst.1],
        b[worst.1],
        worst.0
    );
}
