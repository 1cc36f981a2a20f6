//! The flow-matching objective of `train_dreambooth_lora_sd3.py`: which noise level each sample gets, and the
//! loss with its gradient.

use sd3_core::{Backend, DType, Tensor};

/// `weighting_scheme`: how training noise levels are drawn (diffusers' `compute_density_for_timestep_sampling`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TimestepSampling {
    /// `u = sigmoid(N(mean, std))` (the script's default, mean 0, std 1).
    LogitNormal { mean: f32, std: f32 },
    /// `u = U(0, 1)` (`none`).
    Uniform,
    /// `u = 1 - u' - scale·(cos²(π·u'/2) - 1 + u')` (`mode`, scale 1.29).
    Mode { scale: f32 },
}

impl TimestepSampling {
    /// `u` in [0, 1) from a standard normal `z` and a uniform `r` (each scheme uses one of them).
    pub fn density_sample(self, z: f32, r: f32) -> f32 {
        let u = match self {
            TimestepSampling::LogitNormal { mean, std } => 1.0 / (1.0 + (-(mean + std * z)).exp()),
            TimestepSampling::Uniform => r,
            TimestepSampling::Mode { scale } => {
                let c = (std::f32::consts::FRAC_PI_2 * r).cos();
                1.0 - r - scale * (c * c - 1.0 + r)
            }
        };
        u.clamp(0.0, 1.0 - f32::EPSILON)
    }
}

/// The σ of the training scheduler's timestep `indices = ⌊u·N⌋` (`FlowMatchEulerDiscreteScheduler` with
/// `num_train_timesteps` N and `shift`): its timesteps are `N, N-1, …, 1` shifted, `σ = t/N`.
pub fn training_sigma(u: f32, num_train_timesteps: usize, shift: f32) -> f32 {
    let n = num_train_timesteps as f64;
    let index = ((u as f64 * n) as usize).min(num_train_timesteps - 1);
    let s = (n - index as f64) / n;
    let shift = shift as f64;
    (shift * s / (1.0 + (shift - 1.0) * s)) as f32
}

/// `noisy = (1 - σ)·x0 + σ·noise` per sample, on the host (`[B, …]` row-major, one σ per sample).
pub fn noisy_latents(x0: &[f32], noise: &[f32], sigmas: &[f32]) -> Vec<f32> {
    let per = x0.len() / sigmas.len().max(1);
    x0.iter().zip(noise).enumerate().map(|(i, (x, n))| (1.0 - sigmas[i / per]) * x + sigmas[i / per] * n).collect()
}

/// The loss with `precondition_outputs` (the script's default): the prediction `v` becomes `v·(-σ) + noisy`, an
/// estimate of `x0`, and `loss = mean((v·(-σ) + noisy - x0)²)` (weighting 1, as for logit-normal sampling).
/// Returns the loss and its gradient with respect to `pred` (`[B, C, H, W]`, on `pred`'s backend, f32).
pub fn preconditioned_loss(
    pred: &Tensor,
    noisy: &[f32],
    x0: &[f32],
    sigmas: &[f32],
) -> sd3_core::Result<(f32, Tensor)> {
    prior_preserving_loss(pred, noisy, x0, sigmas, None)
}

/// [`preconditioned_loss`] with prior preservation (`--with_prior_preservation`): with `prior_weight` Some(w) the
/// batch's second half holds class images, and the loss is the first half's mean plus `w` times the second's.
pub fn prior_preserving_loss(
    pred: &Tensor,
    noisy: &[f32],
    x0: &[f32],
    sigmas: &[f32],
    prior_weight: Option<f32>,
) -> sd3_core::Result<(f32, Tensor)> {
    let v = pred.to_f32_vec()?;
    let per = v.len() / sigmas.len().max(1);
    // Each half's elements and weight: the instance half counts 1, the class half `w`.
    let halves = if prior_weight.is_some() { 2 } else { 1 };
    let n_half = (v.len() / halves) as f64;
    let (mut loss, mut grad) = (0.0f64, Vec::with_capacity(v.len()));
    for (i, ((v, n), x)) in v.iter().zip(noisy).zip(x0).enumerate() {
        let s = sigmas[i / per];
        let weight = match prior_weight {
            Some(w) if i as f64 >= n_half => w as f64,
            _ => 1.0,
        };
        let diff = (*v * -s + n - x) as f64;
        loss += weight * diff * diff / n_half;
        grad.push((weight * 2.0 * diff / n_half * -(s as f64)) as f32);
    }
    let backend: &Backend = pred.backend();
    Ok((loss as f32, backend.from_f32(&grad, pred.shape(), DType::F32)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prior-preserving loss is the instance half's loss plus the weighted class half's, gradient included.
    #[test]
    fn prior_preservation_adds_the_weighted_class_loss() {
        let be = Backend::new("cpu", sd3_backend_cpu::cpu_device());
        let v = crate::noise::standard_normal(1, 16);
        let (noisy, x0) = (crate::noise::standard_normal(2, 16), crate::noise::standard_normal(3, 16));
        let sigmas = [0.2, 0.5, 0.7, 0.9];
        let pred = be.from_f32(&v, &[4, 1, 2, 2], DType::F32).unwrap();
        let (both, grad) = prior_preserving_loss(&pred, &noisy, &x0, &sigmas, Some(0.5)).unwrap();
        let half = |r: std::ops::Range<usize>| {
            let p = be.from_f32(&v[r.clone()], &[2, 1, 2, 2], DType::F32).unwrap();
            let s = &sigmas[r.start / 4..r.end / 4];
            preconditioned_loss(&p, &noisy[r.clone()], &x0[r], s).unwrap()
        };
        let ((inst, g_inst), (class, g_class)) = (half(0..8), half(8..16));
        assert!((both - (inst + 0.5 * class)).abs() < 1e-6, "{both} against {inst} + 0.5·{class}");
        let grad = grad.to_f32_vec().unwrap();
        let expected: Vec<f32> = g_inst
            .to_f32_vec()
            .unwrap()
            .into_iter()
            .chain(g_class.to_f32_vec().unwrap().into_iter().map(|g| 0.5 * g))
            .collect();
        for (a, b) in grad.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-7, "{a} against {b}");
        }
    }
}
