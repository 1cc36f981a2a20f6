//! The conformance suite on the built-in CPU backend, and proof that the suite catches broken devices.

use sd3::core::conformance::{self, Failure, Options, Report, Status};
use sd3::core::reference::ReferenceDevice;
use sd3::core::{BufferId, DType, Device, DeviceInfo, Error, OpCall, Result};

fn cpu() -> std::sync::Arc<dyn Device> {
    let _linked = sd3::cpu::cpu_device; // make sure the CPU backend registers itself
    let builtin = sd3::core::builtin_backends().find(|b| b.name == "cpu").expect("the cpu backend is registered");
    (builtin.create)("").unwrap().open_device(0).unwrap()
}

fn print_failures(report: &Report) -> String {
    report.failures().map(|r| format!("{} {} {}: {:?}\n", r.op, r.dtype, r.shape, r.status)).collect()
}

#[test]
fn cpu_backend_passes_every_case() {
    let report = conformance::run(cpu().as_ref(), &Options::default());
    assert!(report.results.len() > 500, "only {} cases", report.results.len());
    assert!(report.all_passed(), "{}\n{}", report.summary(), print_failures(&report));
}

/// What a [`Faulty`] device does wrong, to the op named in it.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Multiply every output element by `1 + rel`.
    Perturb(&'static str, f32),
    /// Write one byte just after the output view.
    WritePastEnd(&'static str),
    /// Make the first output element NaN.
    NaN(&'static str),
    /// Make the first output element +Inf.
    Inf(&'static str),
    /// Overwrite the first byte of the first input.
    ModifyInput(&'static str),
    Panic(&'static str),
    Error(&'static str),
    /// `supports` says no.
    Decline(&'static str),
    /// Do not write the output at all.
    Skip(&'static str),
    /// Treat every input as contiguous (from its offset), ignoring its strides.
    IgnoreInputStrides(&'static str),
    /// Write the output as if it were contiguous (from its offset), ignoring its strides.
    IgnoreOutputStrides(&'static str),
}

/// The reference device (f32 only, to keep these tests quick) with one deliberate fault.
struct Faulty {
    inner: ReferenceDevice,
    fault: Fault,
}

impl Faulty {
    fn new(fault: Fault) -> Self {
        Faulty { inner: ReferenceDevice::new(), fault }
    }
    fn targets(&self, call: &OpCall) -> Option<Fault> {
        let op = match self.fault {
            Fault::Perturb(op, _)
            | Fault::WritePastEnd(op)
            | Fault::NaN(op)
            | Fault::Inf(op)
            | Fault::ModifyInput(op)
            | Fault::Panic(op)
            | Fault::Error(op)
            | Fault::Decline(op)
            | Fault::Skip(op)
            | Fault::IgnoreInputStrides(op)
            | Fault::IgnoreOutputStrides(op) => op,
        };
        (call.op.name() == op).then_some(self.fault)
    }
    /// Apply `f` to every output element, in place.
    fn map_output(&self, call: &OpCall, mut f: impl FnMut(usize, f32) -> f32) -> Result<()> {
        let out = &call.outputs[0];
        let es = out.dtype.size_in_bytes();
        let mut positions = Vec::new();
        out.layout.for_each_index(|i| positions.push(i));
        for (k, i) in positions.into_iter().enumerate() {
            let mut b = vec![0u8; es];
            self.inner.download(out.buffer, i * es, &mut b)?;
            let v = f(k, out.dtype.bytes_to_f32(&b)[0]);
            self.inner.upload(out.buffer, i * es, &out.dtype.f32_to_bytes(&[v]))?;
        }
        Ok(())
    }
}

impl Device for Faulty {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { name: format!("faulty ({:?})", self.fault), dtypes: vec![DType::F32], ..self.inner.info() }
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
        !matches!(self.targets(call), Some(Fault::Decline(_))) && self.inner.supports(call)
    }
    fn execute(&self, call: &OpCall) -> Result<()> {
        let fault = self.targets(call);
        match fault {
            Some(Fault::Panic(op)) => panic!("deliberate panic in {op}"),
            Some(Fault::Error(op)) => return Err(Error::backend("faulty", format!("deliberate failure in {op}"))),
            Some(Fault::Skip(_)) => return Ok(()),
            Some(Fault::IgnoreInputStrides(_)) => {
                let inputs: Vec<_> = call.inputs.iter().map(as_contiguous).collect();
                return self.inner.execute(&OpCall { inputs: &inputs, ..call.clone() });
            }
            Some(Fault::IgnoreOutputStrides(_)) => {
                let outputs = [as_contiguous(&call.outputs[0])];
                return self.inner.execute(&OpCall { outputs: &outputs, ..call.clone() });
            }
            _ => {}
        }
        self.inner.execute(call)?;
        match fault {
            Some(Fault::Perturb(_, rel)) => self.map_output(call, |_, v| v * (1.0 + rel)),
            Some(Fault::NaN(_)) => self.map_output(call, |k, v| if k == 0 { f32::NAN } else { v }),
            Some(Fault::Inf(_)) => self.map_output(call, |k, v| if k == 0 { f32::INFINITY } else { v }),
            Some(Fault::WritePastEnd(_)) => {
                let out = &call.outputs[0];
                let end = out.layout.span_end() * out.dtype.size_in_bytes();
                let mut b = [0u8];
                self.inner.download(out.buffer, end, &mut b)?;
                self.inner.upload(out.buffer, end, &[!b[0]])
            }
            Some(Fault::ModifyInput(_)) => {
                let t = &call.inputs[0];
                let at = t.layout.offset * t.dtype.size_in_bytes();
                let mut b = [0u8];
                self.inner.download(t.buffer, at, &mut b)?;
                self.inner.upload(t.buffer, at, &[!b[0]])
            }
            _ => Ok(()),
        }
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// The same view with contiguous strides from its offset: what a kernel that ignores strides addresses.
fn as_contiguous(t: &sd3::core::TensorDesc) -> sd3::core::TensorDesc {
    let mut layout = sd3::core::Layout::contiguous(&t.layout.shape);
    layout.offset = t.layout.offset;
    sd3::core::TensorDesc { layout, ..t.clone() }
}

/// Run the suite filtered to `filter` on a device with `fault`.
fn run_faulty(fault: Fault, filter: &str) -> Report {
    let options = Options { filter: Some(filter.into()), ..Options::default() };
    let report = conformance::run(&Faulty::new(fault), &options);
    assert!(!report.results.is_empty(), "no case matches {filter}");
    report
}

/// Every case of `op` fails with a failure `check` accepts; every other case passes.
fn assert_only_op_fails(report: &Report, op: &str, check: impl Fn(&Failure) -> bool) {
    for r in &report.results {
        match &r.status {
            Status::Fail(f) if r.op == op => assert!(check(f), "{} {}: unexpected failure {f}", r.op, r.shape),
            s if r.op == op => panic!("{} {} should fail, got {s:?}", r.op, r.shape),
            s => assert_eq!(*s, Status::Pass, "{} {} should pass", r.op, r.shape),
        }
    }
}

#[test]
fn faultless_wrapper_passes() {
    let report = run_faulty(Fault::Perturb("none", 0.0), "unary");
    assert!(report.all_passed(), "{}", print_failures(&report));
}

#[test]
fn perturbed_output_fails_on_nmse() {
    // 10% off is far outside even matmul's 5e-4 NMSE.
    let report = run_faulty(Fault::Perturb("matmul", 0.1), "matmul");
    assert_only_op_fails(&report, "matmul", |f| matches!(f, Failure::Nmse { nmse, .. } if (*nmse - 1e-2).abs() < 2e-3));
    // 0.1% off (NMSE 1e-6) is outside an elementwise op's 1e-7; the other unary ops still pass.
    let report = run_faulty(Fault::Perturb("unary.silu", 1e-3), "unary");
    assert_only_op_fails(&report, "unary.silu", |f| matches!(f, Failure::Nmse { .. }));
}

#[test]
fn write_past_the_output_fails_on_the_sentinel() {
    let report = run_faulty(Fault::WritePastEnd("binary.add"), "binary.add");
    assert_only_op_fails(&report, "binary.add", |f| matches!(f, Failure::Sentinel { count: 1, .. }));
}

#[test]
fn nan_and_inf_fail() {
    let report = run_faulty(Fault::NaN("softmax"), "softmax");
    assert_only_op_fails(&report, "softmax", |f| *f == Failure::NaN { element: 0 });
    let report = run_faulty(Fault::Inf("layer_norm"), "layer_norm");
    assert_only_op_fails(&report, "layer_norm", |f| matches!(f, Failure::InfMismatch { element: 0, .. }));
}

#[test]
fn modified_input_fails() {
    let report = run_faulty(Fault::ModifyInput("gather"), "gather");
    assert_only_op_fails(&report, "gather", |f| matches!(f, Failure::InputModified { index: 0, count: 1, .. }));
}

#[test]
fn missing_output_fails() {
    let report = run_faulty(Fault::Skip("rms_norm"), "rms_norm");
    assert_only_op_fails(&report, "rms_norm", |f| {
        matches!(f, Failure::Nmse { .. } | Failure::NaN { .. } | Failure::InfMismatch { .. })
    });
}

#[test]
fn ignoring_strides_fails_exactly_the_strided_cases() {
    let report = run_faulty(Fault::IgnoreInputStrides("binary.mul"), "binary.mul");
    for r in &report.results {
        // Shape labels tag every non-contiguous operand (T, P, S, B); untagged cases are unaffected.
        let strided_input = r.shape.split(" → ").next().unwrap().contains(|c: char| "TPSB".contains(c));
        assert_eq!(matches!(r.status, Status::Fail(_)), strided_input, "{} {}: {:?}", r.op, r.shape, r.status);
    }
    assert!(report.failed() >= 4 && report.passed() >= 2, "{}", report.summary());

    let report = run_faulty(Fault::IgnoreOutputStrides("unary.tanh"), "unary.tanh");
    for r in &report.results {
        if r.shape.ends_with("]S") {
            assert!(matches!(r.status, Status::Fail(Failure::Sentinel { .. })), "{}: {:?}", r.shape, r.status);
        } else {
            assert_eq!(r.status, Status::Pass, "{}", r.shape);
        }
    }
    assert_eq!(report.failed(), 1, "{}", report.summary());
}

#[test]
fn panics_and_errors_fail_with_their_message() {
    let report = run_faulty(Fault::Panic("conv2d"), "conv2d");
    assert_only_op_fails(&report, "conv2d", |f| *f == Failure::Panic("deliberate panic in conv2d".into()));
    let report = run_faulty(Fault::Error("attention"), "attention");
    assert_only_op_fails(
        &report,
        "attention",
        |f| matches!(f, Failure::Error(m) if m.contains("deliberate failure in attention")),
    );
}

#[test]
fn declined_ops_are_unsupported_not_failures() {
    let report = run_faulty(Fault::Decline("group_norm"), "norm");
    assert!(report.all_passed());
    for r in &report.results {
        let expected = if r.op == "group_norm" { Status::Unsupported } else { Status::Pass };
        assert_eq!(r.status, expected, "{} {}", r.op, r.shape);
    }
}

#[test]
fn report_prints_and_serialises() {
    let report = run_faulty(Fault::NaN("unary.exp"), "unary.exp");
    let mut table = Vec::new();
    report.write_table(&mut table).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(table.contains("FAIL") && table.contains("NaN at output element 0"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("valid JSON");
    assert_eq!(json["summary"]["failed"], report.failed());
    assert_eq!(json["cases"][0]["status"], "fail");
}

#[test]
fn perf_mode_times_cases() {
    let options = Options { filter: Some("unary.silu".into()), perf: true, perf_max_runs: 3, ..Options::default() };
    let report = conformance::run(&Faulty::new(Fault::Decline("none")), &options);
    assert_eq!(report.results.len(), 1);
    let perf = report.results[0].perf.as_ref().expect("timed");
    assert!(perf.runs >= 1 && perf.median_us > 0.0 && perf.gbps() > 0.0);
}

#[test]
fn cli_runs_the_suite_and_writes_json() {
    let json = std::env::temp_dir().join(format!("sd3-conformance-{}.json", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sd3"))
        .args(["conformance", "--backend", "cpu", "--filter", "gather", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("gather") && stdout.contains("0 failed"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(report["summary"]["passed"].as_u64().unwrap() > 0);
    std::fs::remove_file(json).ok();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sd3"))
        .args(["conformance", "--backend", "no-such-backend"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no backend named `no-such-backend`"));
}
