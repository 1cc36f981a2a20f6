//! Matrix products: linears (cuBLASLt with fused bias and activation, the few-row GEMV), general batched
//! matmuls (cuBLAS) and convolutions (im2col, then cuBLAS).

use crate::device::CudaDevice;
use crate::gemm::{collapse_batch, mat_layout, Gemm};
use crate::lt::{BiasGemm, Epilogue};
use crate::params::Im2colParams;
use sd3_core::{DType, Layout, OpCall, Result, TensorDesc, UnaryOp};

impl CudaDevice {
    /// `out = act(a·b + bias)`. GELU (tanh) and ReLU with a bias go into cuBLASLt's epilogue where the fused path
    /// applies; any other activation (or layout) runs as the product, then the unary op in place on `out`.
    pub(crate) fn matmul(
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

    pub(crate) fn conv2d(&self, call: &OpCall, stride: [usize; 2], padding: [usize; 2], bias: bool) -> Result<()> {
        let (x, w, out) = (&call.inputs[0], &call.inputs[1], &call.outputs[0]);
        let ct = out.dtype;
        let (nb, c) = (x.shape()[0], x.shape()[1]);
        let (o, kh, kw) = (w.shape()[0], w.shape()[2], w.shape()[3]);
        let (oh, ow) = (out.shape()[2], out.shape()[3]);
        let ckk = c * kh * kw;
        let wc = self.contiguous_as(w, ct)?;
        let wd = wc.as_ref().unwrap_or(w);
        let cols = self.temp(&[ckk, oh * ow], ct)?;
        // The products go straight into `out` when it is contiguous, else through a temporary.
        let direct = out.is_contiguous() && out.dtype == ct;
        let y = if direct {
            TensorDesc {
                buffer: out.buffer,
                dtype: ct,
                layout: Layout { offset: out.layout.offset, ..Layout::contiguous(&[nb, o, oh * ow]) },
            }
        } else {
            self.temp(&[nb, o, oh * ow], ct)?
        };
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
            let eighths = ckk * oh * ow / 8;
            if x.dtype == ct
                && matches!(ct, DType::F16 | DType::BF16)
                && x.strides()[3] == 1
                && ow.is_multiple_of(8)
                && eighths < 1 << 31
            {
                // Eight pixels per thread, one 16-byte store each.
                self.launch(&self.kernels.im2col8_h, eighths.div_ceil(256) as u64, 256, p)?;
            } else {
                // One block per (column row, output row); threads along the output row.
                let threads = (ow.next_multiple_of(32)).min(256) as u32;
                self.launch(&self.kernels.im2col, (ckk * oh) as u64, threads, p)?;
            }
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
                c: y.buffer.0 + (y.layout.offset + ni * o * oh * ow) as u64 * es,
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
        if !direct {
            let yv = TensorDesc { buffer: y.buffer, dtype: ct, layout: Layout::contiguous(out.shape()) };
            self.copy(&yv, out)?;
            self.alloc.free(y.buffer);
        }
        self.alloc.free(cols.buffer);
        if let Some(t) = wc {
            self.alloc.free(t.buffer);
        }
        Ok(())
    }
}
