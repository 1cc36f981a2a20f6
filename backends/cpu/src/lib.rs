//! The built-in CPU backend: the fast, multi-threaded host implementation of every op of [`sd3_core::Op`].
//!
//! - [`memory`]: 64-byte aligned host buffers behind [`BufferId`]s.
//! - [`strided`]: views in logical order, gather/scatter between any dtype/strides and f32 (or f64) runs.
//! - [`elementwise`], [`norm`], [`matmul`], [`attention`] (flash style), [`conv`] (im2col + GEMM).
//! - [`sgemm`]: the AVX-512 f32 GEMM micro-kernel used where the CPU has AVX-512F ([`flash`] builds attention on
//!   it); elsewhere, or with `SD3_CPU_SGEMM=0`, products go to the `gemm` crate.
//! - [`math`]: vectorisable exp/erf and the run-time AVX2/AVX-512 dispatch of hot loops.
//!
//! Threads: one rayon pool per process, `SD3_NUM_THREADS` threads if set, else rayon's default. Ops run
//! synchronously, one at a time per device (the queue is trivially in order).
//!
//! Aliasing: inputs never overlap outputs by the op contract, but the device does not rely on it: an output
//! that overlaps an input, or itself (a broadcast view), is computed into scratch and then copied in logical
//! order, which is what the reference does.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod flash;
pub mod math;
pub mod matmul;
pub mod memory;
pub mod norm;
pub mod sgemm;
pub mod shapes;
pub mod strided;

use memory::{Buffer, Memory};
use rayon::prelude::*;
use sd3_core::{
    BackendProvider, BufferId, BuiltinBackend, DType, Device, DeviceInfo, DeviceKind, Error, Layout, Op, OpCall,
    Result, TensorDesc,
};
use std::sync::{Arc, Mutex, OnceLock};
use strided::View;

/// The number of threads `SD3_NUM_THREADS` asks for: `Ok(None)` when unset, an error when not a positive integer.
pub fn requested_threads() -> Result<Option<usize>> {
    match std::env::var("SD3_NUM_THREADS") {
        Err(_) => Ok(None),
        Ok(s) => match s.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(Error::InvalidArgument(format!("SD3_NUM_THREADS={s:?} is not a positive integer"))),
        },
    }
}

/// The process-wide pool every CPU kernel runs in.
pub fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let n = requested_threads().ok().flatten().unwrap_or(0);
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("sd3-cpu-{i}"))
            .build()
            .expect("cannot start the CPU thread pool")
    })
}

/// Run `f(start, len)` over `total` items in parallel chunks of `grain` (one call when it fits in one).
pub(crate) fn par_ranges(total: usize, grain: usize, f: impl Fn(usize, usize) + Sync) {
    let grain = grain.max(1);
    let chunks = total.div_ceil(grain);
    match chunks {
        0 => {}
        1 => f(0, total),
        _ => (0..chunks).into_par_iter().for_each(|c| f(c * grain, grain.min(total - c * grain))),
    }
}

/// The CPU device.
#[derive(Default)]
pub struct CpuDevice {
    mem: Memory,
    /// Serialises ops (and transfers) so the device behaves as one in-order queue when called from many threads.
    queue: Mutex<()>,
}

impl CpuDevice {
    pub fn new() -> CpuDevice {
        CpuDevice::default()
    }

    /// The op queue's lock. A panic in an earlier op only poisons it; the device stays usable.
    fn queue(&self) -> std::sync::MutexGuard<'_, ()> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, call: &OpCall) -> Result<()> {
        shapes::check(call)?;
        let _q = self.queue();
        let bufs: Vec<Arc<Buffer>> =
            call.inputs.iter().chain(call.outputs).map(|t| self.mem.get(t.buffer)).collect::<Result<_>>()?;
        let n_in = call.inputs.len();
        let ins: Vec<View> = call.inputs.iter().zip(&bufs).map(|(t, b)| View::new(b, t)).collect::<Result<_>>()?;
        let out_desc = &call.outputs[0];
        let out = View::new(&bufs[n_in], out_desc)?;
        if !out.may_self_overlap() && !ins.iter().any(|i| i.overlaps(&out)) {
            return pool().install(|| execute(call.op, &ins, call.inputs, &out, &out_desc.layout));
        }
        // Output aliases something: compute into scratch, then copy back in logical order.
        let scratch = Buffer::new(out_desc.elem_count() * out_desc.dtype.size_in_bytes())
            .ok_or_else(|| Error::backend("cpu", "cannot allocate scratch for an aliased output"))?;
        let layout = Layout::contiguous(out_desc.shape());
        let tmp_desc = TensorDesc { buffer: out_desc.buffer, dtype: out_desc.dtype, layout };
        let tmp = View::new(&scratch, &tmp_desc)?;
        pool().install(|| execute(call.op, &ins, call.inputs, &tmp, &tmp_desc.layout))?;
        copy_in_order(&tmp, &out);
        Ok(())
    }
}

/// Sequential bit-exact copy between equal-shaped views of one dtype, in logical order.
fn copy_in_order(src: &View, dst: &View) {
    match src.dtype.size_in_bytes() {
        1 => seq_copy::<u8>(src, dst),
        2 => seq_copy::<u16>(src, dst),
        4 => seq_copy::<u32>(src, dst),
        _ => seq_copy::<u64>(src, dst),
    }
}

fn seq_copy<T: Copy + Default>(src: &View, dst: &View) {
    let mut tmp = vec![T::default(); src.len()];
    src.gather_raw(0, &mut tmp);
    dst.scatter_raw(0, &tmp);
}

/// Dispatch one validated op on views that do not alias.
fn execute(op: Op, ins: &[View], in_descs: &[TensorDesc], out: &View, out_layout: &Layout) -> Result<()> {
    let last = |l: &Layout| *l.shape.last().unwrap_or(&1);
    match op {
        Op::Copy => elementwise::copy(&ins[0], out),
        Op::Fill { value } => elementwise::fill(value, out),
        Op::Unary(f) => elementwise::unary(f, &ins[0], out),
        Op::Binary(f) => elementwise::binary(f, &ins[0], &ins[1], out),
        Op::Affine { mul, add } => elementwise::affine(mul, add, &ins[0], out),
        Op::Modulate => elementwise::modulate(&ins[0], &ins[1], &ins[2], out),
        Op::GatedResidual => elementwise::gated_residual(&ins[0], &ins[1], &ins[2], out),
        Op::Softmax => norm::softmax(&ins[0], out, last(out_layout)),
        Op::LayerNorm { eps, affine } => {
            let wb = affine.then(|| (&ins[1], &ins[2]));
            norm::layer_norm(&ins[0], wb, out, last(out_layout), eps)
        }
        Op::RmsNorm { eps } => norm::rms_norm(&ins[0], &ins[1], out, last(out_layout), eps),
        Op::LayerNormModulate { eps } => {
            norm::layer_norm_modulate(&ins[0], &ins[1], &ins[2], out, last(out_layout), eps)
        }
        Op::GroupNorm { groups, eps, affine } => {
            let wb = affine.then(|| (&ins[1], &ins[2]));
            norm::group_norm(&ins[0], wb, out, &out_layout.shape, groups, eps)
        }
        Op::UpsampleNearest2d { factor } => elementwise::upsample_nearest2d(factor, &ins[0], out, &out_layout.shape),
        Op::Gather => {
            let ts = &in_descs[0].layout.shape;
            elementwise::gather_rows(&ins[0], &ins[1], out, ts[0], ts[1])?
        }
        Op::Matmul { bias, act } => matmul::matmul(&matmul::MatmulArgs {
            a: ins[0],
            al: &in_descs[0].layout,
            b: ins[1],
            bl: &in_descs[1].layout,
            bias: bias.then(|| ins[2]),
            act,
            y: *out,
            yl: out_layout,
        }),
        Op::MatmulGatedResidual { .. } | Op::AttentionBackward { .. } => unreachable!("declined by shapes::check"),
        Op::Attention { scale, causal, bias, qk_norm, norm_eps } => {
            let heads = |i: usize| attention::Heads { view: ins[i], layout: &in_descs[i].layout };
            let first_norm = 3 + bias as usize;
            attention::attention(&attention::AttentionArgs {
                q: heads(0),
                k: heads(1),
                v: heads(2),
                bias: bias.then(|| heads(3)),
                qk_norm: qk_norm.then(|| (ins[first_norm], ins[first_norm + 1], norm_eps)),
                out: attention::Heads { view: *out, layout: out_layout },
                scale,
                causal,
            })
        }
        Op::Conv2d { stride, padding, bias } => {
            let ws = &in_descs[1].layout.shape;
            conv::conv2d(&conv::ConvArgs {
                x: ins[0],
                xl: &in_descs[0].layout,
                w: ins[1],
                bias: bias.then(|| ins[2]),
                y: *out,
                yl: out_layout,
                stride,
                padding,
                kernel: [ws[2], ws[3]],
            })
        }
    }
    Ok(())
}

/// Vector extensions the kernels can use on this CPU, for `sd3 devices`.
fn simd_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut f = vec!["sse2"];
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            f.push("avx2+fma");
        }
        if std::is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
        if std::is_x86_feature_detected!("f16c") {
            f.push("f16c");
        }
        f.join(",")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// The CPU's model name where the OS tells it.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|n| n.trim().to_string())
        })
        .unwrap_or_else(|| format!("host CPU ({})", std::env::consts::ARCH))
}

impl Device for CpuDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: cpu_name(),
            kind: DeviceKind::Cpu,
            memory_bytes: 0,
            free_memory_bytes: 0,
            pci_id: None,
            dtypes: DType::ALL.to_vec(),
            capabilities: vec![
                format!("threads={}", pool().current_num_threads()),
                format!("simd={}", simd_features()),
                format!("matmul={}", if sgemm::available() { "avx512" } else { "gemm" }),
                "fused_attention=flash".into(),
            ],
        }
    }
    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        self.mem.alloc(bytes)
    }
    fn free(&self, buffer: BufferId) {
        self.mem.free(buffer)
    }
    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        let _q = self.queue();
        self.mem.upload(buffer, offset, data)
    }
    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        let _q = self.queue();
        self.mem.download(buffer, offset, out)
    }
    fn copy_buffer(&self, src: BufferId, so: usize, dst: BufferId, d_o: usize, bytes: usize) -> Result<()> {
        let _q = self.queue();
        self.mem.copy(src, so, dst, d_o, bytes)
    }
    fn supports(&self, call: &OpCall) -> bool {
        shapes::check(call).is_ok()
    }
    fn execute(&self, call: &OpCall) -> Result<()> {
        self.run(call)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn stats(&self) -> Vec<String> {
        let mut s = self.mem.stats();
        s.push(format!("threads={}", pool().current_num_threads()));
        s
    }
}

pub struct CpuProvider;

impl BackendProvider for CpuProvider {
    fn name(&self) -> &str {
        "cpu"
    }
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }
    fn device_count(&self) -> usize {
        1
    }
    fn open_device(&self, index: usize) -> Result<Arc<dyn Device>> {
        if index != 0 {
            return Err(Error::InvalidArgument(format!("cpu: device {index} requested, the CPU backend has one (0)")));
        }
        requested_threads()?;
        Ok(Arc::new(CpuDevice::new()))
    }
}

/// The CPU device, for hosts that need it directly (e.g. as the fallback of another backend).
pub fn cpu_device() -> Arc<dyn Device> {
    Arc::new(CpuDevice::new())
}

sd3_core::inventory::submit! {
    BuiltinBackend { name: "cpu", create: |_options| Ok(Box::new(CpuProvider)) }
}
