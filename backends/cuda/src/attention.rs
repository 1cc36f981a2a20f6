//! Multi-head attention, two ways:
//! - f16/bf16 with head dim 64 or 128 and no mask or bias (the MM-DiT's joint attention): the fused
//!   tensor-core kernel in `kernels/flash.cu`, which never writes scores to memory;
//! - everything else (CLIP's causal mask, T5's position bias, f32, other head dims): chunked products through
//!   cuBLAS. For each batch and chunk of queries, `S = scale·Q·Kᵀ (+ bias)` in f32, a row softmax (with the
//!   causal mask) written straight into the value dtype, then `O = P·V`, all heads of a batch in one
//!   strided-batched call. Scores exist one query chunk at a time (at most `CHUNK_BYTES`), never whole.

use crate::device::CudaDevice;
use crate::gemm::{mat_layout, Gemm};
use crate::params::{FlashBwdParams, FlashParams, RowParams};
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
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
    if !has_bias && !causal {
        if let Some(launch) = flash_kernel(dev, q, k, v, out) {
            return flash(dev, call, launch, scale, qk_norm, norm_eps);
        }
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
            Some(w) => rms_norm_heads(dev, t, w, norm_eps, &tmp)?,
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
    // V and P share a dtype: V's when it and the output are half precision; f32 when either is f32 (rounding the
    // probabilities to 16 bits would cost an f32 output three decimal digits).
    let pv_dtype = if v.dtype == DType::F32 || out.dtype == DType::F32 { DType::F32 } else { v.dtype };
    let vn = if v.dtype == pv_dtype && mat_layout(nk, dv, v.strides()[2], v.strides()[3]).is_some() {
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

/// A fused-attention kernel and its launch shape: `rows` query rows per block of `threads`, `smem` bytes of
/// dynamic shared memory.
struct FlashLaunch<'a> {
    kernel: &'a CudaFunction,
    rows: usize,
    threads: u32,
    smem: u32,
}

/// The tensor-core kernel for these operands, if one applies: f16/bf16 throughout, head dim 64 or 128,
/// unit feature stride, rows aligned for vector loads (offsets and strides multiples of 8 for K and V, 2 for Q and O).
/// Head dim 64 on compute capability 9.0 takes the `wgmma` kernel (`flash_sm90.cu`), the rest `flash.cu`.
fn flash_kernel<'a>(
    dev: &'a CudaDevice,
    q: &TensorDesc,
    k: &TensorDesc,
    v: &TensorDesc,
    out: &TensorDesc,
) -> Option<FlashLaunch<'a>> {
    let dt = q.dtype;
    if !matches!(dt, DType::F16 | DType::BF16) || [k.dtype, v.dtype, out.dtype].iter().any(|&d| d != dt) {
        return None;
    }
    let dh = q.shape()[3];
    if !(dh == 64 || dh == 128)
        || v.shape()[3] != dh
        || q.shape()[0] * q.shape()[1] > 65535
        || q.shape()[2] > i32::MAX as usize
        || k.shape()[2] > i32::MAX as usize
    {
        return None;
    }
    // K and V rows are read 8 elements (16 bytes) at a time; Q and O 2 at a time.
    let aligned = |t: &TensorDesc, n: usize| {
        t.strides()[3] == 1 && t.layout.offset.is_multiple_of(n) && t.strides()[..3].iter().all(|s| s.is_multiple_of(n))
    };
    if !(aligned(q, 2) && aligned(out, 2) && aligned(k, 8) && aligned(v, 8)) {
        return None;
    }
    let bf16 = (dt == DType::BF16) as usize;
    if let (64, Some(f90)) = (dh, dev.kernels.flash90.as_ref()) {
        // Two warpgroups of 64 query rows per block (see flash_sm90.cu).
        return Some(FlashLaunch {
            kernel: &f90[bf16],
            rows: 128,
            threads: 256,
            smem: crate::kernels::FLASH90_SMEM_BYTES,
        });
    }
    // 128 query rows per block: 4 warps of 32 rows at head dim 64, 8 warps of 16 at 128 (see flash.cu).
    Some(FlashLaunch {
        kernel: &dev.kernels.flash.as_ref()?[bf16][(dh == 128) as usize],
        rows: 128,
        threads: if dh == 64 { 128 } else { 256 },
        smem: crate::kernels::flash_smem_bytes(dh, 64),
    })
}

fn flash(dev: &CudaDevice, call: &OpCall, launch: FlashLaunch, scale: f32, qk_norm: bool, norm_eps: f32) -> Result<()> {
    let (q, k, v, out) = (&call.inputs[0], &call.inputs[1], &call.inputs[2], &call.outputs[0]);
    let mut temps = Vec::new();
    // q/k RMS norm first, into contiguous temporaries of the same dtype.
    let normed = |t: &TensorDesc, w: &TensorDesc, temps: &mut Vec<TensorDesc>| -> Result<TensorDesc> {
        let tmp = dev.temp(t.shape(), t.dtype)?;
        temps.push(tmp.clone());
        rms_norm_heads(dev, t, w, norm_eps, &tmp)?;
        Ok(tmp)
    };
    let (qn, kn) = if qk_norm {
        (normed(q, &call.inputs[3], &mut temps)?, normed(k, &call.inputs[4], &mut temps)?)
    } else {
        (q.clone(), k.clone())
    };
    let s3 = |t: &TensorDesc| [t.strides()[0] as i64, t.strides()[1] as i64, t.strides()[2] as i64];
    let (b, h, nq) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    let p = FlashParams {
        q: qn.buffer.0,
        k: kn.buffer.0,
        v: v.buffer.0,
        o: out.buffer.0,
        q_s: s3(&qn),
        k_s: s3(&kn),
        v_s: s3(v),
        o_s: s3(out),
        q_off: qn.layout.offset as i64,
        k_off: kn.layout.offset as i64,
        v_off: v.layout.offset as i64,
        o_off: out.layout.offset as i64,
        heads: h as i32,
        nq: nq as i32,
        nk: k.shape()[2] as i32,
        scale_log2: scale * std::f32::consts::LOG2_E,
    };
    let cfg = LaunchConfig {
        grid_dim: (nq.div_ceil(launch.rows) as u32, (b * h) as u32, 1),
        block_dim: (launch.threads, 1, 1),
        shared_mem_bytes: launch.smem,
    };
    let launched = unsafe { dev.stream.launch_builder(launch.kernel).arg(&p).launch(cfg) };
    for t in temps {
        dev.alloc.free(t.buffer);
    }
    launched.map(|_| ()).map_err(crate::device::drv)
}

/// Per-head RMS norm of `t [B,H,N,Dh]` with weight `w [Dh]` into `out` (the q/k norm of SD3.5).
fn rms_norm_heads(dev: &CudaDevice, t: &TensorDesc, w: &TensorDesc, eps: f32, out: &TensorDesc) -> Result<()> {
    let d = t.shape()[3];
    dev.row_op(RowParams {
        x: dev.td(t),
        a: dev.td(w),
        out: dev.td(out),
        rows: (t.elem_count() / d) as i64,
        d: d as i64,
        op: 2,
        eps,
        causal_base: -1,
        causal_rows: 1,
        ..Default::default()
    })
}

/// The backward kernels (`kernels/flash_bwd.cu`, `[dq, dkdv]`) for an `Op::AttentionBackward` call, if they apply:
/// f16/bf16 throughout, head dim 64, unit feature stride; q, k, v and do (read 16 bytes at a time) with offsets
/// and strides that are multiples of 8, the outputs (written 2 elements at a time) multiples of 2.
pub fn backward_kernels<'a>(dev: &'a CudaDevice, call: &OpCall) -> Option<&'a [CudaFunction; 2]> {
    let q = &call.inputs[0];
    let dt = q.dtype;
    let all = || call.inputs.iter().chain(call.outputs);
    if !matches!(dt, DType::F16 | DType::BF16) || all().any(|t| t.dtype != dt) {
        return None;
    }
    let (b, h, n, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    if d != 64 || b * h > 65535 || n > i32::MAX as usize {
        return None;
    }
    let aligned = |t: &TensorDesc, m: usize| {
        let s = t.strides();
        s[s.len() - 1] == 1 && t.layout.offset.is_multiple_of(m) && s[..s.len() - 1].iter().all(|x| x.is_multiple_of(m))
    };
    let loaded = [0, 1, 2, 4].iter().all(|&i| aligned(&call.inputs[i], 8));
    if !(loaded && aligned(&call.inputs[3], 1) && aligned(&call.outputs[0], 2)) {
        return None;
    }
    dev.kernels.flash_bwd.as_ref().map(|k| &k[(dt == DType::BF16) as usize])
}

/// `Op::AttentionBackward` on the two kernels of `kernels/flash_bwd.cu`: dq (and each row's log-sum-exp and
/// rowsum(dO ∘ O), kept in f32 temporaries), then dk and dv.
pub fn backward(dev: &CudaDevice, call: &OpCall, scale: f32) -> Result<()> {
    let Some(kernels) = backward_kernels(dev, call) else {
        return Err(Error::Unsupported {
            backend: "cuda".into(),
            op: call.op.name(),
            detail: "f16/bf16 operands of head dim 64 with aligned rows expected".into(),
        });
    };
    let (q, out) = (&call.inputs[0], &call.outputs[0]);
    let (b, h, n) = (q.shape()[0], q.shape()[1], q.shape()[2]);
    if b * h * n == 0 {
        return Ok(());
    }
    let lse = dev.temp(&[b * h * n], DType::F32)?;
    let delta = dev.temp(&[b * h * n], DType::F32)?;
    let mut p = FlashBwdParams {
        lse: lse.buffer.0,
        delta: delta.buffer.0,
        heads: h as i32,
        n: n as i32,
        scale,
        scale_log2: scale * std::f32::consts::LOG2_E,
        ..Default::default()
    };
    for (i, t) in call.inputs.iter().enumerate() {
        let s = t.strides();
        (p.ptr[i], p.s[i], p.off[i]) = (t.buffer.0, [s[0] as i64, s[1] as i64, s[2] as i64], t.layout.offset as i64);
    }
    // The output [3, B, H, N, D] as its three parts.
    let os = out.strides();
    for part in 0..3 {
        let i = 5 + part;
        p.ptr[i] = out.buffer.0;
        p.s[i] = [os[1] as i64, os[2] as i64, os[3] as i64];
        p.off[i] = (out.layout.offset + part * os[0]) as i64;
    }
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(64) as u32, (b * h) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: crate::kernels::flash_smem_bytes(64, 64),
    };
    let launched = (|| unsafe {
        dev.stream.launch_builder(&kernels[0]).arg(&p).launch(cfg)?;
        dev.stream.launch_builder(&kernels[1]).arg(&p).launch(cfg)
    })();
    dev.alloc.free(lse.buffer);
    dev.alloc.free(delta.buffer);
    launched.map(|_| ()).map_err(crate::device::drv)
}
