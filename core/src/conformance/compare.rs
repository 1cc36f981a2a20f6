//! How a device's output is judged against the reference: tolerances, NaN/Inf rules, NMSE, sentinel bytes.
//! `docs/conformance.md` explains the numbers.

use crate::{DType, Layout, Op};

/// Machine epsilon (distance from 1 to the next value) of a dtype; 0 for integers.
pub fn epsilon(d: DType) -> f64 {
    match d {
        DType::F32 => f32::EPSILON as f64,           // 2^-23
        DType::F16 => half::f16::EPSILON.to_f64(),   // 2^-10
        DType::BF16 => half::bf16::EPSILON.to_f64(), // 2^-7
        _ => 0.0,
    }
}

/// The NMSE limit of an op whose least precise float operand is `d`: `max(base, c·ε(d)²)`.
///
/// `base` is ggml test-backend-ops' limit for the op (1e-7 by default, 1e-6 softmax, 5e-4 matmul, conv and
/// attention); it governs f32. `c·ε²` is the half-precision allowance: an NMSE of `c·ε²` is an RMS relative
/// error of `√c·ε`, i.e. `√c` units of the dtype's epsilon per element. Pure data movement (copy, fill,
/// upsample, gather) gets no allowance: it must round to nearest like the reference.
pub fn nmse_limit(op: &Op, d: DType) -> f64 {
    let (base, c) = match op {
        Op::Copy | Op::Fill { .. } | Op::UpsampleNearest2d { .. } | Op::Gather => (1e-7, 0.0),
        Op::Unary(_) | Op::Binary(_) | Op::Affine { .. } | Op::Modulate | Op::GatedResidual => (1e-7, 4.0),
        Op::Softmax => (1e-6, 4.0),
        Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::LayerNormModulate { .. } | Op::GroupNorm { .. } => (1e-7, 4.0),
        Op::Matmul { .. } | Op::MatmulGatedResidual { .. } | Op::Conv2d { .. } | Op::Attention { .. } => (5e-4, 16.0),
        // Two roundings to the operands' dtype where the forward has one: the probabilities, and dS before its
        // products with k and q.
        Op::AttentionBackward { .. } => (5e-4, 32.0),
    };
    let e = epsilon(d);
    f64::max(base, c * e * e)
}

/// Why a value comparison failed.
#[derive(Clone, Debug, PartialEq)]
pub enum ValueError {
    /// The device produced NaN at this logical (row-major) element.
    NaN { element: usize },
    /// An infinity in one result that the other does not have (with the same sign) at this element.
    InfMismatch { element: usize, expected: f64, found: f64 },
    /// The reference itself produced NaN: a bug in the suite's case, not in the device.
    ReferenceNaN { element: usize },
}

/// `Σ(a−b)² / Σa²` over the finite elements, with `a` the reference. `0` when both are all zero;
/// `∞` when only the reference is.
pub fn nmse(reference: &[f64], actual: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (&a, &b) in reference.iter().zip(actual) {
        if a.is_infinite() && a == b {
            continue;
        }
        num += (a - b) * (a - b);
        den += a * a;
    }
    if num == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// NaN and Inf rules; returns the NMSE when they hold.
pub fn check_values(reference: &[f64], actual: &[f64]) -> Result<f64, ValueError> {
    for (element, (&a, &b)) in reference.iter().zip(actual).enumerate() {
        if a.is_nan() {
            return Err(ValueError::ReferenceNaN { element });
        }
        if b.is_nan() {
            return Err(ValueError::NaN { element });
        }
        if (a.is_infinite() || b.is_infinite()) && a != b {
            return Err(ValueError::InfMismatch { element, expected: a, found: b });
        }
    }
    Ok(nmse(reference, actual))
}

/// Which bytes of a buffer belong to a view (`true`) and which are sentinel (`false`).
pub fn view_mask(layout: &Layout, elem_size: usize, buffer_bytes: usize) -> Vec<bool> {
    let mut mask = vec![false; buffer_bytes];
    layout.for_each_index(|i| mask[i * elem_size..(i + 1) * elem_size].iter_mut().for_each(|m| *m = true));
    mask
}

/// Bytes outside the view that differ between `before` and `after`: `(count, first byte offset)`.
pub fn sentinel_damage(before: &[u8], after: &[u8], mask: &[bool]) -> Option<(usize, usize)> {
    let mut damage: Option<(usize, usize)> = None;
    for (i, ((x, y), in_view)) in before.iter().zip(after).zip(mask).enumerate() {
        if !in_view && x != y {
            let d = damage.get_or_insert((0, i));
            d.0 += 1;
        }
    }
    damage
}

/// The logical row-major values of a view, from the raw bytes of its buffer.
pub fn view_values(bytes: &[u8], dtype: DType, layout: &Layout) -> Vec<f64> {
    let es = dtype.size_in_bytes();
    let mut out = Vec::with_capacity(layout.elem_count());
    layout.for_each_index(|i| out.push(dtype.bytes_to_f32(&bytes[i * es..(i + 1) * es])[0] as f64));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nmse_of_identical_is_zero_and_of_zero_output_is_one() {
        assert_eq!(nmse(&[1.0, -2.0], &[1.0, -2.0]), 0.0);
        assert_eq!(nmse(&[1.0, -2.0], &[0.0, 0.0]), 1.0);
        assert_eq!(nmse(&[0.0], &[1.0]), f64::INFINITY);
    }

    #[test]
    fn nan_and_inf_rules() {
        assert_eq!(check_values(&[1.0], &[f64::NAN]), Err(ValueError::NaN { element: 0 }));
        let inf = f64::INFINITY;
        assert_eq!(check_values(&[inf, 1.0], &[inf, 1.0]), Ok(0.0));
        assert!(matches!(check_values(&[inf], &[-inf]), Err(ValueError::InfMismatch { .. })));
        assert!(matches!(check_values(&[1.0], &[inf]), Err(ValueError::InfMismatch { .. })));
    }

    #[test]
    fn half_limits_follow_epsilon() {
        let mm = Op::Matmul { bias: false, act: None };
        assert_eq!(nmse_limit(&mm, DType::F32), 5e-4);
        assert_eq!(nmse_limit(&mm, DType::BF16), 16.0 * 2f64.powi(-14));
        assert_eq!(nmse_limit(&Op::Softmax, DType::F16), 1e-6f64.max(4.0 * 2f64.powi(-20)));
        assert_eq!(nmse_limit(&Op::Copy, DType::BF16), 1e-7);
    }
}
