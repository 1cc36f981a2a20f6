//! [`Tensor`]: a typed, strided view of a device buffer, and the op-building API the models are written in.
//!
//! Views (reshape of contiguous data, permute, transpose, narrow, broadcast) never copy. Every other method
//! allocates a new contiguous output and queues exactly one op (or a few, for `cat`) on the tensor's backend.

use crate::backend::Storage;
use crate::{Backend, BinaryOp, BufferId, DType, Error, Layout, Op, Result, TensorDesc, UnaryOp, MAX_RANK};
use std::sync::Arc;

#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    layout: Layout,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({}{:?} on {})", self.dtype, self.layout.shape, self.storage.backend.name())
    }
}

/// Parameters of [`Tensor::attention`].
#[derive(Clone, Copy, Debug)]
pub struct AttentionParams<'a> {
    pub scale: f32,
    pub causal: bool,
    /// Additive bias broadcastable to `[B, H, Nq, Nk]`.
    pub bias: Option<&'a Tensor>,
    /// Per-head RMS norm weights `[Dh]` for q and k, with their epsilon.
    pub qk_norm: Option<(&'a Tensor, &'a Tensor, f32)>,
}

impl<'a> AttentionParams<'a> {
    pub fn new(scale: f32) -> Self {
        AttentionParams { scale, causal: false, bias: None, qk_norm: None }
    }
}

fn shape_err<T>(op: &str, msg: String) -> Result<T> {
    Err(Error::shape(op, msg))
}

/// The shape both operands broadcast to (numpy rules).
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

impl Tensor {
    pub(crate) fn from_parts(backend: Backend, buffer: BufferId, bytes: usize, layout: Layout, dtype: DType) -> Tensor {
        Tensor { storage: Arc::new(Storage { backend, buffer, bytes }), layout, dtype }
    }

    fn view(&self, layout: Layout) -> Tensor {
        Tensor { storage: self.storage.clone(), layout, dtype: self.dtype }
    }

    pub fn backend(&self) -> &Backend {
        &self.storage.backend
    }
    pub fn buffer(&self) -> BufferId {
        self.storage.buffer
    }
    /// Size in bytes of the underlying buffer (shared by all views of it).
    pub fn buffer_bytes(&self) -> usize {
        self.storage.bytes
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn shape(&self) -> &[usize] {
        &self.layout.shape
    }
    pub fn dim(&self, d: usize) -> usize {
        self.layout.shape[d]
    }
    pub fn rank(&self) -> usize {
        self.layout.rank()
    }
    pub fn elem_count(&self) -> usize {
        self.layout.elem_count()
    }
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }
    pub fn desc(&self) -> TensorDesc {
        TensorDesc { buffer: self.storage.buffer, dtype: self.dtype, layout: self.layout.clone() }
    }

    fn new_like(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.backend().empty(shape, dtype)
    }

    // ---------------------------------------------------------------- host transfer

    /// Contiguous little-endian bytes of this tensor (synchronises).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let t = self.contiguous()?;
        let es = t.dtype.size_in_bytes();
        let mut out = vec![0u8; t.elem_count() * es];
        if !out.is_empty() {
            t.backend().device().download(t.buffer(), t.layout.offset * es, &mut out)?;
        }
        Ok(out)
    }

    /// This tensor on another backend (or another device of the same one), copied through host memory as
    /// contiguous bytes (synchronises). Used to move small tensors between devices, e.g. latents under
    /// CFG-parallel denoising.
    pub fn to_backend(&self, backend: &Backend) -> Result<Tensor> {
        backend.from_bytes(&self.to_bytes()?, self.shape(), self.dtype)
    }

    /// All elements as f32 in row-major order (synchronises).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(self.dtype.bytes_to_f32(&self.to_bytes()?))
    }

    /// Overwrite this tensor's elements from host bytes. The tensor must be contiguous.
    pub fn write_bytes(&self, bytes: &[u8]) -> Result<()> {
        if !self.is_contiguous() || bytes.len() != self.elem_count() * self.dtype.size_in_bytes() {
            return Err(Error::InvalidArgument(
                "write_bytes needs a contiguous tensor and a matching byte count".into(),
            ));
        }
        self.backend().device().upload(self.buffer(), self.layout.offset * self.dtype.size_in_bytes(), bytes)
    }

    // ---------------------------------------------------------------- views

    /// Same data, new shape. Copies only when the tensor is not contiguous.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return shape_err("reshape", format!("cannot reshape {:?} to {shape:?}", self.shape()));
        }
        if shape.len() > MAX_RANK {
            return shape_err("reshape", format!("rank {} exceeds {MAX_RANK}", shape.len()));
        }
        let t = self.contiguous()?;
        let mut layout = Layout::contiguous(shape);
        layout.offset = t.layout.offset;
        Ok(t.view(layout))
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; self.rank()];
        if dims.len() != self.rank() || dims.iter().any(|&d| d >= self.rank() || std::mem::replace(&mut seen[d], true))
        {
            return shape_err("permute", format!("{dims:?} is not a permutation of the dims of {:?}", self.shape()));
        }
        let l = &self.layout;
        Ok(self.view(Layout {
            shape: dims.iter().map(|&d| l.shape[d]).collect(),
            strides: dims.iter().map(|&d| l.strides[d]).collect(),
            offset: l.offset,
        }))
    }

    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        let mut dims: Vec<usize> = (0..self.rank()).collect();
        if a >= dims.len() || b >= dims.len() {
            return shape_err("transpose", format!("dims {a},{b} out of range for {:?}", self.shape()));
        }
        dims.swap(a, b);
        self.permute(&dims)
    }

    /// Elements `start..start+len` of dimension `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if dim >= self.rank() || start + len > self.layout.shape[dim] {
            return shape_err("narrow", format!("{start}..{} of dim {dim} of {:?}", start + len, self.shape()));
        }
        let mut l = self.layout.clone();
        l.offset += start * l.strides[dim];
        l.shape[dim] = len;
        Ok(self.view(l))
    }

    /// `n` equal views along `dim`.
    pub fn chunk(&self, n: usize, dim: usize) -> Result<Vec<Tensor>> {
        let size = self.shape().get(dim).copied().unwrap_or(0);
        if n == 0 || size % n != 0 {
            return shape_err("chunk", format!("dim {dim} of {:?} does not split into {n} equal parts", self.shape()));
        }
        (0..n).map(|i| self.narrow(dim, i * size / n, size / n)).collect()
    }

    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        if dim > self.rank() {
            return shape_err("unsqueeze", format!("dim {dim} for {:?}", self.shape()));
        }
        let mut l = self.layout.clone();
        let stride = if dim < l.rank() { l.strides[dim] * l.shape[dim] } else { 1 };
        l.shape.insert(dim, 1);
        l.strides.insert(dim, stride);
        Ok(self.view(l))
    }

    pub fn squeeze(&self, dim: usize) -> Result<Tensor> {
        if self.shape().get(dim) != Some(&1) {
            return shape_err("squeeze", format!("dim {dim} of {:?} is not 1", self.shape()));
        }
        let mut l = self.layout.clone();
        l.shape.remove(dim);
        l.strides.remove(dim);
        Ok(self.view(l))
    }

    /// View broadcast to `shape` (numpy rules), with stride 0 in broadcast dims.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        let r = shape.len();
        if self.rank() > r {
            return shape_err("broadcast", format!("{:?} to {shape:?}", self.shape()));
        }
        let pad = r - self.rank();
        let mut strides = vec![0; r];
        for i in 0..r {
            if i >= pad {
                let (d, s) = (self.layout.shape[i - pad], self.layout.strides[i - pad]);
                if d == shape[i] {
                    strides[i] = s;
                } else if d != 1 {
                    return shape_err("broadcast", format!("{:?} to {shape:?}", self.shape()));
                }
            }
        }
        Ok(self.view(Layout { shape: shape.to_vec(), strides, offset: self.layout.offset }))
    }

    // ---------------------------------------------------------------- copies

    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        self.copy_as(self.dtype)
    }

    fn copy_as(&self, dtype: DType) -> Result<Tensor> {
        let out = self.new_like(self.shape(), dtype)?;
        self.backend().run(Op::Copy, &[self], &[&out])?;
        Ok(out)
    }

    /// Cast to `dtype` (a no-op view when it already is).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        self.copy_as(dtype)
    }

    /// Copy `src` (broadcast to this view's shape) into this view, converting dtype.
    pub fn copy_from(&self, src: &Tensor) -> Result<()> {
        let src = src.broadcast_to(self.shape())?;
        self.backend().run(Op::Copy, &[&src], &[self])
    }

    /// Concatenate along `dim`. All operands must share dtype and the other dims.
    pub fn cat(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        let first = tensors.first().ok_or_else(|| Error::InvalidArgument("cat of no tensors".into()))?;
        let mut shape = first.shape().to_vec();
        if dim >= shape.len() {
            return shape_err("cat", format!("dim {dim} for {shape:?}"));
        }
        shape[dim] = 0;
        for t in tensors {
            let ok = t.rank() == first.rank()
                && t.dtype == first.dtype
                && (0..t.rank()).all(|d| d == dim || t.shape()[d] == first.shape()[d]);
            if !ok {
                return shape_err("cat", format!("{t:?} does not match {first:?} outside dim {dim}"));
            }
            shape[dim] += t.shape()[dim];
        }
        let out = first.new_like(&shape, first.dtype)?;
        let mut at = 0;
        for t in tensors {
            out.narrow(dim, at, t.shape()[dim])?.copy_from(t)?;
            at += t.shape()[dim];
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- elementwise

    pub fn unary(&self, f: UnaryOp) -> Result<Tensor> {
        let out = self.new_like(self.shape(), self.dtype)?;
        self.backend().run(Op::Unary(f), &[self], &[&out])?;
        Ok(out)
    }
    pub fn silu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Silu)
    }
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        self.unary(UnaryOp::GeluTanh)
    }
    pub fn gelu_erf(&self) -> Result<Tensor> {
        self.unary(UnaryOp::GeluErf)
    }
    pub fn quick_gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::QuickGelu)
    }
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Relu)
    }

    pub fn binary(&self, f: BinaryOp, rhs: &Tensor) -> Result<Tensor> {
        let shape = broadcast_shape(self.shape(), rhs.shape()).ok_or_else(|| {
            Error::shape(f.name(), format!("{:?} and {:?} do not broadcast", self.shape(), rhs.shape()))
        })?;
        let a = self.broadcast_to(&shape)?;
        let b = rhs.broadcast_to(&shape)?;
        let out = self.new_like(&shape, self.dtype)?;
        self.backend().run(Op::Binary(f), &[&a, &b], &[&out])?;
        Ok(out)
    }
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Add, rhs)
    }
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Sub, rhs)
    }
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Mul, rhs)
    }
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Div, rhs)
    }

    /// `self·mul + add`.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> {
        let out = self.new_like(self.shape(), self.dtype)?;
        self.backend().run(Op::Affine { mul, add }, &[self], &[&out])?;
        Ok(out)
    }
    pub fn scale(&self, s: f32) -> Result<Tensor> {
        self.affine(s, 0.0)
    }

    // ---------------------------------------------------------------- matrix products

    /// Batched matrix product `[.., M, K] × [.., K, N]`; batch dims broadcast. Output dtype is `self`'s.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.matmul_bias(rhs, None)
    }

    fn matmul_bias(&self, rhs: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        if self.rank() < 2 || rhs.rank() < 2 {
            return shape_err("matmul", format!("{:?} x {:?}: both need rank >= 2", self.shape(), rhs.shape()));
        }
        let (m, k) = (self.dim(self.rank() - 2), self.dim(self.rank() - 1));
        let (k2, n) = (rhs.dim(rhs.rank() - 2), rhs.dim(rhs.rank() - 1));
        if k != k2 {
            return shape_err("matmul", format!("{:?} x {:?}: inner dims {k} != {k2}", self.shape(), rhs.shape()));
        }
        let batch = broadcast_shape(&self.shape()[..self.rank() - 2], &rhs.shape()[..rhs.rank() - 2])
            .ok_or_else(|| Error::shape("matmul", format!("batch dims of {:?} x {:?}", self.shape(), rhs.shape())))?;
        let mut a_shape = batch.clone();
        a_shape.extend([m, k]);
        let mut b_shape = batch.clone();
        b_shape.extend([k, n]);
        let mut y_shape = batch;
        y_shape.extend([m, n]);
        let a = self.broadcast_to(&a_shape)?;
        let b = rhs.broadcast_to(&b_shape)?;
        let out = self.new_like(&y_shape, self.dtype)?;
        run_matmul(&a, &b, bias, None, &out)?;
        Ok(out)
    }

    /// `self [.., K] · weightᵀ + bias` with `weight [N, K]` (PyTorch's `nn.Linear` layout).
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.linear_act(weight, bias, None)
    }

    /// [`Tensor::linear`] followed by the activation `act`, fused into the matmul (`Op::Matmul { act }`); a device
    /// that declines the fused form runs the matmul and the unary op (core legalisation).
    pub fn linear_act(&self, weight: &Tensor, bias: Option<&Tensor>, act: Option<UnaryOp>) -> Result<Tensor> {
        if weight.rank() != 2 || self.rank() == 0 {
            return shape_err("linear", format!("input {:?} with weight {:?}", self.shape(), weight.shape()));
        }
        let mut shape = self.shape()[..self.rank() - 1].to_vec();
        shape.push(weight.dim(0));
        let out = self.new_like(&shape, self.dtype)?;
        self.linear_into(weight, bias, act, &out)?;
        Ok(out)
    }

    /// [`Tensor::linear_act`] written into `out` (`[.., N]`, any strides: e.g. rows of a bigger buffer) instead of
    /// a new tensor. Neither `self` nor `out` is copied: when the leading dims of both merge into one (as views),
    /// this is one `[rows, K] × [K, N]` matmul; otherwise one such matmul per index of the first dim (e.g. per
    /// batch element when `out` is rows `0..N` of a `[B, N+S, N]` buffer): plain 2-D products with a row stride,
    /// which every backend's fast path takes, rather than a batched product with a broadcast weight.
    pub fn linear_into(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        act: Option<UnaryOp>,
        out: &Tensor,
    ) -> Result<()> {
        let r = self.rank();
        if weight.rank() != 2 || r == 0 || weight.dim(1) != self.dim(r - 1) {
            return shape_err("linear", format!("input {:?} with weight {:?}", self.shape(), weight.shape()));
        }
        let mut y_shape = self.shape()[..r - 1].to_vec();
        y_shape.push(weight.dim(0));
        if out.shape() != y_shape.as_slice() {
            return shape_err(
                "linear",
                format!("output {:?} for input {:?} with weight {:?}", out.shape(), self.shape(), weight.shape()),
            );
        }
        let wt = weight.transpose(0, 1)?;
        let x = if r == 1 { self.unsqueeze(0)? } else { self.clone() };
        let y = if r == 1 { out.unsqueeze(0)? } else { out.clone() };
        match (x.merged_rows(), y.merged_rows()) {
            (Some(x2), Some(y2)) => run_matmul(&x2, &wt, bias, act, &y2),
            _ => (0..x.dim(0)).try_for_each(|i| {
                let part = |t: &Tensor| t.narrow(0, i, 1).and_then(|t| t.squeeze(0));
                part(&x)?.linear_into(weight, bias, act, &part(&y)?)
            }),
        }
    }

    /// `[.., M, K]` as the view `[rows, K]` when its leading dims merge (each stride is the next one's extent).
    fn merged_rows(&self) -> Option<Tensor> {
        let r = self.rank();
        let l = &self.layout;
        let lead: Vec<(usize, usize)> =
            (0..r - 1).map(|i| (l.shape[i], l.strides[i])).filter(|&(d, _)| d != 1).collect();
        let rows: usize = l.shape[..r - 1].iter().product();
        let row_stride = lead.last().map_or(l.shape[r - 1] * l.strides[r - 1].max(1), |&(_, s)| s);
        if !lead.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0) {
            return None;
        }
        Some(self.view(Layout {
            shape: vec![rows, l.shape[r - 1]],
            strides: vec![row_stride, l.strides[r - 1]],
            offset: l.offset,
        }))
    }

    // ---------------------------------------------------------------- normalisation

    pub fn softmax(&self) -> Result<Tensor> {
        let out = self.new_like(self.shape(), self.dtype)?;
        self.backend().run(Op::Softmax, &[self], &[&out])?;
        Ok(out)
    }

    /// Layer norm over the last dim, with optional affine weight and bias (both or neither).
    pub fn layer_norm(&self, weight: Option<&Tensor>, bias: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        let out = self.new_like(self.shape(), self.dtype)?;
        match (weight, bias) {
            (Some(w), Some(b)) => self.backend().run(Op::LayerNorm { eps, affine: true }, &[self, w, b], &[&out])?,
            (None, None) => self.backend().run(Op::LayerNorm { eps, affine: false }, &[self], &[&out])?,
            _ => return Err(Error::InvalidArgument("layer_norm needs both weight and bias, or neither".into())),
        }
        Ok(out)
    }

    pub fn rms_norm(&self, weight: &Tensor, eps: f32) -> Result<Tensor> {
        let out = self.new_like(self.shape(), self.dtype)?;
        self.rms_norm_into(weight, eps, &out)?;
        Ok(out)
    }

    /// [`Tensor::rms_norm`] written into `out` (same shape, any strides) instead of a new tensor.
    pub fn rms_norm_into(&self, weight: &Tensor, eps: f32, out: &Tensor) -> Result<()> {
        if out.shape() != self.shape() {
            return shape_err("rms_norm", format!("output {:?} for input {:?}", out.shape(), self.shape()));
        }
        self.backend().run(Op::RmsNorm { eps }, &[self, weight], &[out])
    }

    /// adaLN: `LN(self)·(1 + scale) + shift`, scale and shift broadcast to `self`.
    pub fn layer_norm_modulate(&self, scale: &Tensor, shift: &Tensor, eps: f32) -> Result<Tensor> {
        let (s, h) = (scale.broadcast_to(self.shape())?, shift.broadcast_to(self.shape())?);
        let out = self.new_like(self.shape(), self.dtype)?;
        self.backend().run(Op::LayerNormModulate { eps }, &[self, &s, &h], &[&out])?;
        Ok(out)
    }

    /// `self·(1 + scale) + shift`, scale and shift broadcast to `self`.
    pub fn modulate(&self, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
        let (s, h) = (scale.broadcast_to(self.shape())?, shift.broadcast_to(self.shape())?);
        let out = self.new_like(self.shape(), self.dtype)?;
        self.backend().run(Op::Modulate, &[self, &s, &h], &[&out])?;
        Ok(out)
    }

    /// `self + gate·r`, gate broadcast to `self`.
    pub fn gated_residual(&self, gate: &Tensor, r: &Tensor) -> Result<Tensor> {
        let g = gate.broadcast_to(self.shape())?;
        let r = r.broadcast_to(self.shape())?;
        let out = self.new_like(self.shape(), self.dtype)?;
        self.backend().run(Op::GatedResidual, &[self, &g, &r], &[&out])?;
        Ok(out)
    }

    /// `x + gate·(self·Wᵀ (+ b))`: the MM-DiT's gated residual after a projection, as one op where the device takes
    /// it (`Op::MatmulGatedResidual`; the projection's output is never written), else as [`Tensor::linear`] and
    /// [`Tensor::gated_residual`] (so a device without the fusion runs exactly what it ran before). `self [B, N, K]`
    /// (any strides), `weight [D, K]`, `x [B, N, D]`, `gate` broadcast to `[B, N, D]` (typically `[B, 1, D]`). The
    /// result has `x`'s dtype.
    pub fn linear_gated_residual(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        x: &Tensor,
        gate: &Tensor,
    ) -> Result<Tensor> {
        match self.prepare_linear_gated_residual(weight, bias, x, gate)? {
            Some(fused) => fused.run(),
            None => x.gated_residual(gate, &self.linear(weight, bias)?),
        }
    }

    /// [`Tensor::linear_gated_residual`]'s fused call, checked against the device and ready to run, or `None` where
    /// the device declines it: for callers that order the unfused parts of several streams themselves.
    pub fn prepare_linear_gated_residual(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        x: &Tensor,
        gate: &Tensor,
    ) -> Result<Option<PreparedCall>> {
        let what = || format!("input {:?}, weight {:?}, x {:?}", self.shape(), weight.shape(), x.shape());
        if self.rank() != 3 || weight.rank() != 2 || weight.dim(1) != self.dim(2) {
            return shape_err("linear_gated_residual", what());
        }
        let (b, n, d) = (self.dim(0), self.dim(1), weight.dim(0));
        if x.shape() != [b, n, d] || bias.is_some_and(|t| t.shape() != [d]) {
            return shape_err("linear_gated_residual", what());
        }
        let wt = matrix_friendly(&weight.transpose(0, 1)?)?.unsqueeze(0)?.broadcast_to(&[b, self.dim(2), d])?;
        let mut inputs = vec![matrix_friendly(self)?, wt];
        inputs.extend(bias.cloned());
        inputs.extend([x.clone(), gate.broadcast_to(x.shape())?]);
        let call = PreparedCall {
            op: Op::MatmulGatedResidual { bias: bias.is_some() },
            inputs,
            output: x.new_like(x.shape(), x.dtype)?,
        };
        Ok(call.supported().then_some(call))
    }

    pub fn group_norm(
        &self,
        groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f32,
    ) -> Result<Tensor> {
        if self.rank() < 2 || groups == 0 || !self.dim(1).is_multiple_of(groups) {
            return shape_err("group_norm", format!("{groups} groups for {:?}", self.shape()));
        }
        let out = self.new_like(self.shape(), self.dtype)?;
        match (weight, bias) {
            (Some(w), Some(b)) => {
                self.backend().run(Op::GroupNorm { groups, eps, affine: true }, &[self, w, b], &[&out])?
            }
            (None, None) => self.backend().run(Op::GroupNorm { groups, eps, affine: false }, &[self], &[&out])?,
            _ => return Err(Error::InvalidArgument("group_norm needs both weight and bias, or neither".into())),
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- attention, conv, misc

    /// Fused multi-head attention over `q [B,H,Nq,Dh]`, `k [B,H,Nk,Dh]`, `v [B,H,Nk,Dv]` (any strides);
    /// returns `[B,H,Nq,Dv]`.
    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttentionParams) -> Result<Tensor> {
        if q.rank() != 4 || v.rank() != 4 {
            return shape_err("attention", format!("q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape()));
        }
        let (b, h, nq) = (q.dim(0), q.dim(1), q.dim(2));
        let out = q.new_like(&[b, h, nq, v.dim(3)], q.dtype)?;
        Tensor::attention_into(q, k, v, p, &out)?;
        Ok(out)
    }

    /// [`Tensor::attention`] written into `out` (`[B,H,Nq,Dv]`, any strides: e.g. a `[B,Nq,H,Dv]` buffer viewed
    /// heads-first, so merging the heads afterwards is a free view).
    pub fn attention_into(q: &Tensor, k: &Tensor, v: &Tensor, p: &AttentionParams, out: &Tensor) -> Result<()> {
        let ok = q.rank() == 4
            && k.rank() == 4
            && v.rank() == 4
            && k.shape()[..2] == q.shape()[..2]
            && v.shape()[..3] == k.shape()[..3]
            && q.dim(3) == k.dim(3);
        if !ok {
            return shape_err("attention", format!("q {:?}, k {:?}, v {:?}", q.shape(), k.shape(), v.shape()));
        }
        let (b, h, nq, nk) = (q.dim(0), q.dim(1), q.dim(2), k.dim(2));
        if out.shape() != [b, h, nq, v.dim(3)] {
            return shape_err(
                "attention",
                format!("output {:?} for q {:?}, v {:?}", out.shape(), q.shape(), v.shape()),
            );
        }
        let bias = match p.bias {
            Some(t) => Some(t.broadcast_to(&[b, h, nq, nk])?),
            None => None,
        };
        let mut inputs: Vec<&Tensor> = vec![q, k, v];
        if let Some(bias) = &bias {
            inputs.push(bias);
        }
        if let Some((qn, kn, _)) = p.qk_norm {
            inputs.push(qn);
            inputs.push(kn);
        }
        let op = Op::Attention {
            scale: p.scale,
            causal: p.causal,
            bias: bias.is_some(),
            qk_norm: p.qk_norm.is_some(),
            norm_eps: p.qk_norm.map(|x| x.2).unwrap_or(0.0),
        };
        q.backend().run(op, &inputs, &[out])
    }

    /// The fused backward of plain self-attention ([`Op::AttentionBackward`]), where the device takes it: `q, k,
    /// v, o, d_o` are `[B,H,N,D]` (any strides; `o` the forward's output, `d_o` the loss's gradient with respect to
    /// it) and `out` receives `[3,B,H,N,D]` = (dq, dk, dv), any strides. `Ok(false)`, with nothing run, where the
    /// device does not take these operands itself: callers then build the gradients from products (a host fallback
    /// would copy whole tensors).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward_into(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        scale: f32,
        causal: bool,
        out: &Tensor,
    ) -> Result<bool> {
        let s = q.shape();
        if s.len() != 4 || [k, v, o, d_o].iter().any(|t| t.shape() != s) || out.shape() != [&[3][..], s].concat() {
            return shape_err(
                "attention_backward",
                format!(
                    "q {:?}, k {:?}, v {:?}, o {:?}, do {:?} -> out {:?}: one [B,H,N,D] shape and [3,B,H,N,D] expected",
                    s,
                    k.shape(),
                    v.shape(),
                    o.shape(),
                    d_o.shape(),
                    out.shape()
                ),
            );
        }
        let (op, inputs) = (Op::AttentionBackward { scale, causal }, [q, k, v, o, d_o]);
        if !q.backend().supports(op, &inputs, &[out]) {
            return Ok(false);
        }
        q.backend().run(op, &inputs, &[out])?;
        Ok(true)
    }

    /// 2-D convolution, `self [N,C,H,W]`, `weight [O,C,KH,KW]`.
    pub fn conv2d(&self, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
        if self.rank() != 4 || weight.rank() != 4 || weight.dim(1) != self.dim(1) || stride == 0 {
            return shape_err("conv2d", format!("input {:?} with weight {:?}", self.shape(), weight.shape()));
        }
        let (n, h, w) = (self.dim(0), self.dim(2), self.dim(3));
        let (o, kh, kw) = (weight.dim(0), weight.dim(2), weight.dim(3));
        if h + 2 * padding < kh || w + 2 * padding < kw {
            return shape_err("conv2d", format!("kernel {kh}x{kw} larger than padded input {:?}", self.shape()));
        }
        let oh = (h + 2 * padding - kh) / stride + 1;
        let ow = (w + 2 * padding - kw) / stride + 1;
        let out = self.new_like(&[n, o, oh, ow], self.dtype)?;
        let op = Op::Conv2d { stride: [stride; 2], padding: [padding; 2], bias: bias.is_some() };
        match bias {
            Some(b) => self.backend().run(op, &[self, weight, b], &[&out])?,
            None => self.backend().run(op, &[self, weight], &[&out])?,
        }
        Ok(out)
    }

    pub fn upsample_nearest2d(&self, factor: usize) -> Result<Tensor> {
        if self.rank() != 4 || factor == 0 {
            return shape_err("upsample_nearest2d", format!("{:?} by {factor}", self.shape()));
        }
        let s = self.shape();
        let out = self.new_like(&[s[0], s[1], s[2] * factor, s[3] * factor], self.dtype)?;
        self.backend().run(Op::UpsampleNearest2d { factor }, &[self], &[&out])?;
        Ok(out)
    }

    /// Rows of `table [V, D]` at `ids [N]` (i32 or i64): `[N, D]`.
    pub fn gather(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        if table.rank() != 2 || ids.rank() != 1 || !matches!(ids.dtype, DType::I32 | DType::I64) {
            return shape_err("gather", format!("table {table:?} with ids {ids:?}"));
        }
        let out = table.new_like(&[ids.dim(0), table.dim(1)], table.dtype)?;
        table.backend().run(Op::Gather, &[table, ids], &[&out])?;
        Ok(out)
    }
}

/// Queue `out = act(a·b (+ bias))` for operands already broadcast to `out`'s batch dims.
/// One op on tensors, built by a `prepare_*` method once the device said it takes it; [`PreparedCall::run`] queues it
/// and returns the output.
pub struct PreparedCall {
    op: Op,
    inputs: Vec<Tensor>,
    output: Tensor,
}

impl PreparedCall {
    fn supported(&self) -> bool {
        self.output.backend().supports(self.op, &self.inputs.iter().collect::<Vec<_>>(), &[&self.output])
    }

    pub fn run(self) -> Result<Tensor> {
        self.output.backend().run(self.op, &self.inputs.iter().collect::<Vec<_>>(), &[&self.output])?;
        Ok(self.output)
    }
}

fn run_matmul(a: &Tensor, b: &Tensor, bias: Option<&Tensor>, act: Option<UnaryOp>, out: &Tensor) -> Result<()> {
    let n = out.dim(out.rank() - 1);
    let (a, b) = (matrix_friendly(a)?, matrix_friendly(b)?);
    match bias {
        Some(bias) => {
            if bias.shape() != [n] {
                return shape_err("linear", format!("bias {:?} for {n} outputs", bias.shape()));
            }
            out.backend().run(Op::Matmul { bias: true, act }, &[&a, &b, bias], &[out])
        }
        None => out.backend().run(Op::Matmul { bias: false, act }, &[&a, &b], &[out]),
    }
}

/// Make sure each matrix has unit stride in one of its last two dims, copying otherwise.
fn matrix_friendly(t: &Tensor) -> Result<Tensor> {
    let r = t.rank();
    let (s0, s1) = (t.layout.strides[r - 2], t.layout.strides[r - 1]);
    let (d0, d1) = (t.layout.shape[r - 2], t.layout.shape[r - 1]);
    if s1 == 1 || s0 == 1 || d0 == 1 || d1 == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}
