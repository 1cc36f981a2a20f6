//! Multi-head attention as chunked products through cuBLAS: for each batch and chunk of queries,
//! `S = scale·Q·Kᵀ (+ bias)` in f32, a row softmax (with the causal mask) written straight into the value
//! dtype, then `O = P·V`, all heads of a batch in one strided-batched call.
//!
//! The score matrix exists only one query chunk at a time (at most `CHUNK_BYTES`), never whole. This is the
//! first CUDA attention; a fused tensor-core kernel that keeps scores in registers is the planned next step
//! (see docs/performance.md).

use crate::device::CudaDevice;
use crate::gemm::{mat_layout, Gemm};
use crate::params::RowParams;
use sd3_core::{DType, Error, Layout, OpCall, Result, TensorDesc};

const CHUNK_BYTES: usize = 256 << 20;

pub fn attention(
    dev: &CudaDevice,
    call: &OpCall,
    scale: f32,
    causal: bool,
    has_bias: bool,
    qk_norm: bool,
    norm_eps: f32,
) -> Result<()> {
    let (q, k, v, out) = (&call.inputs[0], &call.inputs[1], &call.inputs[2], &call.outputs[0]);
    let bias = has_bias.then(|| &call.inputs[3]);
    let (b, h, nq, dh) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let (nk, dv) = (k.shape()[2], v.shape()[3]);
    if b * h * nq * dv == 0 {
        return Ok(());
    }
    if nk == 0 {
        return Err(Error::InvalidArgument("attention over zero keys".into()));
    }
    let mut temps: Vec<TensorDesc> = Vec::new();
    // Q and K: same dtype, each [N, Dh] matrix readable by cuBLAS; RMS-normed per head when asked.
    let qk_dtype = if q.dtype == k.dtype && q.dtype != DType::F32 { q.dtype } else { DType::F32 };
    let mut prep_qk = |t: &TensorDesc, norm: Option<&TensorDesc>| -> Result<TensorDesc> {
        let readable = mat_layout(t.shape()[2], t.shape()[3], t.strides()[2], t.strides()[3]).is_some();
        if norm.is_none() && t.dtype == qk_dtype && readable {
            return Ok(t.clone());
        }
        let tmp = dev.temp(t.shape(), qk_dtype)?;
        temps.push(tmp.clone());
        match norm {
            Some(w) => {
                let d = t.shape()[3];
                dev.row_op(RowParams {
                    x: dev.td(t),
                    a: dev.td(w),
                    out: dev.td(&tmp),
                    rows: (t.elem_count() / d) as i64,
                    d: d as i64,
                    op: 2,
                    eps: norm_eps,
                    causal_base: -1,
                    causal_rows: 1,
                    ..Default::default()
                })?;
            }
            None => dev.copy(t, &tmp)?,
        }
        Ok(tmp)
    };
    let (qn, kn) = if qk_norm {
        let (wq, wk) = if has_bias { (&call.inputs[4], &call.inputs[5]) } else { (&call.inputs[3], &call.inputs[4]) };
        (prep_qk(q, Some(wq))?, prep_qk(k, Some(wk))?)
    } else {
        (prep_qk(q, None)?, prep_qk(k, None)?)
    };
    // V and P share a dtype: V's when it is half precision, else f32.
    let pv_dtype = if v.dtype == DType::F32 { DType::F32 } else { v.dtype };
    let vn = if mat_layout(nk, dv, v.strides()[2], v.strides()[3]).is_some() {
        v.clone()
    } else {
        let t = dev.temp(v.shape(), pv_dtype)?;
        dev.copy(v, &t)?;
        temps.push(t.clone());
        t
    };
    // The output: written in place when cuBLAS can, else through an f32 temporary.
    let direct = (out.dtype == pv_dtype || out.dtype == DType::F32)
        && (out.strides()[3] == 1 || dv == 1)
        && (out.strides()[2] >= dv || nq == 1);
    let target = if direct {
        out.clone()
    } else {
        let t = dev.temp(out.shape(), DType::F32)?;
        temps.push(t.clone());
        t
    };
    let chunk = (CHUNK_BYTES / (h * nk * 4)).clamp(1, nq);
    let scores = dev.temp(&[h, chunk, nk], DType::F32)?;
    let probs = dev.temp(&[h, chunk, nk], pv_dtype)?;
    temps.push(scores.clone());
    temps.push(probs.clone());
    let addr =
        |t: &TensorDesc, elem: usize| t.buffer.0 + (t.layout.offset + elem) as u64 * t.dtype.size_in_bytes() as u64;
    let blas = dev.blas.lock().unwrap();
    let handle = *blas.handle();
    let result = (|| -> Result<()> {
        for bi in 0..b {
            let mut q0 = 0;
            while q0 < nq {
                let c = chunk.min(nq - q0);
                let s_view =
                    TensorDesc { buffer: scores.buffer, dtype: DType::F32, layout: Layout::contiguous(&[h, c, nk]) };
                let p_view =
                    TensorDesc { buffer: probs.buffer, dtype: pv_dtype, layout: Layout::contiguous(&[h, c, nk]) };
                let qs = qn.strides();
                let ks = kn.strides();
                unsafe {
                    Gemm {
                        m: c as i64,
                        n: nk as i64,
                        k: dh as i64,
                        batch: h as i64,
                        a: addr(&qn, bi * qs[0] + q0 * qs[2]),
                        a_layout: mat_layout(c, dh, qs[2], qs[3]).unwrap(),
                        a_batch_stride: qs[1] as i64,
                        b: addr(&kn, bi * ks[0]),
                        b_layout: mat_layout(dh, nk, ks[3], ks[2]).unwrap(),
                        b_batch_stride: ks[1] as i64,
                        c: scores.buffer.0,
                        ldc: nk as i64,
                        c_batch_stride: (c * nk) as i64,
                        ab_type: qk_dtype,
                        c_type: DType::F32,
                        alpha: scale,
                        beta: 0.0,
                    }
                    .run(handle)?;
                }
                if let Some(bias) = bias {
                    let bs = bias.strides();
                    let bl = Layout {
                        shape: vec![h, c, nk],
                        strides: vec![bs[1], bs[2], bs[3]],
                        offset: bias.layout.offset + bi * bs[0] + q0 * bs[2],
                    };
                    let bv = TensorDesc { buffer: bias.buffer, dtype: bias.dtype, layout: bl };
                    dev.ew(3, 0, [0.0; 2], &[&s_view, &bv], &s_view)?;
                }
                dev.row_op(RowParams {
                    x: dev.td(&s_view),
                    out: dev.td(&p_view),
                    rows: (h * c) as i64,
                    d: nk as i64,
                    op: 0,
                    causal_base: if causal { q0 as i32 } else { -1 },
                    causal_rows: c as i64,
                    ..Default::default()
                })?;
                let vs = vn.strides();
                let ts = target.strides();
                unsafe {
                    Gemm {
                        m: c as i64,
                        n: dv as i64,
                        k: nk as i64,
                        batch: h as i64,
                        a: probs.buffer.0,
                        a_layout: mat_layout(c, nk, nk, 1).unwrap(),
                        a_batch_stride: (c * nk) as i64,
                        b: addr(&vn, bi * vs[0]),
                        b_layout: mat_layout(nk, dv, vs[2], vs[3]).unwrap(),
                        b_batch_stride: vs[1] as i64,
                        c: addr(&target, bi * ts[0] + q0 * ts[2]),
                        ldc: if c == 1 { dv as i64 } else { ts[2] as i64 },
                        c_batch_stride: ts[1] as i64,
                        ab_type: pv_dtype,
                        c_type: target.dtype,
                        alpha: 1.0,
                        beta: 0.0,
                    }
                    .run(handle)?;
                }
                q0 += c;
            }
        }
        Ok(())
    })();
    drop(blas);
    if result.is_ok() && target.buffer != out.buffer {
        dev.copy(&target, out)?;
    }
    for t in temps {
        dev.alloc.free(t.buffer);
    }
    result
}
