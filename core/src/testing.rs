//! Differential testing of one op at a time: run it on a device under test and on [`ReferenceDevice`] with
//! identical buffers, and compare the *whole* output buffers, so elements outside the output view (prefilled
//! with a sentinel) must be left untouched. For backends' own unit tests (`backends/*/tests/`); the
//! [`conformance`](crate::conformance) suite is the acceptance test. Functions here panic on failure, as tests do.
//!
//! [`cases`] holds the op test cases every backend runs, and [`backend_tests!`](crate::backend_tests) expands to
//! one `#[test]` per case for a given device, so that a backend's op test file is one line:
//!
//! ```ignore
//! sd3_core::backend_tests!(common::device()); // an Option of the device under test
//! ```

pub mod cases;
pub mod provider;

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

/// The buffers of a call's inputs (from `seed`) and its output (a sentinel everywhere).
fn make_buffers(inputs: &[Spec], output: &Spec, seed: u64) -> (Vec<Vec<u8>>, Vec<u8>) {
    let mut rng = Rng::new(seed);
    let in_bytes = inputs.iter().map(|s| fill_bytes(s, &mut rng)).collect();
    (in_bytes, output.dtype.f32_to_bytes(&vec![7.0; output.buffer_elems()]))
}

/// Upload the buffers to `d`, run `op`, and return the f32 values of the whole output buffer.
fn run_buffers(
    d: &dyn Device,
    op: Op,
    inputs: &[Spec],
    in_bytes: &[Vec<u8>],
    output: &Spec,
    out_bytes: &[u8],
) -> Result<Vec<f32>, crate::Error> {
    let ins: Vec<TensorDesc> = inputs.iter().zip(in_bytes).map(|(s, b)| place(d, s, b)).collect();
    let out = place(d, output, out_bytes);
    let call = OpCall { op, inputs: &ins, outputs: std::slice::from_ref(&out) };
    assert!(d.supports(&call), "{} does not support {op:?} on {:?}", d.info().name, call);
    let r = d.execute(&call);
    let mut bytes = vec![0u8; out_bytes.len()];
    let r = r.and_then(|_| d.download(out.buffer, 0, &mut bytes));
    for t in ins.iter().chain([&out]) {
        d.free(t.buffer);
    }
    r?;
    Ok(output.dtype.bytes_to_f32(&bytes))
}

/// Run `op` on `dev` alone, from the buffers [`run_both`] makes for `seed`: the f32 values of the whole output
/// buffer, or the device's error (for cases where the reference fails too, e.g. bad input).
pub fn run_on(dev: &dyn Device, op: Op, inputs: &[Spec], output: &Spec, seed: u64) -> Result<Vec<f32>, crate::Error> {
    let (in_bytes, out_bytes) = make_buffers(inputs, output, seed);
    run_buffers(dev, op, inputs, &in_bytes, output, &out_bytes)
}

/// Run `op` on `dev` and on the reference device with identical buffers; returns (device result, reference
/// result) as the f32 values of the whole output buffer, or the first error (the device's, then the reference's).
pub fn run_both(
    dev: &dyn Device,
    op: Op,
    inputs: &[Spec],
    output: &Spec,
    seed: u64,
) -> Result<(Vec<f32>, Vec<f32>), crate::Error> {
    let (in_bytes, out_bytes) = make_buffers(inputs, output, seed);
    let got = run_buffers(dev, op, inputs, &in_bytes, output, &out_bytes)?;
    let want = run_buffers(&ReferenceDevice::new(), op, inputs, &in_bytes, output, &out_bytes)?;
    Ok((got, want))
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

/// Run one of [`cases`] on `dev`, or print why it is skipped when there is no device. What
/// [`backend_tests!`](crate::backend_tests) expands to.
pub fn run_case(name: &str, dev: Option<&dyn Device>, case: fn(&dyn Device)) {
    match dev {
        Some(dev) => case(dev),
        None => eprintln!("SKIPPED: {name}: no usable device (the reason is printed where the device is opened)"),
    }
}

/// One `#[test]` per op test case of [`testing::cases`](crate::testing::cases), run on the device that
/// `$device` evaluates to: an `Option` of an `Arc` (or any smart pointer) of a [`Device`](crate::Device),
/// `None` when the machine has no usable device, in which case each test prints that it is skipped and passes.
/// `$device` is evaluated once per test, so it should be cheap after the first call (e.g. a `OnceLock`).
/// Every case by default; `backend_tests!(device; case, ...)` runs only the cases named (say why in a comment).
///
/// ```ignore
/// mod common; // fn device() -> Option<Arc<MyDevice>>
/// sd3_core::backend_tests!(common::device());
/// ```
#[macro_export]
macro_rules! backend_tests {
    ($device:expr; $($case:ident),+ $(,)?) => {
        $(
            #[test]
            fn $case() {
                let device = $device;
                let device = device.as_deref().map(|d| d as &dyn $crate::Device);
                $crate::testing::run_case(stringify!($case), device, $crate::testing::cases::$case);
            }
        )+
    };
    ($device:expr) => {
        $crate::backend_tests!($device;
            copy_casts_and_views,
            fill,
            unary_all,
            binary_broadcast_and_maps,
            matmul_shapes_layouts_dtypes,
            matmul_half_precision_tiles,
            softmax_and_norms,
            attention_long_masked_normed,
            attention_half_precision_tiles,
            conv2d_and_upsample,
            gather_rows,
            gather_bad_ids,
        );
    };
}
