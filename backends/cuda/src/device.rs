//! `CudaDevice`: the `sd3_core::Device` implementation. One context, one in-order stream, one cuBLAS handle.

use crate::kernels::Kernels;
use crate::lt::Lt;
use crate::memory::Allocator;
use crate::params::*;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{result, CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use sd3_core::{
    reference, BufferId, DType, Device, DeviceInfo, DeviceKind, Error, Layout, Op, OpCall, Result, TensorDesc,
};
use std::sync::{Arc, Mutex};

pub(crate) fn drv(e: impl std::fmt::Display) -> Error {
    Error::backend("cuda", e.to_string())
}

pub struct CudaDevice {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: Mutex<CudaBlas>,
    pub(crate) kernels: Kernels,
    pub(crate) alloc: Allocator,
    /// cuBLASLt with its workspace, for linears with a fused bias.
    pub(crate) lt: Lt,
    /// Device int set by kernels that meet bad data (gather ids out of range); checked at each synchronisation.
    error_flag: BufferId,
    info: DeviceInfo,
    /// `--benchmark` timing markers: CUDA events on `stream`.
    markers: crate::events::Markers,
}

// SAFETY: the CUDA context is bound to the calling thread before each use (cudarc does this in launch and
// in the stream APIs); the cuBLAS handle is used under its mutex.
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::backend("cuda", format!("cannot open CUDA device {ordinal}: {e}")))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::backend("cuda", format!("cuBLAS: {e:?}")))?;
        let kernels = Kernels::load(&ctx)?;
        let (major, minor) = ctx.compute_capability().map_err(drv)?;
        let total = ctx.total_mem().map_err(drv)? as u64;
        let (free, _) = ctx.mem_get_info().map_err(drv)?;
        let pci = {
            use cudarc::driver::sys::CUdevice_attribute as A;
            let dom = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID).unwrap_or(0);
            let bus = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID).unwrap_or(0);
            let dev = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID).unwrap_or(0);
            format!("{dom:04x}:{bus:02x}:{dev:02x}.0")
        };
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(0);
        let info = DeviceInfo {
            name: ctx.name().map_err(drv)?,
            kind: DeviceKind::Gpu,
            memory_bytes: total,
            free_memory_bytes: free as u64,
            pci_id: Some(pci),
            dtypes: DType::ALL.to_vec(),
            capabilities: vec![
                format!("compute_capability={major}.{minor}"),
                format!("multiprocessors={sms}"),
                format!("tensor_cores={}", major >= 7),
                "gemm=cublas".into(),
                format!(
                    "attention={} (f16/bf16, head dim 64/128; chunked cuBLAS otherwise)",
                    match (&kernels.flash90, &kernels.flash90_unavailable) {
                        (Some(_), _) => "flash-wgmma at head dim 64, flash-mma".to_string(),
                        (None, Some(why)) => format!("flash-mma (the wgmma kernel is unavailable: {why})"),
                        (None, None) => "flash-mma".to_string(),
                    }
                ),
            ],
        };
        let alloc = Allocator::default();
        let error_flag = alloc.alloc(4)?;
        let lt = Lt::new(alloc.alloc(Lt::WORKSPACE_BYTES)?.0)?;
        unsafe { result::memset_d8_async(error_flag.0, 0, 4, stream.cu_stream()) }.map_err(drv)?;
        let markers = crate::events::Markers::new();
        Ok(CudaDevice { ctx, stream, blas: Mutex::new(blas), kernels, alloc, lt, error_flag, info, markers })
    }

    pub(crate) fn launch<P: DeviceRepr>(&self, f: &CudaFunction, grid: u64, block: u32, params: P) -> Result<()> {
        let grid = grid.clamp(1, 1 << 20) as u32;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        unsafe { self.stream.launch_builder(f).arg(&params).launch(cfg) }.map_err(drv)?;
        Ok(())
    }

    pub(crate) fn td(&self, desc: &TensorDesc) -> Td {
        Td::new(desc, desc.buffer.0)
    }

    /// A fresh contiguous temporary, freed by the caller (safe at once: the stream is in order).
    pub(crate) fn temp(&self, shape: &[usize], dtype: DType) -> Result<TensorDesc> {
        let n: usize = shape.iter().product();
        let buffer = self.alloc.alloc((n * dtype.size_in_bytes()).max(1))?;
        Ok(TensorDesc { buffer, dtype, layout: Layout::contiguous(shape) })
    }

    pub(crate) fn ew(&self, op: i32, sub: i32, f: [f32; 2], inputs: &[&TensorDesc], out: &TensorDesc) -> Result<()> {
        let n = out.elem_count();
        if n == 0 {
            return Ok(());
        }
        // Merge dims that are contiguous with each other in every operand: fewer index divisions per element.
        let mut layouts: Vec<Layout> =
            std::iter::once(&out.layout).chain(inputs.iter().map(|t| &t.layout)).cloned().collect();
        collapse_dims(&mut layouts);
        if let Some(p) = vec_params(op, sub, f, inputs, out, &layouts) {
            let kernel = if p.nvec < (1 << 28) { &self.kernels.ew_vec32 } else { &self.kernels.ew_vec };
            return self.launch(kernel, (p.nvec as u64).div_ceil(256), 256, p);
        }
        let td = |t: &TensorDesc, l: &Layout| {
            Td::new(&TensorDesc { buffer: t.buffer, dtype: t.dtype, layout: l.clone() }, t.buffer.0)
        };
        let mut p =
            EwParams { out: td(out, &layouts[0]), n: n as i64, op, sub, f0: f[0], f1: f[1], ..Default::default() };
        let contiguous = layouts.iter().all(|l| l.is_contiguous());
        for (i, t) in inputs.iter().enumerate() {
            p.inputs[i] = td(t, &layouts[i + 1]);
        }
        p.contiguous = contiguous as i32;
        p.small = (p.n < 1 << 32) as i32;
        self.launch(&self.kernels.ew, (p.n as u64).div_ceil(256), 256, p)
    }

    /// Copy (with cast) `src` into `dst` (same shape).
    pub(crate) fn copy(&self, src: &TensorDesc, dst: &TensorDesc) -> Result<()> {
        self.ew(0, 0, [0.0; 2], &[src], dst)
    }

    /// A contiguous copy of `t` in `dtype`; `None` when `t` already is one.
    pub(crate) fn contiguous_as(&self, t: &TensorDesc, dtype: DType) -> Result<Option<TensorDesc>> {
        if t.dtype == dtype && t.is_contiguous() {
            return Ok(None);
        }
        let tmp = self.temp(t.shape(), dtype)?;
        self.copy(t, &tmp)?;
        Ok(Some(tmp))
    }

    fn check_error_flag(&self) -> Result<()> {
        let mut flag = [0u8; 4];
        unsafe { result::memcpy_dtoh_async(&mut flag, self.error_flag.0, self.stream.cu_stream()) }.map_err(drv)?;
        self.stream.synchronize().map_err(drv)?;
        if flag != [0; 4] {
            unsafe { result::memset_d8_async(self.error_flag.0, 0, 4, self.stream.cu_stream()) }.map_err(drv)?;
            return Err(Error::InvalidArgument(
                "cuda: gather met an id outside the table (since the last synchronisation)".into(),
            ));
        }
        Ok(())
    }
}

impl Device for CudaDevice {
    fn info(&self) -> DeviceInfo {
        let mut info = self.info.clone();
        if let Ok((free, _)) = self.ctx.mem_get_info() {
            info.free_memory_bytes = free as u64;
        }
        info
    }
    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        self.ctx.bind_to_thread().map_err(drv)?;
        self.alloc.alloc(bytes)
    }
    fn free(&self, buffer: BufferId) {
        self.alloc.free(buffer)
    }
    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        let size = self.alloc.size_of(buffer)?;
        if offset + data.len() > size {
            return Err(Error::InvalidArgument(format!(
                "cuda: upload of {} bytes at {offset} overflows a {size}-byte buffer",
                data.len()
            )));
        }
        self.ctx.bind_to_thread().map_err(drv)?;
        // Pageable source: the driver stages it before returning, so `data` may be reused at once.
        unsafe { result::memcpy_htod_async(buffer.0 + offset as u64, data, self.stream.cu_stream()) }.map_err(drv)
    }
    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        let size = self.alloc.size_of(buffer)?;
        if offset + out.len() > size {
            return Err(Error::InvalidArgument(format!(
                "cuda: download of {} bytes at {offset} overflows a {size}-byte buffer",
                out.len()
            )));
        }
        self.ctx.bind_to_thread().map_err(drv)?;
        unsafe { result::memcpy_dtoh_async(out, buffer.0 + offset as u64, self.stream.cu_stream()) }.map_err(drv)?;
        self.check_error_flag()
    }
    fn copy_buffer(&self, src: BufferId, so: usize, dst: BufferId, d_o: usize, n: usize) -> Result<()> {
        if so + n > self.alloc.size_of(src)? || d_o + n > self.alloc.size_of(dst)? {
            return Err(Error::InvalidArgument("cuda: device copy out of bounds".into()));
        }
        self.ctx.bind_to_thread().map_err(drv)?;
        unsafe { result::memcpy_dtod_async(dst.0 + d_o as u64, src.0 + so as u64, n, self.stream.cu_stream()) }
            .map_err(drv)
    }
    fn supports(&self, call: &OpCall) -> bool {
        if reference::validate(call).is_err() {
            return false;
        }
        match call.op {
            Op::Matmul { .. } | Op::Conv2d { .. } | Op::Attention { .. } => {
                call.outputs[0].dtype.is_float() && call.inputs.iter().all(|t| t.dtype.is_float())
            }
            // Not fused here: the core runs the matmul (cuBLASLt) and the gated residual.
            Op::MatmulGatedResidual { .. } => false,
            Op::AttentionBackward { causal, .. } => !causal && crate::attention::backward_kernels(self, call).is_some(),
            _ => true,
        }
    }
    fn execute(&self, call: &OpCall) -> Result<()> {
        reference::validate(call)?;
        self.ctx.bind_to_thread().map_err(drv)?;
        let ins: Vec<&TensorDesc> = call.inputs.iter().collect();
        let out = &call.outputs[0];
        match call.op {
            Op::Copy => self.copy(ins[0], out),
            Op::Fill { value } => self.ew(1, 0, [value, 0.0], &[], out),
            Op::Unary(u) => self.ew(2, u as i32, [0.0; 2], &ins, out),
            Op::Binary(b) => self.ew(3, b as i32, [0.0; 2], &ins, out),
            Op::Affine { mul, add } => self.ew(4, 0, [mul, add], &ins, out),
            Op::Modulate => self.ew(5, 0, [0.0; 2], &ins, out),
            Op::GatedResidual => self.ew(6, 0, [0.0; 2], &ins, out),
            Op::Matmul { bias, act } => self.matmul(ins[0], ins[1], if bias { Some(ins[2]) } else { None }, act, out),
            Op::MatmulGatedResidual { .. } => Err(Error::Unsupported {
                backend: "cuda".into(),
                op: call.op.name(),
                detail: "declined in supports()".into(),
            }),
            Op::Softmax | Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::LayerNormModulate { .. } => {
                let d = *out.shape().last().unwrap_or(&1);
                let rows = out.elem_count().checked_div(d).unwrap_or(0);
                let mut p = RowParams {
                    x: self.td(ins[0]),
                    out: self.td(out),
                    rows: rows as i64,
                    d: d as i64,
                    causal_base: -1,
                    causal_rows: 1,
                    ..Default::default()
                };
                match call.op {
                    Op::Softmax => p.op = 0,
                    Op::LayerNorm { eps, affine } => {
                        p.op = 1;
                        p.eps = eps;
                        p.affine = affine as i32;
                        if affine {
                            p.a = self.td(ins[1]);
                            p.b = self.td(ins[2]);
                        }
                    }
                    Op::RmsNorm { eps } => {
                        p.op = 2;
                        p.eps = eps;
                        p.a = self.td(ins[1]);
                    }
                    Op::LayerNormModulate { eps } => {
                        p.op = 3;
                        p.eps = eps;
                        p.a = self.td(ins[1]);
                        p.b = self.td(ins[2]);
                    }
                    _ => unreachable!(),
                }
                self.row_op(p)
            }
            Op::GroupNorm { groups, eps, affine } => {
                let s = out.shape();
                let spatial = s[2..].iter().product::<usize>();
                let len = s[1] / groups * spatial;
                let mut p = GroupNormParams {
                    x: self.td(ins[0]),
                    w: if affine { self.td(ins[1]) } else { Td::default() },
                    b: if affine { self.td(ins[2]) } else { Td::default() },
                    out: self.td(out),
                    channels: s[1] as i64,
                    spatial: spatial as i64,
                    groups: groups as i32,
                    affine: affine as i32,
                    eps,
                    contiguous: (ins[0].is_contiguous() && out.is_contiguous()) as i32,
                    stats: 0,
                    chunk: 0,
                    coeffs: 0,
                };
                if len < 1 << 16 {
                    // Small groups: one block per group, exact two-pass statistics.
                    return self.launch(&self.kernels.group_norm, (s[0] * groups) as u64, 256, p);
                }
                // Large groups (the VAE): statistics over many blocks, then a parallel normalisation. With
                // contiguous operands and 8-aligned planes, both passes move 16 bytes per access and the
                // normalisation reads per-channel coefficients instead of dividing per element.
                let (x, n, c) = (ins[0], s[0], s[1]);
                let wide = p.contiguous == 1
                    && spatial.is_multiple_of(8)
                    && x.layout.offset.is_multiple_of(8)
                    && out.layout.offset.is_multiple_of(8)
                    && n * c <= 65535;
                let stats_bytes = 16 * n * groups;
                let scratch = self.alloc.alloc(stats_bytes + if wide { 12 * n * c } else { 0 })?;
                let zeroed = unsafe { result::memset_d8_async(scratch.0, 0, stats_bytes, self.stream.cu_stream()) };
                let run = zeroed.map_err(drv).and_then(|_| {
                    p.stats = scratch.0;
                    p.chunk = 16384;
                    p.coeffs = scratch.0 + stats_bytes as u64;
                    let stats_kernel =
                        if wide { &self.kernels.group_norm_stats8 } else { &self.kernels.group_norm_stats };
                    let cfg = LaunchConfig {
                        grid_dim: (len.div_ceil(16384) as u32, (n * groups) as u32, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    unsafe { self.stream.launch_builder(stats_kernel).arg(&p).launch(cfg) }.map_err(drv)?;
                    if !wide {
                        return self.launch(
                            &self.kernels.group_norm_apply,
                            (out.elem_count() as u64).div_ceil(256),
                            256,
                            p,
                        );
                    }
                    self.launch(&self.kernels.group_norm_coeffs, (n * c).div_ceil(256) as u64, 256, p)?;
                    let cfg = LaunchConfig {
                        grid_dim: (spatial.div_ceil(8 * 256).min(64) as u32, (n * c) as u32, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    unsafe { self.stream.launch_builder(&self.kernels.group_norm_apply8).arg(&p).launch(cfg) }
                        .map_err(drv)
                        .map(|_| ())
                });
                self.alloc.free(scratch);
                run
            }
            Op::UpsampleNearest2d { factor } => {
                let p = UpsampleParams {
                    input: self.td(ins[0]),
                    out: self.td(out),
                    n: out.elem_count() as i64,
                    factor: factor as i32,
                    pad: 0,
                };
                let (x, ow) = (ins[0], out.shape()[3]);
                let h8 = x.dtype == out.dtype
                    && matches!(x.dtype, DType::F16 | DType::BF16)
                    && out.is_contiguous()
                    && out.layout.offset.is_multiple_of(8)
                    && x.strides()[3] == 1
                    && ow.is_multiple_of(8)
                    && p.n / 8 < 1 << 31;
                if h8 {
                    return self.launch(&self.kernels.upsample_h8, (p.n as u64 / 8).div_ceil(256), 256, p);
                }
                self.launch(&self.kernels.upsample, (p.n as u64).div_ceil(256), 256, p)
            }
            Op::Gather => {
                let p = GatherParams {
                    table: self.td(ins[0]),
                    ids: self.td(ins[1]),
                    out: self.td(out),
                    error_flag: self.error_flag.0,
                    n: out.elem_count() as i64,
                };
                self.launch(&self.kernels.gather, (p.n as u64).div_ceil(256), 256, p)
            }
            Op::Conv2d { stride, padding, bias } => self.conv2d(call, stride, padding, bias),
            Op::Attention { scale, causal, bias, qk_norm, norm_eps } => {
                crate::attention::attention(self, call, scale, causal, bias, qk_norm, norm_eps)
            }
            Op::AttentionBackward { scale, .. } => crate::attention::backward(self, call, scale),
        }
    }
    fn synchronize(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(drv)?;
        self.check_error_flag()
    }
    fn stats(&self) -> Vec<String> {
        let mut stats = self.alloc.stats();
        stats.extend(self.markers.stats());
        stats
    }
    fn record_marker(&self) -> Result<Option<sd3_core::MarkerId>> {
        self.markers.record(&self.ctx, &self.stream).map(Some)
    }
    fn marker_elapsed(&self, start: sd3_core::MarkerId, end: sd3_core::MarkerId) -> Result<f64> {
        self.markers.elapsed(start, end)
    }
    fn release_marker(&self, marker: sd3_core::MarkerId) {
        self.markers.release(marker)
    }
}

/// Parameters of the vectorised elementwise kernel, when it applies: one float dtype throughout (a copy must
/// not cast), collapsed rank at most 4, unit last stride, and 8-element alignment of the last dim, offsets and
/// strides.
fn vec_params(
    op: i32,
    sub: i32,
    f: [f32; 2],
    inputs: &[&TensorDesc],
    out: &TensorDesc,
    layouts: &[Layout],
) -> Option<EwVecParams> {
    const R: usize = 4;
    let dt = out.dtype;
    if !dt.is_float() || inputs.iter().any(|t| t.dtype != dt) || layouts[0].shape.len() > R {
        return None;
    }
    let rank = layouts[0].shape.len();
    // Dims and strides right-aligned into R slots (missing outer dims have size 1).
    let dim = |l: &Layout, i: usize| if i + rank >= R { l.shape[i + rank - R] } else { 1 };
    let stride = |l: &Layout, i: usize| if i + rank >= R { l.strides[i + rank - R] } else { 0 };
    if !dim(&layouts[0], R - 1).is_multiple_of(8) {
        return None;
    }
    let mut p = EwVecParams {
        d0: dim(&layouts[0], 0) as i64,
        d1: dim(&layouts[0], 1) as i64,
        d2: dim(&layouts[0], 2) as i64,
        d3: dim(&layouts[0], 3) as i64,
        nvec: (out.elem_count() / 8) as i64,
        op,
        sub,
        n_in: inputs.len() as i32,
        dtype: dt as i32,
        f0: f[0],
        f1: f[1],
        ..Default::default()
    };
    let buffers = std::iter::once(out.buffer).chain(inputs.iter().map(|t| t.buffer));
    for (k, (l, buffer)) in layouts.iter().zip(buffers).enumerate() {
        let aligned = (0..R - 1).all(|i| stride(l, i).is_multiple_of(8));
        if stride(l, R - 1) != 1 || !l.offset.is_multiple_of(8) || !aligned {
            return None;
        }
        p.ptr[k] = buffer.0;
        p.off[k] = l.offset as i64;
        p.s0[k] = stride(l, 0) as i64;
        p.s1[k] = stride(l, 1) as i64;
        p.s2[k] = stride(l, 2) as i64;
    }
    Some(p)
}

/// Merge adjacent dims `d, d+1` wherever every layout has `stride[d] == stride[d+1]·shape[d+1]` (and drop
/// size-1 dims), so the kernels index a lower-rank view of the same elements in the same order.
fn collapse_dims(layouts: &mut [Layout]) {
    let rank = layouts[0].shape.len();
    let mut keep: Vec<usize> = (0..rank).filter(|&d| layouts[0].shape[d] != 1).collect();
    if keep.is_empty() {
        keep.push(0);
    }
    let mut out: Vec<(usize, Vec<usize>)> = Vec::new(); // (size, strides per layout)
    for &d in &keep {
        if rank == 0 {
            break;
        }
        let size = layouts[0].shape[d];
        let strides: Vec<usize> = layouts.iter().map(|l| l.strides[d]).collect();
        if let Some((psize, pstrides)) = out.last_mut() {
            if pstrides.iter().zip(&strides).all(|(&ps, &s)| ps == s * size) {
                *psize *= size;
                *pstrides = strides;
                continue;
            }
        }
        out.push((size, strides));
    }
    for (i, l) in layouts.iter_mut().enumerate() {
        l.shape = out.iter().map(|o| o.0).collect();
        l.strides = out.iter().map(|o| o.1[i]).collect();
    }
}
