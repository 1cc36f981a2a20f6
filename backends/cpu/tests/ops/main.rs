//! The CPU backend against the f64 reference device, op by op: random inputs (seeded), odd sizes, every float
//! dtype, broadcast / transposed / sliced views. Each case also checks that bytes of the output buffer outside
//! the output view are untouched.
//!
//! Errors are normalised MSE: Σ(cpu − ref)² / Σ ref², against a tolerance for the f32 computation (stated per
//! op family). f16/bf16 *outputs* get an allowance on top: both devices round once to the output dtype, but the
//! CPU rounds its f32 result, which can land one output ulp (2^-10 relative for f16, 2^-7 for bf16) away from
//! the rounded f64 result when the exact value is near a rounding midpoint. The allowance admits that for 1% of
//! the elements (at least one), weighted as the largest reference value: `ulp² · k · max(ref²) / Σ ref²`.

mod elementwise;
mod linalg;
mod norms;

/// The op test cases every backend runs (`sd3_core::testing::cases`, compared element by element), besides this
/// file's own NMSE-based ones.
mod shared_cases {
    sd3_core::backend_tests!(Some(std::sync::Arc::new(sd3_backend_cpu::CpuDevice::new())));
}

use sd3_backend_cpu::CpuDevice;
use sd3_core::reference::ReferenceDevice;
use sd3_core::{BufferId, DType, Device, Layout, Op, OpCall, TensorDesc};

/// splitmix64: a small, seeded PRNG.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How input values are drawn.
#[derive(Clone, Copy, Debug)]
pub enum Gen {
    /// Uniform in [lo, hi).
    Uniform(f64, f64),
    /// Magnitude in [lo, hi), random sign: never near zero (for division, reciprocals).
    AwayFromZero(f64, f64),
    /// Integers in [lo, hi).
    Ints(i64, i64),
}

impl Gen {
    fn draw(self, rng: &mut Rng) -> f64 {
        match self {
            Gen::Uniform(lo, hi) => lo + (hi - lo) * rng.unit(),
            Gen::AwayFromZero(lo, hi) => {
                let m = lo + (hi - lo) * rng.unit();
                if rng.next_u64() & 1 == 0 {
                    m
                } else {
                    -m
                }
            }
            Gen::Ints(lo, hi) => (lo + (rng.next_u64() % (hi - lo) as u64) as i64) as f64,
        }
    }
}

/// How an operand's view sits in its buffer.
#[derive(Clone, Debug)]
pub enum ViewKind {
    Contiguous,
    /// A slice starting at index 1 of each dim of a larger buffer (padded by 1 or 2 per dim).
    Sliced,
    /// Logical dim i is physical dim perm[i] of a contiguous buffer (a transposed / permuted view).
    Permuted(Vec<usize>),
    /// Stride 0 in these dims.
    Broadcast(Vec<usize>),
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub view: ViewKind,
    pub gen: Gen,
}

pub fn spec(dtype: DType, shape: &[usize]) -> Spec {
    Spec { dtype, shape: shape.to_vec(), view: ViewKind::Contiguous, gen: Gen::Uniform(-2.0, 2.0) }
}

impl Spec {
    pub fn view(mut self, v: ViewKind) -> Spec {
        self.view = v;
        self
    }
    pub fn gen(mut self, g: Gen) -> Spec {
        self.gen = g;
        self
    }
    pub fn sliced(self) -> Spec {
        self.view(ViewKind::Sliced)
    }
    pub fn permuted(self, perm: &[usize]) -> Spec {
        self.view(ViewKind::Permuted(perm.to_vec()))
    }
    pub fn broadcast(self, dims: &[usize]) -> Spec {
        self.view(ViewKind::Broadcast(dims.to_vec()))
    }
    /// The last two dims swapped in memory (a transposed matrix).
    pub fn transposed(self) -> Spec {
        let r = self.shape.len();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.permuted(&perm)
    }

    /// The layout and the number of buffer elements it needs.
    fn layout(&self) -> (Layout, usize) {
        let shape = &self.shape;
        let r = shape.len();
        match &self.view {
            ViewKind::Contiguous => (Layout::contiguous(shape), shape.iter().product::<usize>().max(1)),
            ViewKind::Sliced => {
                let phys: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| d + 1 + i % 2).collect();
                let ps = sd3_core::layout::contiguous_strides(&phys);
                let offset = ps.iter().sum();
                (Layout { shape: shape.clone(), strides: ps, offset }, phys.iter().product())
            }
            ViewKind::Permuted(perm) => {
                let mut phys = vec![0; r];
                for i in 0..r {
                    phys[perm[i]] = shape[i];
                }
                let ps = sd3_core::layout::contiguous_strides(&phys);
                let strides = (0..r).map(|i| ps[perm[i]]).collect();
                (Layout { shape: shape.clone(), strides, offset: 0 }, phys.iter().product::<usize>().max(1))
            }
            ViewKind::Broadcast(dims) => {
                let phys: Vec<usize> = (0..r).map(|i| if dims.contains(&i) { 1 } else { shape[i] }).collect();
                let mut strides = sd3_core::layout::contiguous_strides(&phys);
                dims.iter().for_each(|&d| strides[d] = 0);
                (Layout { shape: shape.clone(), strides, offset: 0 }, phys.iter().product::<usize>().max(1))
            }
        }
    }
}

/// One operand placed on both devices with identical bytes.
struct Placed {
    cpu: TensorDesc,
    reference: TensorDesc,
    bytes: Vec<u8>,
}

fn place(cpu: &dyn Device, reference: &dyn Device, s: &Spec, rng: &mut Rng) -> Placed {
    let (layout, elems) = s.layout();
    let gen = if s.dtype.is_float() {
        s.gen
    } else {
        match s.gen {
            Gen::Ints(..) => s.gen,
            _ if s.dtype == DType::U8 => Gen::Ints(0, 256),
            _ => Gen::Ints(-1000, 1000),
        }
    };
    let vals: Vec<f32> = (0..elems).map(|_| gen.draw(rng) as f32).collect();
    let bytes = s.dtype.f32_to_bytes(&vals);
    let put = |d: &dyn Device| {
        let b = d.alloc(bytes.len()).unwrap();
        d.upload(b, 0, &bytes).unwrap();
        TensorDesc { buffer: b, dtype: s.dtype, layout: layout.clone() }
    };
    Placed { cpu: put(cpu), reference: put(reference), bytes }
}

/// Element values of a view (logical order) decoded from raw buffer bytes.
pub fn logical(bytes: &[u8], t: &TensorDesc) -> Vec<f64> {
    let es = t.dtype.size_in_bytes();
    let mut out = Vec::new();
    t.layout.for_each_index(|i| {
        let b = &bytes[i * es..(i + 1) * es];
        out.push(match t.dtype {
            DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
            DType::F16 => half::f16::from_le_bytes(b.try_into().unwrap()).to_f64(),
            DType::BF16 => half::bf16::from_le_bytes(b.try_into().unwrap()).to_f64(),
            DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f64,
            DType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f64,
            DType::U8 => b[0] as f64,
        })
    });
    out
}

fn download(d: &dyn Device, b: BufferId, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    d.download(b, 0, &mut out).unwrap();
    out
}

/// Normalised MSE of `got` against `want`; NaN/inf anywhere in `got` that is not in `want` gives +inf.
pub fn nmse(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut err, mut pow) = (0.0, 0.0);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() || !w.is_finite() {
            if g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan()) {
                return f64::INFINITY;
            }
            continue;
        }
        err += (g - w) * (g - w);
        pow += w * w;
    }
    if pow == 0.0 {
        return if err == 0.0 { 0.0 } else { f64::INFINITY };
    }
    err / pow
}

/// Result of one comparison: the normalised MSE and the rounding allowance of the output dtype.
pub struct Outcome {
    pub nmse: f64,
    pub allowance: f64,
}

/// Run `op` on the CPU device and the reference with identical random operands.
/// Panics if the CPU device touches output bytes outside the output view.
pub fn compare(op: Op, inputs: &[Spec], output: &Spec, seed: u64) -> Outcome {
    let cpu = CpuDevice::new();
    let reference = ReferenceDevice::new();
    let mut rng = Rng::new(seed);
    let ins: Vec<Placed> = inputs.iter().map(|s| place(&cpu, &reference, s, &mut rng)).collect();
    let out = place(&cpu, &reference, output, &mut rng);
    let run = |d: &dyn Device, pick: fn(&Placed) -> &TensorDesc| {
        let in_descs: Vec<TensorDesc> = ins.iter().map(|p| pick(p).clone()).collect();
        let out_descs = vec![pick(&out).clone()];
        let call = OpCall { op, inputs: &in_descs, outputs: &out_descs };
        assert!(d.supports(&call), "{} does not support {op:?} on {inputs:?} -> {output:?}", d.info().name);
        d.execute(&call).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        download(d, pick(&out).buffer, out.bytes.len())
    };
    let got_bytes = run(&cpu, |p| &p.cpu);
    let want_bytes = run(&reference, |p| &p.reference);
    // Bytes outside the output view must be untouched.
    let es = output.dtype.size_in_bytes();
    let mut inside = vec![false; out.bytes.len() / es];
    out.cpu.layout.for_each_index(|i| inside[i] = true);
    for (i, _) in inside.iter().enumerate().filter(|(_, &v)| !v) {
        let (got, was) = (&got_bytes[i * es..(i + 1) * es], &out.bytes[i * es..(i + 1) * es]);
        assert_eq!(got, was, "{op:?}: element {i} outside the output view was written");
    }
    let want = logical(&want_bytes, &out.reference);
    let ulp = match output.dtype {
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        _ => 0.0,
    };
    let k = (want.len() / 100).max(1) as f64;
    let max2 = want.iter().filter(|v| v.is_finite()).fold(0.0f64, |m, v| m.max(v * v));
    let pow: f64 = want.iter().filter(|v| v.is_finite()).map(|v| v * v).sum();
    let allowance = if pow > 0.0 { ulp * ulp * k * max2 / pow } else { 0.0 };
    Outcome { nmse: nmse(&logical(&got_bytes, &out.cpu), &want), allowance }
}

/// Assert the CPU result is within `f32_tol` normalised MSE of the reference (plus the output dtype's
/// rounding allowance).
#[track_caller]
pub fn check(what: &str, op: Op, inputs: &[Spec], output: &Spec, f32_tol: f64) {
    let o = compare(op, inputs, output, seed_of(what));
    let tolerance = f32_tol + o.allowance;
    if std::env::var_os("SD3_SHOW_NMSE").is_some() {
        eprintln!("{what}: nmse {:.2e} (tolerance {tolerance:.2e})", o.nmse);
    }
    assert!(
        o.nmse <= tolerance,
        "{what}: normalised MSE {:e} > {tolerance:e} ({op:?}, {inputs:?} -> {output:?})",
        o.nmse
    );
}

/// Assert the CPU result is bit-identical in value to the reference (copies, casts, gathers).
#[track_caller]
pub fn check_exact(what: &str, op: Op, inputs: &[Spec], output: &Spec) {
    let o = compare(op, inputs, output, seed_of(what));
    assert!(
        o.nmse == 0.0,
        "{what}: normalised MSE {:e}, exact result expected ({op:?}, {inputs:?} -> {output:?})",
        o.nmse
    );
}

/// A seed per case name (FNV-1a), so every case draws different data, reproducibly.
fn seed_of(what: &str) -> u64 {
    what.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

pub const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
