//! Device-side legalisation (`sd3_core::legalize`) with fake devices: the reference device behind a `supports`
//! policy (e.g. "contiguous operands only"), checked against the reference device taking everything.

use sd3_core::reference::ReferenceDevice;
use sd3_core::{Backend, BufferId, DType, Device, DeviceInfo, Error, Op, OpCall, Result, Tensor, TensorDesc, UnaryOp};
use std::sync::{Arc, Mutex};

type Policy = Box<dyn Fn(&OpCall) -> bool + Send + Sync>;

/// The reference device, declining what `policy` declines, logging the ops it executes.
struct FakeDevice {
    inner: ReferenceDevice,
    policy: Policy,
    log: Mutex<Vec<String>>,
}

impl Device for FakeDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        self.inner.alloc(bytes)
    }
    fn free(&self, buffer: BufferId) {
        self.inner.free(buffer)
    }
    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        self.inner.upload(buffer, offset, data)
    }
    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        self.inner.download(buffer, offset, out)
    }
    fn copy_buffer(&self, src: BufferId, so: usize, dst: BufferId, d_o: usize, n: usize) -> Result<()> {
        self.inner.copy_buffer(src, so, dst, d_o, n)
    }
    fn supports(&self, call: &OpCall) -> bool {
        self.inner.supports(call) && (self.policy)(call)
    }
    fn execute(&self, call: &OpCall) -> Result<()> {
        assert!(self.supports(call), "execute of a declined call: {call:?}");
        self.log.lock().unwrap().push(call.op.name());
        self.inner.execute(call)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

fn plain(t: &TensorDesc) -> bool {
    t.layout.offset == 0 && t.is_contiguous()
}

/// Copies of any layout; every other op only with plain contiguous operands.
fn contiguous_only(call: &OpCall) -> bool {
    call.op == Op::Copy || call.inputs.iter().chain(call.outputs).all(plain)
}

struct Setup {
    dev: Arc<FakeDevice>,
    be: Backend,
    reference: Backend,
}

fn setup(policy: impl Fn(&OpCall) -> bool + Send + Sync + 'static, strict: bool) -> Setup {
    let dev = Arc::new(FakeDevice { inner: ReferenceDevice::new(), policy: Box::new(policy), log: Mutex::default() });
    let be = Backend::with_fallback("fake", dev.clone(), Arc::new(ReferenceDevice::new()), strict);
    Setup { dev, be, reference: Backend::new("reference", Arc::new(ReferenceDevice::new())) }
}

impl Setup {
    fn ops(&self) -> Vec<String> {
        self.dev.log.lock().unwrap().clone()
    }
}

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
}

/// `x [5, 7] · w [6, 7]ᵀ + bias` on a backend: `w`'s transpose is a column-major (non-contiguous) view.
fn linear(be: &Backend) -> Tensor {
    let x = be.from_f32(&values(35, 1), &[5, 7], DType::F32).unwrap();
    let w = be.from_f32(&values(42, 2), &[6, 7], DType::F32).unwrap();
    let b = be.from_f32(&values(6, 3), &[6], DType::F32).unwrap();
    x.linear(&w, Some(&b)).unwrap()
}

#[test]
fn strided_inputs_are_copied_on_the_device() {
    let s = setup(contiguous_only, true);
    let y = linear(&s.be);
    assert_eq!(y.to_f32_vec().unwrap(), linear(&s.reference).to_f32_vec().unwrap());
    assert!(s.be.fallback_counts().is_empty());
    assert_eq!(s.ops(), ["copy", "matmul"], "one copy of the transposed weight, then the matmul");
    let st = s.be.legalize_stats();
    assert_eq!((st.copies, st.copy_bytes), (1, 42 * 4));
    assert_eq!(st.rewritten.get("matmul"), Some(&1));
    let lines = s.be.stats();
    assert!(lines.contains(&"legalize.copies=1".to_string()), "{lines:?}");
    assert!(lines.contains(&"legalize.rewritten=matmul:1".to_string()), "{lines:?}");
}

#[test]
fn a_strided_output_is_computed_into_a_temporary_and_copied_into_the_view() {
    let s = setup(contiguous_only, true);
    let run = |be: &Backend| {
        let x = be.from_f32(&values(20, 4), &[4, 5], DType::F32).unwrap();
        let big = be.full(&[4, 9], DType::F32, 7.0).unwrap();
        let view = big.narrow(1, 2, 5).unwrap();
        be.run(Op::Unary(UnaryOp::Neg), &[&x], &[&view]).unwrap();
        big.to_f32_vec().unwrap()
    };
    let got = run(&s.be);
    assert_eq!(got, run(&s.reference), "the view gets -x, the rest of the buffer stays 7");
    assert_eq!(got.iter().filter(|&&v| v == 7.0).count(), 4 * 4);
    assert_eq!(s.ops(), ["fill", "unary.neg", "copy"]);
    assert_eq!(s.be.legalize_stats().copies, 1);
}

#[test]
fn only_the_operands_the_device_declines_are_copied() {
    // Takes any layout except a left matmul operand that is not plain.
    let s = setup(|c: &OpCall| !matches!(c.op, Op::Matmul { .. }) || plain(&c.inputs[0]), true);
    let run = |be: &Backend| {
        let a = be.from_f32(&values(35, 5), &[7, 5], DType::F32).unwrap().transpose(0, 1).unwrap();
        let b = be.from_f32(&values(42, 6), &[6, 7], DType::F32).unwrap().transpose(0, 1).unwrap();
        a.matmul(&b).unwrap().to_f32_vec().unwrap()
    };
    assert_eq!(run(&s.be), run(&s.reference));
    assert_eq!(s.ops(), ["copy", "matmul"], "a is copied, b (also strided) is not");
    assert_eq!(s.be.legalize_stats().copy_bytes, 35 * 4);
}

#[test]
fn without_a_usable_rewrite_the_host_runs_it_or_strict_refuses() {
    // Declines every non-plain layout, copies included: nothing to rewrite with.
    let no_copies = |c: &OpCall| c.inputs.iter().chain(c.outputs).all(plain);
    let s = setup(no_copies, false);
    assert_eq!(linear(&s.be).to_f32_vec().unwrap(), linear(&s.reference).to_f32_vec().unwrap());
    assert_eq!(s.be.fallback_counts().get("matmul"), Some(&1));
    assert_eq!(s.be.legalize_stats().copies, 0);
    assert!(!s.ops().iter().any(|o| o == "matmul" || o == "copy"), "{:?}", s.ops());

    let s = setup(no_copies, true);
    let x = s.be.from_f32(&values(35, 1), &[5, 7], DType::F32).unwrap();
    let w = s.be.from_f32(&values(42, 2), &[6, 7], DType::F32).unwrap();
    match x.linear(&w, None) {
        Err(Error::Unsupported { op, detail, .. }) => {
            assert_eq!(op, "matmul");
            assert!(detail.contains("--strict"), "{detail}");
        }
        other => panic!("expected an Unsupported error under strict, got {other:?}"),
    }
}

#[test]
fn an_op_the_device_never_takes_costs_no_device_work() {
    let s = setup(|c: &OpCall| c.op != Op::Softmax, false);
    let run = |be: &Backend| {
        let x = be.from_f32(&values(24, 7), &[4, 6], DType::F32).unwrap().transpose(0, 1).unwrap();
        x.softmax().unwrap().to_f32_vec().unwrap()
    };
    assert_eq!(run(&s.be), run(&s.reference));
    assert_eq!(s.be.fallback_counts().get("softmax"), Some(&1));
    assert_eq!(s.be.legalize_stats(), Default::default());
    assert!(s.be.stats().iter().all(|l| !l.starts_with("legalize.")));
    assert!(!s.ops().contains(&"copy".to_string()), "no copy may be queued for a rewrite that is not used");
}

fn linear_gelu(be: &Backend, out: Option<&Tensor>) -> Vec<f32> {
    let x = be.from_f32(&values(35, 1), &[5, 7], DType::F32).unwrap();
    let w = be.from_f32(&values(42, 2), &[6, 7], DType::F32).unwrap();
    let b = be.from_f32(&values(6, 3), &[6], DType::F32).unwrap();
    match out {
        Some(out) => {
            x.linear_into(&w, Some(&b), Some(UnaryOp::GeluTanh), out).unwrap();
            out.to_f32_vec().unwrap()
        }
        None => x.linear_act(&w, Some(&b), Some(UnaryOp::GeluTanh)).unwrap().to_f32_vec().unwrap(),
    }
}

/// Equal but for the one f32 rounding between a decomposed matmul and its activation.
fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "element {i}: {g} vs {w}");
    }
}

#[test]
fn a_declined_activation_epilogue_runs_as_matmul_then_unary() {
    let s = setup(|c: &OpCall| !matches!(c.op, Op::Matmul { act: Some(_), .. }), true);
    assert_close(&linear_gelu(&s.be, None), &linear_gelu(&s.reference, None));
    assert_eq!(s.ops(), ["matmul", "unary.gelu_tanh"]);
    let st = s.be.legalize_stats();
    assert_eq!(st.decomposed.get("matmul.gelu_tanh"), Some(&1));
    assert_eq!(st.copies, 0);
    // A device that takes the fused form gets it as one call.
    let s = setup(|_: &OpCall| true, true);
    assert_eq!(linear_gelu(&s.be, None), linear_gelu(&s.reference, None));
    assert_eq!(s.ops(), ["matmul.gelu_tanh"]);
}

#[test]
fn decomposition_and_relayout_combine() {
    // Contiguous operands only and no epilogue; the output is a column slice of a bigger buffer.
    let s = setup(|c: &OpCall| contiguous_only(c) && !matches!(c.op, Op::Matmul { act: Some(_), .. }), true);
    let run = |be: &Backend| {
        let big = be.zeros(&[5, 10], DType::F32).unwrap();
        let mut v = linear_gelu(be, Some(&big.narrow(1, 3, 6).unwrap()));
        v.extend(big.to_f32_vec().unwrap());
        v
    };
    assert_close(&run(&s.be), &run(&s.reference));
    assert_eq!(s.ops(), ["fill", "copy", "matmul", "unary.gelu_tanh", "copy", "copy"]);
    let st = s.be.legalize_stats();
    assert_eq!(st.decomposed.get("matmul.gelu_tanh"), Some(&1));
    assert_eq!(st.copies, 2, "the transposed weight in, the activation's output into the view");
}

/// `x + gate·(h·wᵀ + b)` with `h [2, 5, 7]`, `w [6, 7]`, `x [2, 5, 6]` and one gate row per batch element.
fn linear_gated_residual(be: &Backend) -> Vec<f32> {
    let h = be.from_f32(&values(70, 1), &[2, 5, 7], DType::F32).unwrap();
    let w = be.from_f32(&values(42, 2), &[6, 7], DType::F32).unwrap();
    let b = be.from_f32(&values(6, 3), &[6], DType::F32).unwrap();
    let x = be.from_f32(&values(60, 4), &[2, 5, 6], DType::F32).unwrap();
    let gate = be.from_f32(&values(12, 5), &[2, 1, 6], DType::F32).unwrap();
    h.linear_gated_residual(&w, Some(&b), &x, &gate).unwrap().to_f32_vec().unwrap()
}

#[test]
fn a_declined_gated_residual_epilogue_runs_as_matmul_then_gated_residual() {
    // The same values as the two ops of an unfused model.
    let r = &setup(|_: &OpCall| true, true).reference;
    let unfused = {
        let h = r.from_f32(&values(70, 1), &[2, 5, 7], DType::F32).unwrap();
        let w = r.from_f32(&values(42, 2), &[6, 7], DType::F32).unwrap();
        let b = r.from_f32(&values(6, 3), &[6], DType::F32).unwrap();
        let x = r.from_f32(&values(60, 4), &[2, 5, 6], DType::F32).unwrap();
        let gate = r.from_f32(&values(12, 5), &[2, 1, 6], DType::F32).unwrap();
        x.gated_residual(&gate, &h.linear(&w, Some(&b)).unwrap()).unwrap().to_f32_vec().unwrap()
    };
    assert_close(&linear_gated_residual(r), &unfused);
    // A device without the fusion: the Tensor API runs the linear and the gated residual itself.
    let s = setup(|c: &OpCall| !matches!(c.op, Op::MatmulGatedResidual { .. }), true);
    assert_close(&linear_gated_residual(&s.be), &unfused);
    assert_eq!(s.ops(), ["matmul", "gated_residual"]);
    assert_eq!(s.be.legalize_stats(), Default::default());
    // The fused op sent as it is (as a plugin host or the conformance suite may): legalisation decomposes it.
    let be = &s.be;
    let t = |n: usize, shape: &[usize], seed| be.from_f32(&values(n, seed), shape, DType::F32).unwrap();
    let (h, x) = (t(70, &[2, 5, 7], 1), t(60, &[2, 5, 6], 4));
    let wt = t(42, &[6, 7], 2).transpose(0, 1).unwrap().unsqueeze(0).unwrap().broadcast_to(&[2, 7, 6]).unwrap();
    let gate = t(12, &[2, 1, 6], 5).broadcast_to(&[2, 5, 6]).unwrap();
    let y = be.zeros(&[2, 5, 6], DType::F32).unwrap();
    be.run(Op::MatmulGatedResidual { bias: true }, &[&h, &wt, &t(6, &[6], 3), &x, &gate], &[&y]).unwrap();
    assert_close(&y.to_f32_vec().unwrap(), &unfused);
    let st = s.be.legalize_stats();
    assert_eq!(st.decomposed.get("matmul_gated_residual"), Some(&1));
    assert_eq!(st.copies, 0);
    // A device that takes the fused form gets it as one call.
    let s = setup(|_: &OpCall| true, true);
    assert_eq!(linear_gated_residual(&s.be), linear_gated_residual(&s.reference));
    assert_eq!(s.ops(), ["matmul_gated_residual"]);
}
