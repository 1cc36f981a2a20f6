//! [`Backend`]: a device as the models use it. A call the device declines is first rewritten into calls it accepts
//! ([`crate::legalize`]: contiguous copies of odd layouts, fused forms split), and only when no rewrite is
//! accepted does it run on the host fallback.

use crate::legalize::{self, LegalizeStats};
use crate::{BufferId, DType, Device, DeviceInfo, Error, Layout, Op, OpCall, Result, Tensor, TensorDesc};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device plus the CPU device that runs what it cannot, and the counters of such fallbacks.
/// Cheap to clone; every [`Tensor`] holds one.
#[derive(Clone)]
pub struct Backend(pub(crate) Arc<BackendInner>);

pub(crate) struct BackendInner {
    name: String,
    device: Arc<dyn Device>,
    fallback: Option<Arc<dyn Device>>,
    strict: bool,
    fallbacks: Mutex<BTreeMap<String, u64>>,
    op_counts: Mutex<BTreeMap<String, u64>>,
    legalized: Mutex<LegalizeStats>,
    /// Per-op wall time (count, seconds) when profiling is on; `None` when off.
    profile: Mutex<Option<BTreeMap<String, (u64, f64)>>>,
}

impl Backend {
    /// A backend with no fallback: unsupported ops are errors.
    pub fn new(name: impl Into<String>, device: Arc<dyn Device>) -> Backend {
        Backend(Arc::new(BackendInner {
            name: name.into(),
            device,
            fallback: None,
            strict: false,
            fallbacks: Mutex::default(),
            op_counts: Mutex::default(),
            legalized: Mutex::default(),
            profile: Mutex::default(),
        }))
    }

    /// A backend whose unsupported ops run on `host` (normally the CPU backend), unless `strict`,
    /// in which case they are errors naming the op.
    pub fn with_fallback(
        name: impl Into<String>,
        device: Arc<dyn Device>,
        host: Arc<dyn Device>,
        strict: bool,
    ) -> Backend {
        Backend(Arc::new(BackendInner {
            name: name.into(),
            device,
            fallback: Some(host),
            strict,
            fallbacks: Mutex::default(),
            op_counts: Mutex::default(),
            legalized: Mutex::default(),
            profile: Mutex::default(),
        }))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.0.device
    }
    pub fn info(&self) -> DeviceInfo {
        self.0.device.info()
    }
    pub fn synchronize(&self) -> Result<()> {
        self.0.device.synchronize()
    }
    pub fn same_as(&self, other: &Backend) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Ops that ran on the host instead of the device, by op name.
    pub fn fallback_counts(&self) -> BTreeMap<String, u64> {
        self.0.fallbacks.lock().unwrap().clone()
    }
    /// What device-side legalisation did (rewritten calls, the copies they cost).
    pub fn legalize_stats(&self) -> LegalizeStats {
        self.0.legalized.lock().unwrap().clone()
    }
    /// The device's statistics ([`Device::stats`]) followed by legalisation's ([`LegalizeStats::lines`]).
    pub fn stats(&self) -> Vec<String> {
        let mut v = self.0.device.stats();
        v.extend(self.legalize_stats().lines());
        v
    }
    /// Ops executed (on the device or by fallback), by op name.
    pub fn op_counts(&self) -> BTreeMap<String, u64> {
        self.0.op_counts.lock().unwrap().clone()
    }

    /// Time every op from now on: each op is bracketed by device synchronisations, so the figures are exact
    /// per op but the total is slower than an unprofiled run (launch latency is no longer hidden).
    pub fn enable_profiling(&self) {
        self.0.profile.lock().unwrap().get_or_insert_with(BTreeMap::new);
    }

    /// Per op name: (count, total seconds), slowest first. Empty unless profiling is on.
    pub fn profile(&self) -> Vec<(String, u64, f64)> {
        let p = self.0.profile.lock().unwrap();
        let mut v: Vec<(String, u64, f64)> =
            p.iter().flat_map(|m| m.iter()).map(|(k, &(n, s))| (k.clone(), n, s)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// Allocate an uninitialised contiguous tensor.
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        let buffer = self.0.device.alloc(bytes.max(1))?;
        Ok(Tensor::from_parts(self.clone(), buffer, bytes, Layout::contiguous(shape), dtype))
    }

    pub fn full(&self, shape: &[usize], dtype: DType, value: f32) -> Result<Tensor> {
        let t = self.empty(shape, dtype)?;
        self.run(Op::Fill { value }, &[], &[&t])?;
        Ok(t)
    }

    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.full(shape, dtype, 0.0)
    }

    /// Upload raw little-endian bytes of `dtype` as a contiguous tensor.
    pub fn from_bytes(&self, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if bytes.len() != n * dtype.size_in_bytes() {
            return Err(Error::InvalidArgument(format!(
                "{} bytes given for a {dtype} tensor of shape {shape:?} ({} bytes expected)",
                bytes.len(),
                n * dtype.size_in_bytes()
            )));
        }
        let t = self.empty(shape, dtype)?;
        self.0.device.upload(t.buffer(), 0, bytes)?;
        Ok(t)
    }

    /// Upload f32 values, converted to `dtype`.
    pub fn from_f32(&self, values: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.from_bytes(&dtype.f32_to_bytes(values), shape, dtype)
    }

    pub fn from_i64(&self, values: &[i64], shape: &[usize]) -> Result<Tensor> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.from_bytes(&bytes, shape, DType::I64)
    }

    /// Whether the device takes `op` on these operands as they are (no legalisation, no host fallback): for
    /// callers that choose between a fused op and its parts.
    pub fn supports(&self, op: Op, inputs: &[&Tensor], outputs: &[&Tensor]) -> bool {
        let in_descs: Vec<TensorDesc> = inputs.iter().map(|t| t.desc()).collect();
        let out_descs: Vec<TensorDesc> = outputs.iter().map(|t| t.desc()).collect();
        self.0.device.supports(&OpCall { op, inputs: &in_descs, outputs: &out_descs })
    }

    /// Run one op on this backend's device, or on the host fallback if the device declines it.
    pub fn run(&self, op: Op, inputs: &[&Tensor], outputs: &[&Tensor]) -> Result<()> {
        for t in inputs.iter().chain(outputs) {
            if !t.backend().same_as(self) {
                return Err(Error::InvalidArgument(format!(
                    "{}: operand lives on backend `{}`, op runs on `{}`",
                    op.name(),
                    t.backend().name(),
                    self.name()
                )));
            }
        }
        debug_assert_eq!(inputs.len(), op.n_inputs(), "{op:?}");
        let in_descs: Vec<TensorDesc> = inputs.iter().map(|t| t.desc()).collect();
        let out_descs: Vec<TensorDesc> = outputs.iter().map(|t| t.desc()).collect();
        let call = OpCall { op, inputs: &in_descs, outputs: &out_descs };
        *self.0.op_counts.lock().unwrap().entry(op.name()).or_default() += 1;
        let profiling = self.0.profile.lock().unwrap().is_some();
        if profiling {
            self.0.device.synchronize()?;
            let copies_before = self.0.legalized.lock().unwrap().copies;
            let start = std::time::Instant::now();
            let r = self.run_call(&call);
            self.0.device.synchronize()?;
            let secs = start.elapsed().as_secs_f64();
            // Calls that needed legalisation copies are timed (copies included) under their own key.
            let copies = self.0.legalized.lock().unwrap().copies - copies_before;
            let legalized = if copies > 0 { format!(" [+{copies} legalize copies]") } else { String::new() };
            let key = format!("{} {}{legalized}", op.name(), describe(&call));
            if let Some(m) = self.0.profile.lock().unwrap().as_mut() {
                let e = m.entry(key).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += secs;
            }
            return r;
        }
        self.run_call(&call)
    }

    fn run_call(&self, call: &OpCall) -> Result<()> {
        let op = call.op;
        if self.0.device.supports(call) {
            return self.0.device.execute(call);
        }
        if legalize::run_on_device(self.0.device.as_ref(), call, &self.0.legalized)? {
            return Ok(());
        }
        let unsupported = |detail: &str| Error::Unsupported {
            backend: self.name().to_string(),
            op: op.name(),
            detail: format!("{detail}; operands: {}", describe(call)),
        };
        let host = match &self.0.fallback {
            None => return Err(unsupported("no host fallback")),
            Some(_) if self.0.strict => return Err(unsupported("--strict forbids host fallback")),
            Some(h) => h,
        };
        *self.0.fallbacks.lock().unwrap().entry(op.name()).or_default() += 1;
        run_on_host(self.0.device.as_ref(), host.as_ref(), call).map_err(|e| match e {
            Error::Unsupported { .. } => unsupported("the host fallback does not support it either"),
            e => e,
        })
    }
}

fn describe(call: &OpCall) -> String {
    let d = |t: &TensorDesc| format!("{}{:?}", t.dtype, t.layout.shape);
    let ins: Vec<String> = call.inputs.iter().map(d).collect();
    let outs: Vec<String> = call.outputs.iter().map(d).collect();
    format!("({}) -> ({})", ins.join(", "), outs.join(", "))
}

/// Copy the byte span of each operand to the host device, run there, copy outputs back.
fn run_on_host(device: &dyn Device, host: &dyn Device, call: &OpCall) -> Result<()> {
    struct Staged {
        host_desc: TensorDesc,
        span_start: usize,
        span_len: usize,
    }
    let stage = |t: &TensorDesc| -> Result<Staged> {
        let es = t.dtype.size_in_bytes();
        let span = t.byte_span();
        let len = span.len().max(1);
        let buf = host.alloc(len)?;
        let mut bytes = vec![0u8; span.len()];
        if !bytes.is_empty() {
            device.download(t.buffer, span.start, &mut bytes)?;
            host.upload(buf, 0, &bytes)?;
        }
        let mut layout = t.layout.clone();
        layout.offset -= span.start / es;
        Ok(Staged {
            host_desc: TensorDesc { buffer: buf, dtype: t.dtype, layout },
            span_start: span.start,
            span_len: span.len(),
        })
    };
    let mut staged_in = Vec::new();
    let mut staged_out = Vec::new();
    let result = (|| {
        for t in call.inputs {
            staged_in.push(stage(t)?);
        }
        for t in call.outputs {
            staged_out.push(stage(t)?);
        }
        let ins: Vec<TensorDesc> = staged_in.iter().map(|s| s.host_desc.clone()).collect();
        let outs: Vec<TensorDesc> = staged_out.iter().map(|s| s.host_desc.clone()).collect();
        let host_call = OpCall { op: call.op, inputs: &ins, outputs: &outs };
        if !host.supports(&host_call) {
            return Err(Error::Unsupported { backend: "host".into(), op: call.op.name(), detail: String::new() });
        }
        host.execute(&host_call)?;
        for (s, t) in staged_out.iter().zip(call.outputs) {
            if s.span_len > 0 {
                let mut bytes = vec![0u8; s.span_len];
                host.download(s.host_desc.buffer, 0, &mut bytes)?;
                device.upload(t.buffer, s.span_start, &bytes)?;
            }
        }
        Ok(())
    })();
    for s in staged_in.iter().chain(&staged_out) {
        host.free(s.host_desc.buffer);
    }
    result
}

pub(crate) struct Storage {
    pub(crate) backend: Backend,
    pub(crate) buffer: BufferId,
    pub(crate) bytes: usize,
}

impl Drop for Storage {
    fn drop(&mut self) {
        self.backend.0.device.free(self.buffer);
    }
}
