//! Elementwise ops (unary, binary, affine, modulate, gated residual), copy/cast, fill, nearest upsampling and
//! gather. All go through [`map_chunks`]: parallel chunks of the logical order, f32 compute, any dtype/strides.

use crate::math::{self, simd_fn};
use crate::par_ranges;
use crate::strided::View;
use sd3_core::{BinaryOp, DType, Error, Result, UnaryOp};

/// Elements per parallel chunk: large enough to amortise scheduling, small enough to stay in L2.
pub const CHUNK: usize = 16 * 1024;

/// Run `f(inputs, output)` over parallel chunks of the logical order of `out` (inputs have its shape).
/// Contiguous f32 operands are used in place; anything else is converted through scratch buffers.
pub fn map_chunks(ins: &[View], out: &View, f: impl Fn(&[&[f32]], &mut [f32]) + Sync) {
    par_ranges(out.len(), CHUNK, |start, len| {
        let mut scratch: Vec<Vec<f32>> = vec![Vec::new(); ins.len()];
        let slices: Vec<&[f32]> = ins.iter().zip(scratch.iter_mut()).map(|(v, s)| v.read_f32(start, len, s)).collect();
        // SAFETY: this chunk of the output is written by this task only; outputs never alias inputs.
        match unsafe { out.f32_slice_mut(start, len) } {
            Some(o) => f(&slices, o),
            None => {
                let mut tmp = vec![0f32; len];
                f(&slices, &mut tmp);
                out.scatter(start, &tmp);
            }
        }
    });
}

/// `y[i] = f(x[i])`: a plain loop, which the vectoriser handles when `f` inlines to straight-line code.
/// (Blocking it by hand into 16-lane chunks made LLVM vectorise across blocks with gathers and scatters.)
#[inline(always)]
fn map_each(x: &[f32], y: &mut [f32], f: impl Fn(f32) -> f32) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = f(x);
    }
}

simd_fn! {
    fn unary_slice(op: UnaryOp, x: &[f32], y: &mut [f32]) {
        match op {
            UnaryOp::Neg => map_each(x, y, |x| -x),
            UnaryOp::Exp => map_each(x, y, math::exp),
            UnaryOp::Log => map_each(x, y, f32::ln),
            UnaryOp::Sqrt => map_each(x, y, f32::sqrt),
            UnaryOp::Rsqrt => map_each(x, y, |x| 1.0 / x.sqrt()),
            UnaryOp::Recip => map_each(x, y, |x| 1.0 / x),
            UnaryOp::Square => map_each(x, y, |x| x * x),
            UnaryOp::Abs => map_each(x, y, f32::abs),
            UnaryOp::Tanh => map_each(x, y, f32::tanh),
            UnaryOp::Sigmoid => map_each(x, y, math::sigmoid),
            UnaryOp::Relu => map_each(x, y, |x| if x > 0.0 { x } else { 0.0 }),
            UnaryOp::Silu => map_each(x, y, |x| x * math::sigmoid(x)),
            // 1 + erf(x/√2) = erfc(-x/√2), which keeps its precision for very negative x.
            UnaryOp::GeluErf => map_each(x, y, |x| 0.5 * x * math::erfc(-x * std::f32::consts::FRAC_1_SQRT_2)),
            // 0.5·(1 + tanh(u)) = σ(2u): the same function without tanh's cancellation near -1.
            UnaryOp::GeluTanh => map_each(x, y, |x| {
                const C: f32 = 0.797_884_6; // √(2/π)
                x * math::sigmoid(2.0 * C * (x + 0.044715 * x * x * x))
            }),
            UnaryOp::QuickGelu => map_each(x, y, |x| x * math::sigmoid(1.702 * x)),
            UnaryOp::Sin => map_each(x, y, f32::sin),
            UnaryOp::Cos => map_each(x, y, f32::cos),
        }
    }
}

simd_fn! {
    fn binary_slice(op: BinaryOp, a: &[f32], b: &[f32], y: &mut [f32]) {
        let it = y.iter_mut().zip(a.iter().zip(b));
        match op {
            BinaryOp::Add => it.for_each(|(y, (&a, &b))| *y = a + b),
            BinaryOp::Sub => it.for_each(|(y, (&a, &b))| *y = a - b),
            BinaryOp::Mul => it.for_each(|(y, (&a, &b))| *y = a * b),
            BinaryOp::Div => it.for_each(|(y, (&a, &b))| *y = a / b),
            BinaryOp::Max => it.for_each(|(y, (&a, &b))| *y = a.max(b)),
            BinaryOp::Min => it.for_each(|(y, (&a, &b))| *y = a.min(b)),
        }
    }
}

simd_fn! {
    /// `y = x·mul + add`.
    fn affine_slice(x: &[f32], mul: f32, add: f32, y: &mut [f32]) {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = x * mul + add);
    }
}

simd_fn! {
    /// `y = x·(1 + s) + h`.
    pub fn modulate_slice(x: &[f32], s: &[f32], h: &[f32], y: &mut [f32]) {
        y.iter_mut().zip(x.iter().zip(s.iter().zip(h))).for_each(|(y, (&x, (&s, &h)))| *y = x * (1.0 + s) + h);
    }
}

simd_fn! {
    /// `y = x + g·r`.
    fn gated_residual_slice(x: &[f32], g: &[f32], r: &[f32], y: &mut [f32]) {
        y.iter_mut().zip(x.iter().zip(g.iter().zip(r))).for_each(|(y, (&x, (&g, &r)))| *y = x + g * r);
    }
}

/// `y = f(y)` in place (the matmul activation epilogue), through a small stack buffer.
pub fn unary_in_place(op: UnaryOp, y: &mut [f32]) {
    let mut buf = [0f32; 256];
    for chunk in y.chunks_mut(buf.len()) {
        let x = &mut buf[..chunk.len()];
        x.copy_from_slice(chunk);
        unary_slice(op, x, chunk);
    }
}

pub fn unary(op: UnaryOp, x: &View, y: &View) {
    map_chunks(&[*x], y, |i, o| unary_slice(op, i[0], o));
}

pub fn binary(op: BinaryOp, a: &View, b: &View, y: &View) {
    map_chunks(&[*a, *b], y, |i, o| binary_slice(op, i[0], i[1], o));
}

pub fn affine(mul: f32, add: f32, x: &View, y: &View) {
    map_chunks(&[*x], y, |i, o| affine_slice(i[0], mul, add, o));
}

pub fn modulate(x: &View, scale: &View, shift: &View, y: &View) {
    map_chunks(&[*x, *scale, *shift], y, |i, o| modulate_slice(i[0], i[1], i[2], o));
}

pub fn gated_residual(x: &View, gate: &View, r: &View, y: &View) {
    map_chunks(&[*x, *gate, *r], y, |i, o| gated_residual_slice(i[0], i[1], i[2], o));
}

/// Copy with dtype conversion. Same dtype: bit-exact. Float sources convert through f32 (which holds every
/// float value exactly), integer sources through f64, so every cast rounds once, like the reference.
pub fn copy(x: &View, y: &View) {
    if x.dtype == y.dtype {
        return match x.dtype.size_in_bytes() {
            1 => copy_raw::<u8>(x, y),
            2 => copy_raw::<u16>(x, y),
            4 => copy_raw::<u32>(x, y),
            _ => copy_raw::<u64>(x, y),
        };
    }
    if matches!(x.dtype, DType::I32 | DType::I64) {
        par_ranges(y.len(), CHUNK, |start, len| {
            let mut tmp = vec![0f64; len];
            x.gather(start, &mut tmp);
            y.scatter(start, &tmp);
        });
    } else {
        map_chunks(&[*x], y, |i, o| o.copy_from_slice(i[0]));
    }
}

fn copy_raw<T: Copy + Default + Send + Sync>(x: &View, y: &View) {
    par_ranges(y.len(), CHUNK, |start, len| {
        let mut tmp = vec![T::default(); len];
        x.gather_raw(start, &mut tmp);
        y.scatter_raw(start, &tmp);
    });
}

/// Every element of `y` to `value` (rounded to y's dtype; integers truncate toward 0).
pub fn fill(value: f32, y: &View) {
    par_ranges(y.len(), CHUNK, |start, len| {
        // SAFETY: disjoint chunk of the output.
        match unsafe { y.f32_slice_mut(start, len) } {
            Some(o) => o.fill(value),
            None => y.scatter(start, &vec![value; len]),
        }
    });
}

/// `y [N,C,H·f,W·f]` from `x [N,C,H,W]`.
pub fn upsample_nearest2d(factor: usize, x: &View, y: &View, yshape: &[usize]) {
    let (oh, ow) = (yshape[2], yshape[3]);
    let (h, w) = (oh / factor, ow / factor);
    let planes = yshape[0] * yshape[1];
    par_ranges(planes, 1, |p0, np| {
        let mut src = vec![0f32; h * w];
        let mut dst = vec![0f32; oh * ow];
        for p in p0..p0 + np {
            x.gather(p * h * w, &mut src);
            for (yi, row) in dst.chunks_exact_mut(ow).enumerate() {
                let srow = &src[(yi / factor) * w..(yi / factor + 1) * w];
                for (xi, v) in row.iter_mut().enumerate() {
                    *v = srow[xi / factor];
                }
            }
            y.scatter(p * oh * ow, &dst);
        }
    });
}

/// Embedding lookup: `y[i, :] = table[ids[i], :]`. Any id outside `0..V` is an error (nothing is written).
pub fn gather_rows(table: &View, ids: &View, y: &View, vocab: usize, dim: usize) -> Result<()> {
    let mut idx = vec![0i64; ids.len()];
    match ids.dtype {
        DType::I32 => {
            let mut tmp = vec![0i32; ids.len()];
            ids.gather_raw(0, &mut tmp);
            idx.iter_mut().zip(&tmp).for_each(|(d, &s)| *d = s as i64);
        }
        _ => ids.gather_raw(0, &mut idx),
    }
    if let Some((pos, id)) = idx.iter().enumerate().find(|(_, &id)| id < 0 || id as u64 >= vocab as u64) {
        return Err(Error::InvalidArgument(format!(
            "gather: id {id} at position {pos} is outside the table's 0..{vocab} rows"
        )));
    }
    par_ranges(idx.len(), (CHUNK / dim.max(1)).max(1), |r0, nr| {
        let mut row = vec![0f64; dim];
        for (i, &id) in idx.iter().enumerate().skip(r0).take(nr) {
            // f64 so integer tables and every float dtype convert with a single rounding.
            table.gather(id as usize * dim, &mut row);
            y.scatter(i * dim, &row);
        }
    });
    Ok(())
}
