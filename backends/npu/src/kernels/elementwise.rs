//! Elementwise kernels (copy, fill, unary, binary, the two scale paths, modulate, gated residual) and the
//! index-moving ones (nearest upsample, gather). All walk the output row by row; inputs have the output's shape
//! (the core resolved broadcasting into stride-0 dims) and are read through their own strides.

use super::Operand;
use crate::par::par_for;
use sd3_core::{BinaryOp, Error, Result, UnaryOp};

/// Rows per thread chunk so that each chunk holds at least ~16k elements.
fn grain(row_len: usize) -> usize {
    (16384 / row_len.max(1)).max(1)
}

/// `out[i] = f(ins[0][i], .., ins[N-1][i])` for every element.
pub fn map<const N: usize>(ins: [&Operand; N], out: &Operand, f: impl Fn([f32; N]) -> f32 + Sync) {
    let d = out.row_len();
    let os = out.row_stride();
    let is: [usize; N] = std::array::from_fn(|k| ins[k].row_stride());
    par_for(out.rows(), grain(d), |range| {
        for r in range {
            let ob = out.row_base(r);
            let ib: [usize; N] = std::array::from_fn(|k| ins[k].row_base(r));
            for j in 0..d {
                // SAFETY: indices of views the device bounds-checked; rows are split between threads.
                unsafe {
                    let v = f(std::array::from_fn(|k| ins[k].load(ib[k] + j * is[k])));
                    out.store(ob + j * os, v);
                }
            }
        }
    });
}

/// Copy with dtype conversion; bit-exact when the dtypes agree.
pub fn copy(x: &Operand, out: &Operand) {
    let d = out.row_len();
    let (xs, os) = (x.row_stride(), out.row_stride());
    let same = x.mem.dtype == out.mem.dtype;
    par_for(out.rows(), grain(d), |range| {
        for r in range {
            let (xb, ob) = (x.row_base(r), out.row_base(r));
            for j in 0..d {
                // SAFETY: as in `map`.
                unsafe {
                    if same {
                        out.mem.copy_elem_from(ob + j * os, &x.mem, xb + j * xs);
                    } else {
                        out.mem.store_f64(ob + j * os, x.mem.load_f64(xb + j * xs));
                    }
                }
            }
        }
    });
}

pub fn fill(out: &Operand, value: f32) {
    let d = out.row_len();
    let os = out.row_stride();
    par_for(out.rows(), grain(d), |range| {
        for r in range {
            let ob = out.row_base(r);
            for j in 0..d {
                // SAFETY: as in `map`.
                unsafe { out.mem.store_f64(ob + j * os, value as f64) };
            }
        }
    });
}

/// erf in f32 (Abramowitz–Stegun 7.1.26, |error| < 1.5e-7).
pub fn erf(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * (-x * x).exp()).copysign(x)
}

pub fn unary_f32(f: UnaryOp, x: f32) -> f32 {
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    match f {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::Square => x * x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Silu => x * sigmoid(x),
        UnaryOp::GeluErf => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        UnaryOp::GeluTanh => {
            let c = (2.0 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        UnaryOp::QuickGelu => x * sigmoid(1.702 * x),
        UnaryOp::Sin => x.sin(),
        UnaryOp::Cos => x.cos(),
    }
}

pub fn binary_f32(f: BinaryOp, a: f32, b: f32) -> f32 {
    match f {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
    }
}

/// The legacy scale path (`FLAGS_npu_scale_aclnn` off): one fused op, as aclop `Power(power=1, scale, shift)`,
/// computing `x·mul + add` with a single rounding (fused multiply-add) in f32.
pub fn affine_fused(x: &Operand, out: &Operand, mul: f32, add: f32) {
    map([x], out, |[x]| x.mul_add(mul, add));
}

/// First step of the aclnn scale path (`aclnnMuls`): `tmp = x·mul` in f32.
pub fn muls(x: &Operand, tmp: &Operand, mul: f32) {
    map([x], tmp, |[x]| x * mul);
}

/// Second step of the aclnn scale path (`aclnnAdds`): `out = tmp + add` in f32.
pub fn adds(tmp: &Operand, out: &Operand, add: f32) {
    map([tmp], out, |[t]| t + add);
}

/// `out [N,C,H·f,W·f] = x [N,C,H,W]` repeated `f×f`.
pub fn upsample_nearest2d(x: &Operand, out: &Operand, factor: usize) {
    let (c, oh, ow) = (out.shape()[1], out.shape()[2], out.shape()[3]);
    let xs = x.layout.strides.clone();
    let os = out.row_stride();
    par_for(out.rows(), grain(ow), |range| {
        for r in range {
            let (nc, oy) = (r / oh, r % oh);
            let (n, ch) = (nc / c, nc % c);
            let xb = x.layout.offset + n * xs[0] + ch * xs[1] + (oy / factor) * xs[2];
            let ob = out.row_base(r);
            for ox in 0..ow {
                // SAFETY: as in `map`.
                unsafe { out.store(ob + ox * os, x.load(xb + (ox / factor) * xs[3])) };
            }
        }
    });
}

/// `out [N, D] = table [V, D][ids [N]]`. Every id is checked to be in `0..V` before anything is written.
pub fn gather(table: &Operand, ids: &Operand, out: &Operand) -> Result<()> {
    let v = table.shape()[0];
    let n = ids.shape()[0];
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: i < N, a bounds-checked index of `ids`.
        let id = unsafe { ids.mem.load_f64(ids.at(&[i])) };
        if !(id >= 0.0 && (id as usize) < v) {
            return Err(Error::InvalidArgument(format!("gather: id {id} at position {i} outside 0..{v}")));
        }
        rows.push(id as usize);
    }
    let d = out.row_len();
    let (ts, os) = (table.row_stride(), out.row_stride());
    par_for(n, grain(d), |range| {
        for i in range {
            let (tb, ob) = (table.row_base(rows[i]), out.row_base(i));
            for j in 0..d {
                // SAFETY: ids were checked; rows are split between threads.
                unsafe { out.store(ob + j * os, table.load(tb + j * ts)) };
            }
        }
    });
    Ok(())
}
