//! Differential testing of one op at a time: run it on a device under test and on [`ReferenceDevice`] with
//! identical buffers, and compare the *whole* output buffers, so elements outside the output view (prefilled
//! with a sentinel) must be left untouched. For backends' own unit tests (`backends/*/tests/`); the
//! [`conformance`](crate::conformance) suite is the acceptance test. Functions here panic on failure, as tests do.

use crate::reference::ReferenceDevice;
use crate::{BufferId, DType, Device, Layout, Op, OpCall, TensorDesc};

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// How an operand's buffer is filled.
#[derive(Clone, Copy, Debug)]
pub enum Gen {
    Uniform(f32, f32),
    /// Integers in 0..n.
    Ids(usize),
}

/// One operand: a view (shape, strides, offset) of a buffer of a dtype.
#[derive(Clone, Debug)]
pub struct Spec {
    pub layout: Layout,
    pub dtype: DType,
    pub gen: Gen,
}

impl Spec {
    pub fn new(shape: &[usize], dtype: DType) -> Spec {
        Spec { layout: Layout::contiguous(shape), dtype, gen: Gen::Uniform(-2.0, 2.0) }
    }
    /// Stored with its dims in the order `perm` (outermost first): a permuted, non-contiguous view.
    pub fn permuted(shape: &[usize], perm: &[usize], dtype: DType) -> Spec {
        let phys: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        let pst = crate::layout::contiguous_strides(&phys);
        let mut strides = vec![0; shape.len()];
        for (i, &p) in perm.iter().enumerate() {
            strides[p] = pst[i];
        }
        Spec { layout: Layout { shape: shape.to_vec(), strides, offset: 0 }, dtype, gen: Gen::Uniform(-2.0, 2.0) }
    }
    pub fn strided(shape: &[usize], strides: &[usize], offset: usize, dtype: DType) -> Spec {
        let layout = Layout { shape: shape.to_vec(), strides: strides.to_vec(), offset };
        Spec { layout, dtype, gen: Gen::Uniform(-2.0, 2.0) }
    }
    pub fn gen(mut self, gen: Gen) -> Spec {
        self.gen = gen;
        self
    }
    pub fn range(self, lo: f32, hi: f32) -> Spec {
        self.gen(Gen::Uniform(lo, hi))
    }
    /// Elements of the backing buffer: the view's span plus a tail that must stay untouched.
    fn buffer_elems(&self) -> usize {
        self.layout.span_end() + 5
    }
}

/// Allowed error: |got - want| <= atol + rtol·|want|, per element; NaN only where the reference has NaN.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub atol: f32,
    pub rtol: f32,
}

pub const EXACT: Tol = Tol { atol: 0.0, rtol: 0.0 };

/// The tolerance of an op whose f32 result has a few rounding steps, by output dtype.
pub fn tol_for(dtype: DType, f32_tol: f32) -> Tol {
    match dtype {
        DType::F16 => Tol { atol: 2e-3, rtol: 2e-3 },
        DType::BF16 => Tol { atol: 1.6e-2, rtol: 1.6e-2 },
        _ => Tol { atol: f32_tol, rtol: f32_tol },
    }
}

fn fill_bytes(spec: &Spec, rng: &mut Rng) -> Vec<u8> {
    let n = spec.buffer_elems();
    let vals: Vec<f32> = (0..n)
        .map(|_| match spec.gen {
            Gen::Uniform(lo, hi) => rng.uniform(lo, hi),
            Gen::Ids(m) => (rng.next_u64() % m as u64) as f32,
        })
        .collect();
    spec.dtype.f32_to_bytes(&vals)
}

fn place(dev: &dyn Device, spec: &Spec, bytes: &[u8]) -> TensorDesc {
    let buffer: BufferId = dev.alloc(bytes.len()).unwrap();
    dev.upload(buffer, 0, bytes).unwrap();
    TensorDesc { buffer, dtype: spec.dtype, layout: spec.layout.clone() }
}

/// Run `op` on `dev` and on the reference device with identical buffers; returns (device result, reference
/// result) as the f32 values of the whole output buffer, or the device's error.
pub fn run_both(
    dev: &dyn Device,
    op: Op,
    inputs: &[Spec],
    output: &Spec,
    seed: u64,
) -> Result<(Vec<f32>, Vec<f32>), crate::Error> {
    let reference = ReferenceDevice::new();
    let mut rng = Rng::new(seed);
    let in_bytes: Vec<Vec<u8>> = inputs.iter().map(|s| fill_bytes(s, &mut rng)).collect();
    let out_bytes = output.dtype.f32_to_bytes(&vec![7.0; output.buffer_elems()]);
    let mut results = Vec::new();
    for d in [dev, &reference as &dyn Device] {
        let ins: Vec<TensorDesc> = inputs.iter().zip(&in_bytes).map(|(s, b)| place(d, s, b)).collect();
        let out = place(d, output, &out_bytes);
        let call = OpCall { op, inputs: &ins, outputs: std::slice::from_ref(&out) };
        assert!(d.supports(&call), "{} does not support {op:?} on {:?}", d.info().name, call);
        let r = d.execute(&call);
        let mut bytes = vec![0u8; out_bytes.len()];
        let r = r.and_then(|_| d.download(out.buffer, 0, &mut bytes));
        for t in ins.iter().chain([&out]) {
            d.free(t.buffer);
        }
        r?;
        results.push(output.dtype.bytes_to_f32(&bytes));
    }
    let want = results.pop().unwrap();
    Ok((results.pop().unwrap(), want))
}

/// Run on `dev` and on the reference device and assert the outputs agree within `tol`.
pub fn check(dev: &dyn Device, what: &str, op: Op, inputs: &[Spec], output: &Spec, tol: Tol) {
    let (got, want) =
        run_both(dev, op, inputs, output, 0x5D3 ^ what.len() as u64).unwrap_or_else(|e| panic!("{what}: {e}"));
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if w.is_nan() || g.is_nan() {
            assert!(w.is_nan() && g.is_nan(), "{what}: element {i}: got {g}, want {w}");
            continue;
        }
        let err = (g - w).abs();
        assert!(
            err <= tol.atol + tol.rtol * w.abs() || (g.is_infinite() && g == w),
            "{what}: element {i} of {}: got {g}, want {w} (|err| {err}, tol {tol:?})",
            got.len()
        );
    }
}
