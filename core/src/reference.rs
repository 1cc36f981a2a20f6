//! The reference semantics of every op: plain, obviously correct, f64 arithmetic, host memory.
//!
//! [`ReferenceDevice`] is what the conformance suite compares every backend against, including the fast CPU
//! backend. It is deliberately naive: every operand is gathered into a logical row-major `Vec<f64>`, the op
//! is computed in f64, and the result is rounded once into the output's dtype and strides.
//! `docs/ops.md` is the prose form of this file; keep the two in agreement.

use crate::{
    BinaryOp, BufferId, DType, Device, DeviceInfo, DeviceKind, Error, Op, OpCall, Result, TensorDesc, UnaryOp,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Host memory addressed by [`BufferId`]s: the storage of the reference device (and a building block for
/// host-emulated devices).
#[derive(Default)]
pub struct HostMemory {
    buffers: Mutex<HashMap<u64, Vec<u8>>>,
    next: AtomicU64,
    in_use: AtomicU64,
}

impl HostMemory {
    pub fn alloc(&self, bytes: usize) -> BufferId {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.buffers.lock().unwrap().insert(id, vec![0u8; bytes]);
        self.in_use.fetch_add(bytes as u64, Ordering::Relaxed);
        BufferId(id)
    }
    pub fn free(&self, b: BufferId) {
        if let Some(v) = self.buffers.lock().unwrap().remove(&b.0) {
            self.in_use.fetch_sub(v.len() as u64, Ordering::Relaxed);
        }
    }
    pub fn bytes_in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }
    /// Run `f` on the bytes of a buffer.
    pub fn with<R>(&self, b: BufferId, f: impl FnOnce(&mut Vec<u8>) -> R) -> Result<R> {
        let mut map = self.buffers.lock().unwrap();
        let v = map.get_mut(&b.0).ok_or_else(|| Error::InvalidArgument(format!("unknown buffer {}", b.0)))?;
        Ok(f(v))
    }
    pub fn upload(&self, b: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        self.with(b, |v| {
            let end = offset.checked_add(data.len()).filter(|&e| e <= v.len());
            match end {
                Some(end) => {
                    v[offset..end].copy_from_slice(data);
                    Ok(())
                }
                None => Err(Error::InvalidArgument(format!(
                    "upload of {} bytes at {offset} overflows a {}-byte buffer",
                    data.len(),
                    v.len()
                ))),
            }
        })?
    }
    pub fn download(&self, b: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        self.with(b, |v| {
            let end = offset.checked_add(out.len()).filter(|&e| e <= v.len());
            match end {
                Some(end) => {
                    out.copy_from_slice(&v[offset..end]);
                    Ok(())
                }
                None => Err(Error::InvalidArgument(format!(
                    "download of {} bytes at {offset} overflows a {}-byte buffer",
                    out.len(),
                    v.len()
                ))),
            }
        })?
    }
    pub fn copy(&self, src: BufferId, so: usize, dst: BufferId, d_o: usize, n: usize) -> Result<()> {
        let mut tmp = vec![0u8; n];
        self.download(src, so, &mut tmp)?;
        self.upload(dst, d_o, &tmp)
    }

    /// Gather a tensor's elements in logical row-major order as f64.
    pub fn read_f64(&self, t: &TensorDesc) -> Result<Vec<f64>> {
        let es = t.dtype.size_in_bytes();
        self.with(t.buffer, |v| {
            if t.layout.span_end() * es > v.len() {
                return Err(Error::InvalidArgument(format!("tensor view {:?} overflows its buffer", t.layout)));
            }
            let mut out = Vec::with_capacity(t.elem_count());
            t.layout.for_each_index(|i| out.push(read_elem(t.dtype, &v[i * es..(i + 1) * es])));
            Ok(out)
        })?
    }

    /// Write logical row-major f64 values into a tensor view, rounding once to its dtype.
    pub fn write_f64(&self, t: &TensorDesc, values: &[f64]) -> Result<()> {
        let es = t.dtype.size_in_bytes();
        self.with(t.buffer, |v| {
            if t.layout.span_end() * es > v.len() {
                return Err(Error::InvalidArgument(format!("tensor view {:?} overflows its buffer", t.layout)));
            }
            let mut k = 0;
            t.layout.for_each_index(|i| {
                write_elem(t.dtype, values[k], &mut v[i * es..(i + 1) * es]);
                k += 1;
            });
            Ok(())
        })?
    }
}

fn read_elem(dt: DType, b: &[u8]) -> f64 {
    match dt {
        DType::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::F16 => half::f16::from_le_bytes(b.try_into().unwrap()).to_f64(),
        DType::BF16 => half::bf16::from_le_bytes(b.try_into().unwrap()).to_f64(),
        DType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f64,
        DType::U8 => b[0] as f64,
    }
}

fn write_elem(dt: DType, x: f64, b: &mut [u8]) {
    match dt {
        DType::F32 => b.copy_from_slice(&(x as f32).to_le_bytes()),
        DType::F16 => b.copy_from_slice(&half::f16::from_f64(x).to_le_bytes()),
        DType::BF16 => b.copy_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
        DType::I32 => b.copy_from_slice(&(x as i32).to_le_bytes()),
        DType::I64 => b.copy_from_slice(&(x as i64).to_le_bytes()),
        DType::U8 => b[0] = x as u8,
    }
}

pub fn erf(x: f64) -> f64 {
    // Abramowitz–Stegun 7.1.26 is too coarse for a reference; use the series / continued fraction split.
    if x.abs() < 2.5 {
        // Maclaurin series: erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))
        let mut sum: f64 = 0.0;
        let mut term = x;
        let x2 = x * x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x2 / n;
            if n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction for erfc, accurate for |x| >= 2.5.
        let ax = x.abs();
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        let erfc = (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f);
        (1.0 - erfc).copysign(x)
    }
}

pub fn unary_f64(f: UnaryOp, x: f64) -> f64 {
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    match f {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Square => x * x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::GeluErf => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        UnaryOp::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        UnaryOp::QuickGelu => x * sigmoid(1.702 * x),
        UnaryOp::Sin => x.sin(),
        UnaryOp::Cos => x.cos(),
    }
}

pub fn binary_f64(f: BinaryOp, a: f64, b: f64) -> f64 {
    match f {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
    }
}

/// Normalise each row of `x` (length `d`) in place: `(x - mean) / sqrt(var + eps)`.
fn layer_norm_rows(x: &mut [f64], d: usize, eps: f64) {
    for row in x.chunks_mut(d) {
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        let inv = 1.0 / (var + eps).sqrt();
        row.iter_mut().for_each(|v| *v = (*v - mean) * inv);
    }
}

fn rms_norm_rows(x: &mut [f64], w: &[f64], eps: f64) {
    let d = w.len();
    for row in x.chunks_mut(d) {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        row.iter_mut().zip(w).for_each(|(v, w)| *v = *v * inv * w);
    }
}

/// `act(a·b (+ bias))` of a matmul-shaped call (inputs a, b, bias if `bias`), in f64.
fn matmul_f64(call: &OpCall, ins: &[Vec<f64>], bias: bool, act: Option<UnaryOp>) -> Vec<f64> {
    let oshape = call.outputs[0].shape();
    let r = oshape.len();
    let (m, n) = (oshape[r - 2], oshape[r - 1]);
    let k = call.inputs[0].shape()[r - 1];
    let batch: usize = oshape[..r - 2].iter().product();
    let (a, b) = (&ins[0], &ins[1]);
    let mut y = vec![0.0; batch * m * n];
    for bi in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0;
                for p in 0..k {
                    acc += a[bi * m * k + i * k + p] * b[bi * k * n + p * n + j];
                }
                if bias {
                    acc += ins[2][j];
                }
                if let Some(f) = act {
                    acc = unary_f64(f, acc);
                }
                y[bi * m * n + i * n + j] = acc;
            }
        }
    }
    y
}

/// [`Op::AttentionBackward`] on `[B,H,N,D]` operands: `[dq, dk, dv]` concatenated (the `[3,B,H,N,D]` output).
fn attention_backward_f64(shape: &[usize], ins: &[Vec<f64>], scale: f32, causal: bool) -> Vec<f64> {
    let (bh, n, d) = (shape[0] * shape[1], shape[2], shape[3]);
    let (q, k, v, o, d_o) = (&ins[0], &ins[1], &ins[2], &ins[3], &ins[4]);
    let len = bh * n * d;
    let mut y = vec![0.0; 3 * len];
    let (dq, rest) = y.split_at_mut(len);
    let (dk, dv) = rest.split_at_mut(len);
    let scale = scale as f64;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut p = vec![0.0; n];
    let mut ds = vec![0.0; n];
    for h in 0..bh {
        let row = |i: usize| (h * n + i) * d..(h * n + i + 1) * d;
        for i in 0..n {
            let qi = &q[row(i)];
            for (j, pj) in p.iter_mut().enumerate() {
                *pj = if causal && j > i { f64::NEG_INFINITY } else { scale * dot(qi, &k[row(j)]) };
            }
            let mx = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            p.iter_mut().for_each(|x| *x = (*x - mx).exp());
            let sum: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= sum);
            let doi = &d_o[row(i)];
            let delta = dot(doi, &o[row(i)]);
            for (j, dsj) in ds.iter_mut().enumerate() {
                *dsj = p[j] * (dot(doi, &v[row(j)]) - delta);
            }
            for j in 0..n {
                for c in 0..d {
                    dv[(h * n + j) * d + c] += p[j] * doi[c];
                    dk[(h * n + j) * d + c] += scale * ds[j] * qi[c];
                    dq[(h * n + i) * d + c] += scale * ds[j] * k[(h * n + j) * d + c];
                }
            }
        }
    }
    y
}

/// Compute `call` with logical-order f64 operands. Returns one f64 vector per output.
pub fn compute(call: &OpCall, ins: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
    let out = &call.outputs[0];
    let oshape = out.shape();
    let last = |t: &TensorDesc| *t.shape().last().unwrap_or(&1);
    let y = match call.op {
        Op::Copy => ins[0].clone(),
        Op::Fill { value } => vec![value as f64; out.elem_count()],
        Op::Unary(f) => ins[0].iter().map(|&x| unary_f64(f, x)).collect(),
        Op::Binary(f) => ins[0].iter().zip(&ins[1]).map(|(&a, &b)| binary_f64(f, a, b)).collect(),
        Op::Affine { mul, add } => ins[0].iter().map(|&x| x * mul as f64 + add as f64).collect(),
        Op::Matmul { bias, act } => matmul_f64(call, ins, bias, act),
        Op::AttentionBackward { scale, causal } => attention_backward_f64(call.inputs[0].shape(), ins, scale, causal),
        Op::MatmulGatedResidual { bias } => {
            let r = bias as usize + 2;
            let mm = matmul_f64(call, ins, bias, None);
            ins[r].iter().zip(ins[r + 1].iter().zip(mm)).map(|(&x, (&g, p))| x + g * p).collect()
        }
        Op::Softmax => {
            let d = last(out);
            let mut y = ins[0].clone();
            for row in y.chunks_mut(d) {
                let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                row.iter_mut().for_each(|v| *v = (*v - mx).exp());
                let s: f64 = row.iter().sum();
                row.iter_mut().for_each(|v| *v /= s);
            }
            y
        }
        Op::LayerNorm { eps, affine } => {
            let d = last(out);
            let mut y = ins[0].clone();
            layer_norm_rows(&mut y, d, eps as f64);
            if affine {
                for row in y.chunks_mut(d) {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = *v * ins[1][j] + ins[2][j];
                    }
                }
            }
            y
        }
        Op::RmsNorm { eps } => {
            let mut y = ins[0].clone();
            rms_norm_rows(&mut y, &ins[1], eps as f64);
            y
        }
        Op::LayerNormModulate { eps } => {
            let mut y = ins[0].clone();
            layer_norm_rows(&mut y, last(out), eps as f64);
            y.iter().zip(ins[1].iter().zip(&ins[2])).map(|(&x, (&s, &h))| x * (1.0 + s) + h).collect()
        }
        Op::Modulate => ins[0].iter().zip(ins[1].iter().zip(&ins[2])).map(|(&x, (&s, &h))| x * (1.0 + s) + h).collect(),
        Op::GatedResidual => ins[0].iter().zip(ins[1].iter().zip(&ins[2])).map(|(&x, (&g, &r))| x + g * r).collect(),
        Op::Attention { scale, causal, bias, qk_norm, norm_eps } => {
            let qs = call.inputs[0].shape();
            let (b, h, nq, dh) = (qs[0], qs[1], qs[2], qs[3]);
            let nk = call.inputs[1].shape()[2];
            let dv = call.inputs[2].shape()[3];
            let (mut q, mut k) = (ins[0].clone(), ins[1].clone());
            if qk_norm {
                let (qi, ki) = if bias { (4, 5) } else { (3, 4) };
                rms_norm_rows(&mut q, &ins[qi], norm_eps as f64);
                rms_norm_rows(&mut k, &ins[ki], norm_eps as f64);
            }
            let v = &ins[2];
            let mut y = vec![0.0; b * h * nq * dv];
            let mut s = vec![0.0; nk];
            for bh in 0..b * h {
                for i in 0..nq {
                    for (j, sj) in s.iter_mut().enumerate() {
                        let mut acc = 0.0;
                        for p in 0..dh {
                            acc += q[(bh * nq + i) * dh + p] * k[(bh * nk + j) * dh + p];
                        }
                        acc *= scale as f64;
                        if bias {
                            acc += ins[3][(bh * nq + i) * nk + j];
                        }
                        if causal && j > i {
                            acc = f64::NEG_INFINITY;
                        }
                        *sj = acc;
                    }
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let mut denom = 0.0;
                    for sj in s.iter_mut() {
                        *sj = (*sj - mx).exp();
                        denom += *sj;
                    }
                    for c in 0..dv {
                        let mut acc = 0.0;
                        for (j, sj) in s.iter().enumerate() {
                            acc += sj * v[(bh * nk + j) * dv + c];
                        }
                        y[(bh * nq + i) * dv + c] = acc / denom;
                    }
                }
            }
            y
        }
        Op::Conv2d { stride, padding, bias } => {
            let xs = call.inputs[0].shape();
            let ws = call.inputs[1].shape();
            let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
            let (o, kh, kw) = (ws[0], ws[2], ws[3]);
            let (oh, ow) = (oshape[2], oshape[3]);
            let (x, wt) = (&ins[0], &ins[1]);
            let mut y = vec![0.0; n * o * oh * ow];
            for ni in 0..n {
                for oi in 0..o {
                    for yi in 0..oh {
                        for xi in 0..ow {
                            let mut acc = if bias { ins[2][oi] } else { 0.0 };
                            for ci in 0..c {
                                for ky in 0..kh {
                                    let iy = (yi * stride[0] + ky) as isize - padding[0] as isize;
                                    if iy < 0 || iy >= h as isize {
                                        continue;
                                    }
                                    for kx in 0..kw {
                                        let ix = (xi * stride[1] + kx) as isize - padding[1] as isize;
                                        if ix < 0 || ix >= w as isize {
                                            continue;
                                        }
                                        acc += x[((ni * c + ci) * h + iy as usize) * w + ix as usize]
                                            * wt[((oi * c + ci) * kh + ky) * kw + kx];
                                    }
                                }
                            }
                            y[((ni * o + oi) * oh + yi) * ow + xi] = acc;
                        }
                    }
                }
            }
            y
        }
        Op::GroupNorm { groups, eps, affine } => {
            let xs = call.inputs[0].shape();
            let (n, c) = (xs[0], xs[1]);
            let spatial: usize = xs[2..].iter().product();
            let group_len = c / groups * spatial;
            let mut y = ins[0].clone();
            layer_norm_rows(&mut y, group_len, eps as f64);
            if affine {
                for ni in 0..n {
                    for ci in 0..c {
                        for v in &mut y[(ni * c + ci) * spatial..(ni * c + ci + 1) * spatial] {
                            *v = *v * ins[1][ci] + ins[2][ci];
                        }
                    }
                }
            }
            y
        }
        Op::UpsampleNearest2d { factor } => {
            let (n, c, oh, ow) = (oshape[0], oshape[1], oshape[2], oshape[3]);
            let (h, w) = (oh / factor, ow / factor);
            let mut y = vec![0.0; n * c * oh * ow];
            for p in 0..n * c {
                for yi in 0..oh {
                    for xi in 0..ow {
                        y[(p * oh + yi) * ow + xi] = ins[0][(p * h + yi / factor) * w + xi / factor];
                    }
                }
            }
            y
        }
        Op::Gather => {
            let ts = call.inputs[0].shape();
            let (v, d) = (ts[0], ts[1]);
            let mut y = Vec::with_capacity(ins[1].len() * d);
            for &id in &ins[1] {
                if id < 0.0 || id as usize >= v {
                    return Err(Error::InvalidArgument(format!("gather: id {id} outside 0..{v}")));
                }
                let id = id as usize;
                y.extend_from_slice(&ins[0][id * d..(id + 1) * d]);
            }
            y
        }
    };
    Ok(vec![y])
}

/// Check that a call's operands are consistent with its op (counts, shapes, dtypes). Every backend may use this
/// to reject malformed calls before touching memory.
pub fn validate(call: &OpCall) -> Result<()> {
    let name = call.op.name();
    let bad = |msg: String| Err(Error::shape(name.clone(), msg));
    if call.inputs.len() != call.op.n_inputs() || call.outputs.len() != 1 {
        return bad(format!(
            "{} inputs / {} outputs given, {} / 1 expected",
            call.inputs.len(),
            call.outputs.len(),
            call.op.n_inputs()
        ));
    }
    let out = &call.outputs[0];
    let same_shape = |t: &TensorDesc| t.shape() == out.shape();
    let floats = call.inputs.iter().chain(call.outputs).all(|t| t.dtype.is_float());
    match call.op {
        Op::Copy if !same_shape(&call.inputs[0]) => return bad("copy between different shapes".into()),
        Op::Copy | Op::Fill { .. } => {}
        Op::Gather if !matches!(call.inputs[1].dtype, DType::I32 | DType::I64) || !out.dtype.is_float() => {
            return bad("gather needs float table and i32/i64 ids".into());
        }
        Op::Gather => {}
        Op::AttentionBackward { .. } => {
            let s = call.inputs[0].shape();
            if s.len() != 4 || !call.inputs.iter().all(|t| t.shape() == s) {
                return bad("q, k, v, o and do must share one [B,H,N,D] shape".into());
            }
            if out.shape() != [&[3][..], s].concat() {
                return bad(format!("output {:?}, expected [3, {s:?}]", out.shape()));
            }
            if !floats {
                return bad("float operands expected".into());
            }
        }
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Affine { .. }
        | Op::Softmax
        | Op::Modulate
        | Op::GatedResidual
        | Op::LayerNormModulate { .. } => {
            if !floats {
                return bad("float operands expected".into());
            }
            if !call.inputs.iter().all(same_shape) {
                return bad("operands must already be broadcast to the output shape".into());
            }
        }
        _ if !floats => return bad("float operands expected".into()),
        _ => {}
    }
    Ok(())
}

/// The reference device: host memory and [`compute`].
#[derive(Default)]
pub struct ReferenceDevice {
    mem: HostMemory,
}

impl ReferenceDevice {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Device for ReferenceDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: "reference (f64, single-threaded)".into(),
            kind: DeviceKind::Cpu,
            memory_bytes: 0,
            free_memory_bytes: 0,
            pci_id: None,
            dtypes: DType::ALL.to_vec(),
            capabilities: vec!["reference".into()],
        }
    }
    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        Ok(self.mem.alloc(bytes))
    }
    fn free(&self, buffer: BufferId) {
        self.mem.free(buffer)
    }
    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        self.mem.upload(buffer, offset, data)
    }
    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        self.mem.download(buffer, offset, out)
    }
    fn copy_buffer(&self, src: BufferId, so: usize, dst: BufferId, d_o: usize, n: usize) -> Result<()> {
        self.mem.copy(src, so, dst, d_o, n)
    }
    fn supports(&self, call: &OpCall) -> bool {
        validate(call).is_ok()
    }
    fn execute(&self, call: &OpCall) -> Result<()> {
        validate(call)?;
        let ins = call.inputs.iter().map(|t| self.mem.read_f64(t)).collect::<Result<Vec<_>>>()?;
        let outs = compute(call, &ins)?;
        for (t, v) in call.outputs.iter().zip(outs) {
            self.mem.write_f64(t, &v)?;
        }
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
