//! `CudaDevice`: the `sd3_core::Device` implementation. One context, one in-order stream, one cuBLAS handle.

use crate::gemm::{collapse_batch, mat_layout, Gemm};
use crate::kernels::Kernels;
use crate::lt::{BiasGemm, Epilogue, Lt};
use crate::memory::Allocator;
use crate::params::*;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{result, CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use sd3_core::{
    reference, BufferId, DType, Device, DeviceInfo, DeviceKind, Error, Layout, Op, OpCall, Result, TensorDesc, UnaryOp,
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
    lt: Lt,
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
                "attention=flash-mma (f16/bf16, head dim 64/128; chunked cuBLAS otherwise)".into(),
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

    pub(crate) fn row_op(&self, p: RowParams) -> Result<()> {
        if p.rows == 0 {
            return Ok(());
        }
        if row_warp_applies(&p) {
            let half = p.x.dtype != DType::F32 as i32;
            let size = if p.d <= 1024 {
                0
            } else if p.d <= 1536 {
                1
            } else {
                2
            };
            let kernel = &self.kernels.row_warp[half as usize][size];
            // 4 rows (warps) per block: small blocks pack the SMs tighter at ~96 registers a thread.
            return self.launch(kernel, (p.rows as u64).div_ceil(4), 128, p);
        }
        self.launch(&self.kernels.row_op, p.rows as u64, 256, p)
    }

    /// `out = act(a·b + bias)`. GELU (tanh) and ReLU with a bias go into cuBLASLt's epilogue where the fused path
    /// applies; any other activation (or layout) runs as the product, then the unary op in place on `out`.
    fn matmul(
        &self,
        a: &TensorDesc,
        b: &TensorDesc,
        bias: Option<&TensorDesc>,
        act: Option<UnaryOp>,
        out: &TensorDesc,
    ) -> Result<()> {
        let epilogue = match act {
            None => Some(Epilogue::Bias),
            Some(UnaryOp::GeluTanh) => Some(Epilogue::BiasGelu),
            Some(UnaryOp::Relu) => Some(Epilogue::BiasRelu),
            Some(_) => None,
        };
        if act.is_none() {
            if let Some(done) = crate::gemv::try_gemv(self, a, b, bias, out) {
                return done;
            }
        }
        if let (Some(epilogue), Some(bias)) = (epilogue, bias) {
            if let Some(done) = self.lt_linear(a, b, bias, epilogue, out) {
                return done;
            }
        }
        self.product(a, b, bias, out)?;
        match act {
            Some(u) => self.ew(2, u as i32, [0.0; 2], &[out], out),
            None => Ok(()),
        }
    }

    /// One cuBLASLt call with the bias (and activation) in the epilogue, when every operand is already in the
    /// output dtype and readable in place (batch dims collapsible; the output's rows unit-strided). `None`: nothing
    /// was queued.
    fn lt_linear(
        &self,
        a: &TensorDesc,
        b: &TensorDesc,
        bias: &TensorDesc,
        epilogue: Epilogue,
        out: &TensorDesc,
    ) -> Option<Result<()>> {
        let ct = out.dtype;
        let r = out.rank();
        let (m, n, k) = (out.shape()[r - 2], out.shape()[r - 1], a.shape()[r - 1]);
        if m == 0 || n == 0 || k == 0 || a.dtype != ct || b.dtype != ct || bias.dtype != ct {
            return None;
        }
        let unit_stride = |stride: usize| stride == 1 || n == 1;
        if !unit_stride(bias.strides()[0]) || !unit_stride(out.strides()[r - 1]) {
            return None;
        }
        let mat =
            |t: &TensorDesc, rows: usize, cols: usize| mat_layout(rows, cols, t.strides()[r - 2], t.strides()[r - 1]);
        let (a_layout, b_layout) = (mat(a, m, k)?, mat(b, k, n)?);
        let ldc = if m == 1 { n as i64 } else { out.strides()[r - 2] as i64 };
        if ldc < n as i64 {
            return None;
        }
        let (batch, a_bs) = collapse_batch(&a.shape()[..r - 2], &a.strides()[..r - 2])?;
        let (_, b_bs) = collapse_batch(&b.shape()[..r - 2], &b.strides()[..r - 2])?;
        let (_, d_bs) = collapse_batch(&out.shape()[..r - 2], &out.strides()[..r - 2])?;
        if batch > i32::MAX as i64 {
            return None;
        }
        let es = ct.size_in_bytes() as u64;
        let addr = |t: &TensorDesc| t.buffer.0 + t.layout.offset as u64 * es;
        let g = BiasGemm {
            m: m as i64,
            n: n as i64,
            k: k as i64,
            a: addr(a),
            a_layout,
            b: addr(b),
            b_layout,
            d: addr(out),
            ldc,
            bias: addr(bias),
            dtype: ct,
            epilogue,
            batch,
            a_batch_stride: a_bs,
            b_batch_stride: b_bs,
            d_batch_stride: d_bs,
        };
        let _blas = self.blas.lock().unwrap();
        Some(unsafe { self.lt.run(&g, self.stream.cu_stream() as *mut _) })
    }

    /// The product through cuBLAS (operands cast or copied to readable layouts when they must be), the bias
    /// pre-filled into the output.
    fn product(&self, a: &TensorDesc, b: &TensorDesc, bias: Option<&TensorDesc>, out: &TensorDesc) -> Result<()> {
        let ct = out.dtype;
        let r = out.rank();
        let (m, n, k) = (out.shape()[r - 2], out.shape()[r - 1], a.shape()[r - 1]);
        let mut temps = Vec::new();
        // Operands in the output dtype, each matrix readable by cuBLAS, batch dims collapsible.
        let prep = |t: &TensorDesc, temps: &mut Vec<TensorDesc>| -> Result<TensorDesc> {
            let rr = t.rank();
            let (rows, cols) = (t.shape()[rr - 2], t.shape()[rr - 1]);
            let (sr, sc) = (t.strides()[rr - 2], t.strides()[rr - 1]);
            let ok = t.dtype == ct
                && mat_layout(rows, cols, sr, sc).is_some()
                && collapse_batch(&t.shape()[..rr - 2], &t.strides()[..rr - 2]).is_some();
            if ok {
                return Ok(t.clone());
            }
            let tmp = self.temp(t.shape(), ct)?;
            self.copy(t, &tmp)?;
            temps.push(tmp.clone());
            Ok(tmp)
        };
        let a2 = prep(a, &mut temps)?;
        let b2 = prep(b, &mut temps)?;
        let out_ok = out.strides()[r - 1] == 1 || n == 1;
        let out_batch = collapse_batch(&out.shape()[..r - 2], &out.strides()[..r - 2]);
        let target = if out_ok && out_batch.is_some() && out.strides()[r - 2] >= n {
            out.clone()
        } else {
            let t = self.temp(out.shape(), ct)?;
            temps.push(t.clone());
            t
        };
        let es = ct.size_in_bytes() as u64;
        let mut beta = 0.0;
        if let Some(bias) = bias {
            // Pre-fill C with the bias broadcast along rows; the product then accumulates onto it (beta = 1).
            let mut bl = bias.layout.clone();
            bl.shape = target.shape().to_vec();
            bl.strides = vec![0; r];
            bl.strides[r - 1] = bias.strides()[0];
            self.copy(&TensorDesc { buffer: bias.buffer, dtype: bias.dtype, layout: bl }, &target)?;
            beta = 1.0;
        }
        let (batch, a_bs) = collapse_batch(&a2.shape()[..r - 2], &a2.strides()[..r - 2]).unwrap();
        let (_, b_bs) = collapse_batch(&b2.shape()[..r - 2], &b2.strides()[..r - 2]).unwrap();
        let (_, c_bs) = collapse_batch(&target.shape()[..r - 2], &target.strides()[..r - 2]).unwrap();
        let ldc = if m == 1 { n as i64 } else { target.strides()[r - 2] as i64 };
        let g = Gemm {
            m: m as i64,
            n: n as i64,
            k: k as i64,
            batch,
            a: a2.buffer.0 + a2.layout.offset as u64 * es,
            a_layout: mat_layout(m, k, a2.strides()[r - 2], a2.strides()[r - 1]).unwrap(),
            a_batch_stride: a_bs,
            b: b2.buffer.0 + b2.layout.offset as u64 * es,
            b_layout: mat_layout(k, n, b2.strides()[r - 2], b2.strides()[r - 1]).unwrap(),
            b_batch_stride: b_bs,
            c: target.buffer.0 + target.layout.offset as u64 * es,
            ldc: ldc.max(n as i64),
            c_batch_stride: c_bs,
            ab_type: ct,
            c_type: ct,
            alpha: 1.0,
            beta,
        };
        if m > 0 && n > 0 {
            if k == 0 {
                if bias.is_none() {
                    self.ew(1, 0, [0.0; 2], &[], &target)?;
                }
            } else {
                let blas = self.blas.lock().unwrap();
                unsafe { g.run(*blas.handle())? };
            }
        }
        if target.buffer != out.buffer {
            self.copy(&target, out)?;
        }
        for t in temps {
            self.alloc.free(t.buffer);
        }
        Ok(())
    }

    fn conv2d(&self, call: &OpCall, stride: [usize; 2], padding: [usize; 2], bias: bool) -> Result<()> {
        let (x, w, out) = (&call.inputs[0], &call.inputs[1], &call.outputs[0]);
        let ct = out.dtype;
        let (nb, c) = (x.shape()[0], x.shape()[1]);
        let (o, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
        let (oh, ow) = (out.shape()[2], out.shape()[3]);
        let ckk = c * kh * kw;
        let wc = self.contiguous_as(w, ct)?;
        let wd = wc.as_ref().unwrap_or(w);
        let cols = self.temp(&[ckk, oh * ow], ct)?;
        let y = self.temp(&[nb, o, oh * ow], ct)?;
        let es = ct.size_in_bytes() as u64;
        let mut beta = 0.0;
        if bias {
            let b = &call.inputs[2];
            let bl =
                Layout { shape: vec![nb, o, oh * ow], strides: vec![0, b.strides()[0], 0], offset: b.layout.offset };
            self.copy(&TensorDesc { buffer: b.buffer, dtype: b.dtype, layout: bl }, &y)?;
            beta = 1.0;
        }
        for ni in 0..nb {
            let p = Im2colParams {
                x: self.td(x),
                cols: cols.buffer.0,
                n: ni as i64,
                kh: kh as i32,
                kw: kw as i32,
                sh: stride[0] as i32,
                sw: stride[1] as i32,
                ph: padding[0] as i32,
                pw: padding[1] as i32,
                oh: oh as i64,
                ow: ow as i64,
                cols_dtype: ct as i32,
                pad: 0,
            };
            // One block per (column row, output row); threads along the output row.
            let threads = (ow.next_multiple_of(32)).min(256) as u32;
            self.launch(&self.kernels.im2col, (ckk * oh) as u64, threads, p)?;
            // y[ni] [O, OH·OW] = W [O, CKK] · cols [CKK, OH·OW]
            let g = Gemm {
                m: o as i64,
                n: (oh * ow) as i64,
                k: ckk as i64,
                batch: 1,
                a: wd.buffer.0 + wd.layout.offset as u64 * es,
                a_layout: mat_layout(o, ckk, ckk, 1).unwrap(),
                a_batch_stride: 0,
                b: cols.buffer.0,
                b_layout: mat_layout(ckk, oh * ow, oh * ow, 1).unwrap(),
                b_batch_stride: 0,
                c: y.buffer.0 + (ni * o * oh * ow) as u64 * es,
                ldc: (oh * ow) as i64,
                c_batch_stride: 0,
                ab_type: ct,
                c_type: ct,
                alpha: 1.0,
                beta,
            };
            let blas = self.blas.lock().unwrap();
            unsafe { g.run(*blas.handle())? };
        }
        let yv = TensorDesc { buffer: y.buffer, dtype: ct, layout: Layout::contiguous(out.shape()) };
        self.copy(&yv, out)?;
        self.alloc.free(cols.buffer);
        self.alloc.free(y.buffer);
        if let Some(t) = wc {
            self.alloc.free(t.buffer);
        }
        Ok(())
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
                };
                if len < 1 << 16 {
                    // Small groups: one block per group, exact two-pass statistics.
                    return self.launch(&self.kernels.group_norm, (s[0] * groups) as u64, 256, p);
                }
                // Large groups (the VAE): statistics over many blocks, then a parallel normalisation.
                let stats = self.alloc.alloc(2 * 8 * s[0] * groups)?;
                let zeroed =
                    unsafe { result::memset_d8_async(stats.0, 0, 16 * s[0] * groups, self.stream.cu_stream()) };
                let run = zeroed.map_err(drv).and_then(|_| {
                    p.stats = stats.0;
                    p.chunk = 16384;
                    let cfg = LaunchConfig {
                        grid_dim: (len.div_ceil(16384) as u32, (s[0] * groups) as u32, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    unsafe { self.stream.launch_builder(&self.kernels.group_norm_stats).arg(&p).launch(cfg) }
                        .map_err(drv)?;
                    self.launch(&self.kernels.group_norm_apply, (out.elem_count() as u64).div_ceil(256), 256, p)
                });
                self.alloc.free(stats);
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

/// Whether `row_warp` (kernels/rows.cu) can run these row params: a norm (not softmax) over rows of at most
/// 32·8·12 elements, a multiple of 8, every operand with unit last stride and rows starting 8-element aligned
/// (16-byte loads). Per-`[D]` weights need the same of their one dim.
fn row_warp_applies(p: &RowParams) -> bool {
    const ROW_OP_SOFTMAX: i32 = 0;
    const ROW_OP_LN_MODULATE: i32 = 3;
    let rows_aligned = |t: &Td| {
        let r = t.rank as usize;
        r >= 1 && t.strides[r - 1] == 1 && t.offset % 8 == 0 && t.strides[..r - 1].iter().all(|s| s % 8 == 0)
    };
    let vector_aligned = |t: &Td| t.rank == 1 && t.strides[0] == 1 && t.offset % 8 == 0;
    let float = |t: &Td| (0..3).contains(&t.dtype);
    let operands_ok = match p.op {
        ROW_OP_SOFTMAX => false,
        ROW_OP_LN_MODULATE => rows_aligned(&p.a) && rows_aligned(&p.b) && float(&p.a) && float(&p.b),
        1 if p.affine == 0 => true,
        1 => vector_aligned(&p.a) && vector_aligned(&p.b) && float(&p.a) && float(&p.b),
        _ => vector_aligned(&p.a) && float(&p.a),
    };
    // Modulate's scale/shift are indexed with x's row decomposition, so they must have x's shape.
    let same_rows = |t: &Td| t.rank == p.x.rank && t.shape == p.x.shape;
    let shapes_ok = p.op != ROW_OP_LN_MODULATE || (same_rows(&p.a) && same_rows(&p.b));
    operands_ok
        && shapes_ok
        && same_rows(&p.out)
        && p.rows < (1 << 31)
        && p.d % 8 == 0
        && p.d <= 32 * 8 * 12
        && rows_aligned(&p.x)
        && rows_aligned(&p.out)
        && float(&p.x)
        && float(&p.out)
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
