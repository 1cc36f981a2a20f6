//! Running one case on a device: stage the operands, execute, read everything back, judge.

use super::compare::{check_values, nmse_limit, sentinel_damage, view_mask, view_values, ValueError};
use super::perf;
use super::report::{CaseResult, Failure, PerfResult, Status};
use super::rng::{fnv1a64, SplitMix64};
use super::{Case, Options, SENTINEL_BYTES};
use crate::reference::ReferenceDevice;
use crate::{BufferId, Device, OpCall, TensorDesc};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// Host bytes of a case: each input buffer, and the initial bytes of the output buffer (view plus sentinel).
struct HostData {
    inputs: Vec<Vec<u8>>,
    output: Vec<u8>,
}

impl HostData {
    fn generate(case: &Case, seed: u64) -> HostData {
        let mut rng = SplitMix64::new(seed ^ fnv1a64(&case.id()));
        let inputs = case.inputs.iter().map(|t| t.generate(&mut rng)).collect();
        let len = case.output.buffer_elems * case.output.dtype.size_in_bytes() + SENTINEL_BYTES;
        let output = (0..len).map(|_| rng.next_u64() as u8).collect();
        HostData { inputs, output }
    }
}

/// A case's buffers on one device, freed on drop.
struct Staged<'a> {
    device: &'a dyn Device,
    inputs: Vec<TensorDesc>,
    output: Option<TensorDesc>,
    buffers: Vec<BufferId>,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        for &b in &self.buffers {
            let _ = catch_unwind(AssertUnwindSafe(|| self.device.free(b)));
        }
    }
}

impl<'a> Staged<'a> {
    fn new(device: &'a dyn Device, case: &Case, data: &HostData) -> Result<Staged<'a>, String> {
        let mut st = Staged { device, inputs: Vec::new(), output: None, buffers: Vec::new() };
        for (i, (spec, bytes)) in case.inputs.iter().zip(&data.inputs).enumerate() {
            let buffer = st.buffer(bytes).map_err(|e| format!("staging input #{i}: {e}"))?;
            st.inputs.push(TensorDesc { buffer, dtype: spec.dtype, layout: spec.layout.clone() });
        }
        let buffer = st.buffer(&data.output).map_err(|e| format!("staging the output: {e}"))?;
        st.output = Some(TensorDesc { buffer, dtype: case.output.dtype, layout: case.output.layout.clone() });
        Ok(st)
    }

    fn buffer(&mut self, bytes: &[u8]) -> crate::Result<BufferId> {
        let b = self.device.alloc(bytes.len().max(1))?;
        self.buffers.push(b);
        if !bytes.is_empty() {
            self.device.upload(b, 0, bytes)?;
        }
        Ok(b)
    }

    fn call<'s>(&'s self, case: &Case) -> OpCall<'s> {
        OpCall { op: case.op, inputs: &self.inputs, outputs: std::slice::from_ref(self.output.as_ref().unwrap()) }
    }

    fn read(&self, buffer: BufferId, len: usize) -> crate::Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        if len > 0 {
            self.device.download(buffer, 0, &mut out)?;
        }
        Ok(out)
    }
}

/// What a device left in its buffers after one execution.
struct Outcome {
    output: Vec<u8>,
    inputs: Vec<Vec<u8>>,
    time: Duration,
}

/// Stage, check `supports`, execute once, read back. `Ok(None)` when the device declines the call.
fn execute(device: &dyn Device, case: &Case, data: &HostData) -> Result<Option<Outcome>, Failure> {
    let attempt = catch_unwind(AssertUnwindSafe(|| -> Result<Option<Outcome>, Failure> {
        let st = Staged::new(device, case, data).map_err(Failure::Error)?;
        let call = st.call(case);
        if !device.supports(&call) {
            return Ok(None);
        }
        let t0 = Instant::now();
        device.execute(&call).map_err(|e| Failure::Error(format!("execute: {e}")))?;
        device.synchronize().map_err(|e| Failure::Error(format!("synchronize: {e}")))?;
        let time = t0.elapsed();
        let read_err = |e: crate::Error| Failure::Error(format!("download: {e}"));
        let output = st.read(st.output.as_ref().unwrap().buffer, data.output.len()).map_err(read_err)?;
        let inputs =
            st.inputs.iter().zip(&data.inputs).map(|(t, b)| st.read(t.buffer, b.len())).collect::<Result<_, _>>();
        Ok(Some(Outcome { output, inputs: inputs.map_err(read_err)?, time }))
    }));
    attempt.unwrap_or_else(|payload| Err(Failure::Panic(panic_message(payload.as_ref()))))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

/// Check one case: the device's output against the reference's, its sentinel bytes and its inputs.
pub fn run_case(device: &dyn Device, reference: &ReferenceDevice, case: &Case, seed: u64) -> CaseResult {
    let mut result = CaseResult {
        op: case.name(),
        dtype: case.dtype_label(),
        shape: case.shape_label(),
        status: Status::Pass,
        nmse: None,
        limit: nmse_limit(&case.op, case.tolerance_dtype()),
        time_us: None,
        perf: None,
    };
    let data = HostData::generate(case, seed);
    let expected = match execute(reference, case, &data) {
        Ok(Some(o)) => o.output,
        Ok(None) => return fail(result, Failure::Suite("the reference rejects this case".into())),
        Err(f) => return fail(result, Failure::Suite(format!("the reference failed: {f}"))),
    };
    let got = match execute(device, case, &data) {
        Ok(Some(o)) => o,
        Ok(None) => {
            result.status = Status::Unsupported;
            return result;
        }
        Err(f) => return fail(result, f),
    };
    result.time_us = Some(got.time.as_secs_f64() * 1e6);
    match judge(case, &data, &expected, &got, result.limit) {
        Ok(nmse) => result.nmse = Some(nmse),
        Err((nmse, f)) => {
            result.nmse = nmse;
            result.status = Status::Fail(f);
        }
    }
    result
}

fn fail(mut result: CaseResult, f: Failure) -> CaseResult {
    result.status = Status::Fail(f);
    result
}

/// The checks, in order: sentinel, inputs, NaN/Inf, NMSE.
fn judge(
    case: &Case,
    data: &HostData,
    expected: &[u8],
    got: &Outcome,
    limit: f64,
) -> Result<f64, (Option<f64>, Failure)> {
    let out = &case.output;
    let mask = view_mask(&out.layout, out.dtype.size_in_bytes(), data.output.len());
    if let Some((count, first)) = sentinel_damage(&data.output, &got.output, &mask) {
        return Err((None, Failure::Sentinel { count, first, buffer_bytes: data.output.len() }));
    }
    for (index, (before, after)) in data.inputs.iter().zip(&got.inputs).enumerate() {
        if let Some((count, first)) = sentinel_damage(before, after, &vec![false; before.len()]) {
            return Err((None, Failure::InputModified { index, count, first }));
        }
    }
    let a = view_values(expected, out.dtype, &out.layout);
    let b = view_values(&got.output, out.dtype, &out.layout);
    let nmse = check_values(&a, &b).map_err(|e| {
        let f = match e {
            ValueError::NaN { element } => Failure::NaN { element },
            ValueError::InfMismatch { element, expected, found } => Failure::InfMismatch { element, expected, found },
            ValueError::ReferenceNaN { element } => Failure::Suite(format!("the reference output is NaN at {element}")),
        };
        (None, f)
    })?;
    if nmse <= limit {
        Ok(nmse)
    } else {
        Err((Some(nmse), Failure::Nmse { nmse, limit }))
    }
}

/// Perf mode: one warm-up, then timed runs (each `execute` + `synchronize`) until `perf_max_runs` or
/// `perf_budget`; reports the median.
pub fn time_case(device: &dyn Device, case: &Case, options: &Options) -> CaseResult {
    let mut result = CaseResult {
        op: case.name(),
        dtype: case.dtype_label(),
        shape: case.shape_label(),
        status: Status::Pass,
        nmse: None,
        limit: nmse_limit(&case.op, case.tolerance_dtype()),
        time_us: None,
        perf: None,
    };
    let data = HostData::generate(case, options.seed);
    let timed = catch_unwind(AssertUnwindSafe(|| -> Result<Option<Vec<f64>>, Failure> {
        let st = Staged::new(device, case, &data).map_err(Failure::Error)?;
        let call = st.call(case);
        if !device.supports(&call) {
            return Ok(None);
        }
        let once = || -> Result<f64, Failure> {
            let t0 = Instant::now();
            device.execute(&call).map_err(|e| Failure::Error(format!("execute: {e}")))?;
            device.synchronize().map_err(|e| Failure::Error(format!("synchronize: {e}")))?;
            Ok(t0.elapsed().as_secs_f64() * 1e6)
        };
        once()?;
        let start = Instant::now();
        let mut times = Vec::new();
        while times.is_empty() || (times.len() < options.perf_max_runs && start.elapsed() < options.perf_budget) {
            times.push(once()?);
        }
        Ok(Some(times))
    }));
    match timed.unwrap_or_else(|p| Err(Failure::Panic(panic_message(p.as_ref())))) {
        Ok(None) => result.status = Status::Unsupported,
        Err(f) => result.status = Status::Fail(f),
        Ok(Some(mut times)) => {
            times.sort_by(f64::total_cmp);
            let median_us = times[times.len() / 2];
            result.time_us = Some(median_us);
            result.perf =
                Some(PerfResult { median_us, runs: times.len(), flops: perf::flops(case), bytes: perf::bytes(case) });
        }
    }
    result
}
