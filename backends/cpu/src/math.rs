//! Vectorisable f32 math (exp, erf) and the runtime dispatch that compiles hot loops for AVX2+FMA.
//!
//! The crate is built for the baseline x86-64 target; `simd_fn!` compiles a loop again with AVX2+FMA and
//! with AVX-512 enabled and picks the best copy the CPU runs, so the autovectoriser can use 8- or 16-wide
//! registers. gemm does its own dispatch (up to AVX-512).

/// Define `pub fn NAME(args)` whose body is compiled for the baseline and for AVX2+FMA, chosen at run time.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if $crate::math::has_avx512() {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// Whether the AVX-512 copies of `simd_fn!` loops can run here.
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
}

/// `e^x` in f32, branch-free so loops over it vectorise. Relative error below 2e-7 (a few ulp); exactly 0 for
/// `x < -87.3` (including -inf, which attention's masks rely on), +inf above 88.7, NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split (Cody–Waite) so that n·LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to an integer without needing SSE4.1's round instruction.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Taylor series to degree 7 on |r| <= ln2/2: truncation error below 6e-9 relative.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n from the bits of t, whose low mantissa bits hold n: integer ops only, because a float-to-int `as`
    // (saturating) does not vectorise well. Two factors, so n = 128 (x near 88.7) does not overflow.
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let (na, nb) = (ni >> 1, ni - (ni >> 1));
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = p * pow2(na) * pow2(nb);
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `erfc(x)` via the Chebyshev fit in Numerical Recipes (`erfcc`: fractional error below 1.2e-7 everywhere,
/// including the far tail where `1 - erf` would cancel).
#[inline(always)]
pub fn erfc(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_2 + t * 0.170_872_78))))))));
    let r = t * exp(poly);
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

simd_fn! {
    /// `x[i] = e^(x[i] - sub)`, returning the sum of the results (f32 lanes, summed in f64 at the end).
    pub fn exp_sub_sum(x: &mut [f32], sub: f32, sum: &mut f64) {
        let mut lanes = [0f32; 16];
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            let c: &mut [f32; 16] = c.try_into().unwrap();
            for l in 0..16 {
                c[l] = exp(c[l] - sub);
                lanes[l] += c[l];
            }
        }
        let mut s: f64 = 0.0;
        for v in chunks.into_remainder() {
            *v = exp(*v - sub);
            s += *v as f64;
        }
        *sum = s + lanes.iter().map(|&l| l as f64).sum::<f64>();
    }
}

simd_fn! {
    /// The largest element (-inf for an empty slice; NaN-propagation is not needed here).
    pub fn max_of(x: &[f32], out: &mut f32) {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            let c: &[f32; 16] = c.try_into().unwrap();
            for l in 0..16 {
                lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
            }
        }
        let mut m = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        for &v in chunks.remainder() {
            m = if v > m { v } else { m };
        }
        *out = m;
    }
}

simd_fn! {
    /// `x[i] *= s`.
    pub fn scale_in_place(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

/// `mean` split into two f32s whose sum is (almost) the f64 value, so `(x - hi) - lo` is the exact deviation
/// even when the mean is large next to the spread.
pub fn split(mean: f64) -> (f32, f32) {
    let hi = mean as f32;
    (hi, (mean - hi as f64) as f32)
}

/// `(Σd, Σd²)` with `d = (x - hi) - lo`: f32 lanes within blocks of 256 elements, blocks summed in f64 (a
/// single running f64 sum is a serial dependency chain, and the compiler does not vectorise these reductions).
fn block_sums(x: &[f32], hi: f32, lo: f32) -> (f64, f64) {
    let mut blocks = x.chunks_exact(256);
    let (mut s, mut q) = (0f64, 0f64);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        for blk in &mut blocks {
            // SAFETY: AVX-512F is present; `blk` holds 256 floats.
            let (bs, bq) = unsafe { block256_avx512(blk, hi, lo) };
            s += bs;
            q += bq;
        }
    }
    for blk in &mut blocks {
        let (mut ls, mut lq) = ([0f32; 16], [0f32; 16]);
        for c in blk.chunks_exact(16) {
            for l in 0..16 {
                let d = (c[l] - hi) - lo;
                ls[l] += d;
                lq[l] += d * d;
            }
        }
        s += ls.iter().map(|&v| v as f64).sum::<f64>();
        q += lq.iter().map(|&v| v as f64).sum::<f64>();
    }
    for &v in blocks.remainder() {
        let d = ((v - hi) - lo) as f64;
        s += d;
        q += d * d;
    }
    (s, q)
}

/// One 256-element block of `block_sums`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block256_avx512(blk: &[f32], hi: f32, lo: f32) -> (f64, f64) {
    use std::arch::x86_64::*;
    let (vh, vl) = (_mm512_set1_ps(hi), _mm512_set1_ps(lo));
    let (mut s, mut q) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for c in blk.chunks_exact(16) {
        // SAFETY: 16 floats.
        let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
        let d = _mm512_sub_ps(_mm512_sub_ps(v, vh), vl);
        s = _mm512_add_ps(s, d);
        q = _mm512_fmadd_ps(d, d, q);
    }
    (_mm512_reduce_add_ps(s) as f64, _mm512_reduce_add_ps(q) as f64)
}

/// `(Σx, Σx²)`, accumulated as `block_sums` does.
pub fn sum_and_sq(x: &[f32]) -> (f64, f64) {
    block_sums(x, 0.0, 0.0)
}

/// Mean and biased variance of `x`, two-pass in f64 (the second pass around the mean, like the reference).
pub fn mean_var(x: &[f32]) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    // First pass around x[0], so that f32 partial sums stay small when the mean is large next to the spread.
    let pivot = x.first().copied().unwrap_or(0.0);
    let first = block_sums(x, pivot, 0.0);
    let mean = pivot as f64 + first.0 / n;
    let (hi, lo) = split(mean);
    let second = block_sums(x, hi, lo);
    (mean, second.1 / n)
}
