//! Backward formulas of the ops the MM-DiT's forward uses, written on the core's forward ops (matmul, softmax,
//! layer norm, elementwise), so every backend that runs inference runs the backward too. Each takes the forward's
//! inputs (recomputed, see `models::mmdit::train`) and the output's gradient, and returns the input's gradient.
//! Reductions over the last dim are products with a ones vector (the op set has no reduction op).
//!
//! Precision: the elementwise parts (norms, the GELU derivative, the softmax's backward) subtract nearly equal
//! terms, so they run in f32 whatever the model's dtype and round once into it at the end, as PyTorch's fused
//! backward kernels do; the matmuls run in the model's dtype with f32 accumulation.

use sd3_core::{DType, Result, Tensor, UnaryOp};

/// `t` in f32 (itself when it already is).
fn f32(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        Ok(t.clone())
    } else {
        t.to_dtype(DType::F32)
    }
}

/// `Σ_j x[.., j]` as `[.., 1]`.
pub fn row_sum(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(x.rank() - 1);
    x.matmul(&x.backend().full(&[d, 1], x.dtype(), 1.0)?)
}

/// `mean_j x[.., j]` as `[.., 1]`.
pub fn row_mean(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(x.rank() - 1);
    row_sum(x)?.scale(1.0 / d as f32)
}

/// The gradient of `y = x·Wᵀ` with respect to `W` (`[out, in]`), summed over every leading dim:
/// `dyᵀ·x` with `dy [.., out]`, `x [.., in]`.
pub fn weight_grad(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (out, inp) = (dy.dim(dy.rank() - 1), x.dim(x.rank() - 1));
    let rows = dy.elem_count() / out.max(1);
    let dy = dy.contiguous()?.reshape(&[rows, out])?;
    let x = x.contiguous()?.reshape(&[rows, inp])?;
    dy.transpose(0, 1)?.matmul(&x)
}

/// Layer norm without affine over the last dim, `x̂ = (x - μ)/σ`: `dx = (g - mean(g) - x̂·mean(g·x̂)) / σ` for
/// `g = dL/dx̂`.
pub fn layer_norm_backward(x: &Tensor, g: &Tensor, eps: f32) -> Result<Tensor> {
    let dtype = x.dtype();
    let (x, g) = (&f32(x)?, &f32(g)?);
    let centred = x.sub(&row_mean(x)?)?;
    let rstd = row_mean(&centred.unary(UnaryOp::Square)?)?.affine(1.0, eps)?.unary(UnaryOp::Rsqrt)?;
    let x_hat = centred.mul(&rstd)?;
    let inner = g.sub(&row_mean(g)?)?.sub(&x_hat.mul(&row_mean(&g.mul(&x_hat)?)?)?)?;
    inner.mul(&rstd)?.to_dtype(dtype)
}

/// `y = LN(x)·(1 + scale) + shift` with scale and shift constant: the gradient of `x`.
pub fn layer_norm_modulate_backward(x: &Tensor, scale: &Tensor, dy: &Tensor, eps: f32) -> Result<Tensor> {
    layer_norm_backward(x, &f32(dy)?.mul(&f32(scale)?.affine(1.0, 1.0)?)?, eps)
}

/// `y = x·r·w`, `r = 1/√(mean(x²) + eps)` over the last dim, `w` constant: `dx = r·(w·dy) - x·r³·mean(x·w·dy)`.
pub fn rms_norm_backward(x: &Tensor, weight: &Tensor, dy: &Tensor, eps: f32) -> Result<Tensor> {
    let dtype = x.dtype();
    let (x, weight, dy) = (&f32(x)?, &f32(weight)?, &f32(dy)?);
    let r = row_mean(&x.unary(UnaryOp::Square)?)?.affine(1.0, eps)?.unary(UnaryOp::Rsqrt)?;
    let gw = dy.mul(weight)?;
    let r3 = r.mul(&r)?.mul(&r)?;
    gw.mul(&r)?.sub(&x.mul(&r3.mul(&row_mean(&x.mul(&gw)?)?)?)?)?.to_dtype(dtype)
}

/// The derivative of GELU's tanh approximation at `x`: with `u = c·(x + 0.044715·x³)`, `t = tanh(u)`,
/// `0.5·(1 + t) + 0.5·x·(1 - t²)·c·(1 + 3·0.044715·x²)`, `c = √(2/π)`.
pub fn gelu_tanh_derivative(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = &f32(x)?;
    const C: f32 = 0.797_884_6; // √(2/π)
    const A: f32 = 0.044715;
    let x2 = x.unary(UnaryOp::Square)?;
    let t = x.mul(&x2.affine(A, 1.0)?)?.scale(C)?.unary(UnaryOp::Tanh)?;
    let sech2 = t.unary(UnaryOp::Square)?.affine(-1.0, 1.0)?;
    let inner = x.mul(&sech2)?.mul(&x2.affine(3.0 * A * C, C)?)?;
    t.affine(0.5, 0.5)?.add(&inner.scale(0.5)?)?.to_dtype(dtype)
}

/// The derivative of an activation at `x` (computed in f32, rounded into `x`'s dtype).
pub fn activation_derivative(act: crate::models::layers::Activation, x: &Tensor) -> Result<Tensor> {
    use crate::models::layers::Activation;
    let dtype = x.dtype();
    let x = &f32(x)?;
    let d = match act {
        Activation::GeluTanh => return gelu_tanh_derivative(x)?.to_dtype(dtype),
        // x·σ(a·x): σ(a·x)·(1 + a·x·(1 − σ(a·x))).
        Activation::QuickGelu | Activation::Silu => {
            let a = if act == Activation::QuickGelu { 1.702 } else { 1.0 };
            let s = x.scale(a)?.unary(UnaryOp::Sigmoid)?;
            s.mul(&x.scale(a)?.mul(&s.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?
        }
        // Φ(x) + x·φ(x). The op set has no erf, so Φ(x) = gelu(x)/x, blended near 0 (where the division fails)
        // with its expansion 0.5 + x/√(2π): the blend's error is below 1e-12 everywhere.
        Activation::GeluErf => {
            const EPS2: f32 = 1e-12;
            const INV_SQRT_2PI: f32 = 0.398_942_3;
            let x2 = x.unary(UnaryOp::Square)?;
            let w = x2.affine(1.0, EPS2)?.unary(UnaryOp::Recip)?; // 1/(x² + ε²)
            let far = x.gelu_erf()?.mul(x)?.mul(&w)?; // Φ(x)·x²/(x² + ε²)
            let near = x.affine(INV_SQRT_2PI, 0.5)?.mul(&w)?.scale(EPS2)?; // (0.5 + x/√(2π))·ε²/(x² + ε²)
            let phi = x2.scale(-0.5)?.unary(UnaryOp::Exp)?.scale(INV_SQRT_2PI)?;
            far.add(&near)?.add(&x.mul(&phi)?)?
        }
        // The step function as relu(x)/(|x| + 1e-30): exactly 1 above 1e-23, 0 at and below 0.
        Activation::Relu => x.unary(UnaryOp::Relu)?.div(&x.unary(UnaryOp::Abs)?.affine(1.0, 1e-30)?)?,
    };
    d.to_dtype(dtype)
}

/// `o = softmax(scale·q·kᵀ (+ causal mask))·v` (`q [.., Nq, Dh]`, `k [.., Nk, Dh]`, `v [.., Nk, Dv]`, `o` the
/// forward's output): `(dq, dk, dv)` for `do`. The probabilities are recomputed (one `[.., Nq, Nk]` matrix at a
/// time); the softmax's backward uses `rowsum(dP ⊙ P) = rowsum(do ⊙ o)`. `causal` masks key `j > i` for query `i`.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    scale: f32,
    causal: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let r = q.rank();
    let dtype = q.dtype();
    // The probabilities and the softmax's backward in f32; the products in the operands' dtype.
    let mut s = f32(&q.matmul(&k.transpose(r - 2, r - 1)?)?)?.scale(scale)?;
    if causal {
        let (nq, nk) = (q.dim(r - 2), k.dim(r - 2));
        let mask: Vec<f32> = (0..nq * nk).map(|ij| if ij % nk > ij / nk { -1e30 } else { 0.0 }).collect();
        s = s.add(&q.backend().from_f32(&mask, &[nq, nk], DType::F32)?)?;
    }
    let p = s.softmax()?;
    let dv = p.to_dtype(dtype)?.transpose(r - 2, r - 1)?.matmul(d_o)?;
    let dp = f32(&d_o.matmul(&v.transpose(r - 2, r - 1)?)?)?;
    let ds = p.mul(&dp.sub(&row_sum(&f32(d_o)?.mul(&f32(o)?)?)?)?)?.to_dtype(dtype)?;
    drop((p, dp));
    let dq = ds.matmul(k)?.scale(scale)?;
    let dk = ds.transpose(r - 2, r - 1)?.matmul(q)?.scale(scale)?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    //! Each formula against central finite differences of the forward op, on the CPU backend in f32.
    use super::*;
    use sd3_core::{AttentionParams, Backend, DType};

    fn cpu() -> Backend {
        Backend::new("cpu", sd3_backend_cpu::cpu_device())
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::noise::standard_normal(seed, n)
    }

    /// `Σ f(x)·w` for a fixed weighting `w`, so that `dL/df = w`.
    fn weighted(y: &Tensor, w: &[f32]) -> f64 {
        y.to_f32_vec().unwrap().iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    /// Checks `analytic` (the gradient of `Σ f(x)·w` at x) against finite differences at a few elements.
    fn check(
        b: &Backend,
        shape: &[usize],
        f: &dyn Fn(&Tensor) -> Tensor,
        analytic: &dyn Fn(&Tensor, &Tensor) -> Tensor,
    ) {
        let n: usize = shape.iter().product();
        let x0 = values(n, 1);
        let x = b.from_f32(&x0, shape, DType::F32).unwrap();
        let y = f(&x);
        let w = values(y.elem_count(), 2);
        let dy = b.from_f32(&w, y.shape(), DType::F32).unwrap();
        let grad = analytic(&x, &dy).to_f32_vec().unwrap();
        let h = 1e-2f32;
        for i in (0..n).step_by(n / 7 + 1) {
            let mut xp = x0.clone();
            xp[i] += h;
            let mut xm = x0.clone();
            xm[i] -= h;
            let yp = weighted(&f(&b.from_f32(&xp, shape, DType::F32).unwrap()), &w);
            let ym = weighted(&f(&b.from_f32(&xm, shape, DType::F32).unwrap()), &w);
            let numeric = (yp - ym) / (2.0 * h as f64);
            let err = (numeric - grad[i] as f64).abs();
            assert!(err < 2e-3 * (1.0 + numeric.abs()), "element {i}: numeric {numeric}, analytic {}", grad[i]);
        }
    }

    #[test]
    fn layer_norm_modulate() {
        let b = cpu();
        let scale = b.from_f32(&values(16, 3), &[2, 1, 8], DType::F32).unwrap();
        let shift = b.from_f32(&values(16, 4), &[2, 1, 8], DType::F32).unwrap();
        check(&b, &[2, 3, 8], &|x| x.layer_norm_modulate(&scale, &shift, 1e-6).unwrap(), &|x, dy| {
            layer_norm_modulate_backward(x, &scale, dy, 1e-6).unwrap()
        });
    }

    #[test]
    fn rms_norm() {
        let b = cpu();
        let w = b.from_f32(&values(6, 5), &[6], DType::F32).unwrap();
        check(&b, &[3, 2, 6], &|x| x.rms_norm(&w, 1e-6).unwrap(), &|x, dy| rms_norm_backward(x, &w, dy, 1e-6).unwrap());
    }

    #[test]
    fn gelu_tanh() {
        check(&cpu(), &[4, 9], &|x| x.gelu_tanh().unwrap(), &|x, dy| {
            dy.mul(&gelu_tanh_derivative(x).unwrap()).unwrap()
        });
    }

    #[test]
    fn attention_each_input() {
        let b = cpu();
        let shape = [1, 2, 5, 4];
        let t = |seed| b.from_f32(&values(40, seed), &shape, DType::F32).unwrap();
        let (q, k, v) = (t(6), t(7), t(8));
        let scale = 0.5;
        let attend =
            |q: &Tensor, k: &Tensor, v: &Tensor| Tensor::attention(q, k, v, &AttentionParams::new(scale)).unwrap();
        let grads = |q: &Tensor, k: &Tensor, v: &Tensor, dy: &Tensor| {
            attention_backward(q, k, v, &attend(q, k, v), dy, scale, false).unwrap()
        };
        check(&b, &shape, &|x| attend(x, &k, &v), &|x, dy| grads(x, &k, &v, dy).0);
        check(&b, &shape, &|x| attend(&q, x, &v), &|x, dy| grads(&q, x, &v, dy).1);
        check(&b, &shape, &|x| attend(&q, &k, x), &|x, dy| grads(&q, &k, x, dy).2);
    }

    #[test]
    fn causal_attention() {
        let b = cpu();
        let shape = [1, 2, 5, 4];
        let t = |seed| b.from_f32(&values(40, seed), &shape, DType::F32).unwrap();
        let (k, v) = (t(7), t(8));
        let params = AttentionParams { causal: true, ..AttentionParams::new(0.5) };
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor| Tensor::attention(q, k, v, &params).unwrap();
        check(&b, &shape, &|x| attend(x, &k, &v), &|x, dy| {
            attention_backward(x, &k, &v, &attend(x, &k, &v), dy, 0.5, true).unwrap().0
        });
        let q = t(6);
        check(&b, &shape, &|x| attend(&q, x, &v), &|x, dy| {
            attention_backward(&q, x, &v, &attend(&q, x, &v), dy, 0.5, true).unwrap().1
        });
    }

    /// The fused op's reference semantics (`Op::AttentionBackward`, which devices' kernels are checked against in
    /// conformance) agree with the products above, which are checked against finite differences.
    #[test]
    fn fused_attention_backward_reference() {
        let b = cpu();
        let reference = Backend::new("reference", std::sync::Arc::new(sd3_core::reference::ReferenceDevice::new()));
        for causal in [false, true] {
            let shape = [2, 3, 6, 4];
            let t = |seed| b.from_f32(&values(144, seed), &shape, DType::F32).unwrap();
            let (q, k, v, d_o) = (t(1), t(2), t(3), t(4));
            let params = AttentionParams { causal, ..AttentionParams::new(0.5) };
            let o = Tensor::attention(&q, &k, &v, &params).unwrap();
            let (dq, dk, dv) = attention_backward(&q, &k, &v, &o, &d_o, 0.5, causal).unwrap();
            let on_ref = |x: &Tensor| reference.from_f32(&x.to_f32_vec().unwrap(), x.shape(), DType::F32).unwrap();
            let out = reference.zeros(&[3, 2, 3, 6, 4], DType::F32).unwrap();
            let [rq, rk, rv, ro, rd] = [&q, &k, &v, &o, &d_o].map(on_ref);
            assert!(Tensor::attention_backward_into(&rq, &rk, &rv, &ro, &rd, 0.5, causal, &out).unwrap());
            let fused = out.to_f32_vec().unwrap();
            for (i, part) in [dq, dk, dv].iter().enumerate() {
                let part = part.to_f32_vec().unwrap();
                for (j, (a, e)) in fused[i * 144..(i + 1) * 144].iter().zip(&part).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "causal {causal}, part {i}, element {j}: {a} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn activations() {
        use crate::models::layers::Activation;
        for act in [Activation::QuickGelu, Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
            check(&cpu(), &[4, 9], &|x| act.forward(x).unwrap(), &|x, dy| {
                dy.mul(&activation_derivative(act, x).unwrap()).unwrap()
            });
        }
        // GELU's Φ(x) at and around 0, where gelu(x)/x is 0/0.
        let b = cpu();
        let x = b.from_f32(&[0.0, 1e-8, -1e-8, 1e-3], &[4], DType::F32).unwrap();
        let d = activation_derivative(Activation::GeluErf, &x).unwrap().to_f32_vec().unwrap();
        for (got, want) in d.iter().zip([0.5, 0.5, 0.5, 0.5 + 2e-3 * 0.398_942_3]) {
            assert!((got - want).abs() < 1e-6, "{got} against {want}");
        }
    }

    #[test]
    fn weight_gradient_sums_over_rows() {
        let b = cpu();
        let x = b.from_f32(&values(2 * 3 * 4, 9), &[2, 3, 4], DType::F32).unwrap();
        check(&b, &[5, 4], &|w| x.linear(w, None).unwrap(), &|_, dy| weight_grad(dy, &x).unwrap());
    }
}
