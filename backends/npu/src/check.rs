//! Operand checks done before any kernel runs: the core's [`sd3_core::reference::validate`] plus the exact shape
//! relations every kernel relies on for its index arithmetic. A call that fails them is declined by `supports`
//! (and is an error from `execute`), so kernels never index outside a view.

use sd3_core::{DType, Error, Op, OpCall, Result, TensorDesc, MAX_RANK};

pub fn check(call: &OpCall) -> Result<()> {
    sd3_core::reference::validate(call)?;
    let name = call.op.name();
    let bad = |msg: String| -> Result<()> { Err(Error::shape(name.clone(), msg)) };
    let ins = call.inputs;
    let y = &call.outputs[0];
    for t in ins.iter().chain(call.outputs) {
        if t.rank() > MAX_RANK || t.layout.strides.len() != t.rank() {
            return bad(format!("malformed layout {:?}", t.layout));
        }
    }
    // Several threads write an output: no two of its elements may share an address.
    if y.shape().iter().zip(y.strides()).any(|(&d, &s)| d > 1 && s == 0) {
        return bad(format!("output has a broadcast (stride 0) dimension: {:?}", y.layout));
    }
    let shape = |t: &TensorDesc| t.shape().to_vec();
    let vec_of = |t: &TensorDesc, n: usize, what: &str| -> Result<()> {
        if t.shape() != [n] {
            return Err(Error::shape(name.clone(), format!("{what} has shape {:?}, [{n}] expected", t.shape())));
        }
        Ok(())
    };
    match call.op {
        Op::Copy | Op::Fill { .. } | Op::Unary(_) | Op::Binary(_) | Op::Affine { .. } | Op::Softmax => {}
        Op::Modulate | Op::GatedResidual | Op::LayerNormModulate { .. } => {}
        Op::AttentionBackward { .. } => {
            let s = shape(&ins[0]);
            if s.len() != 4 || ins.iter().any(|t| shape(t) != s) || shape(y) != [&[3][..], &s].concat() {
                return bad(format!(
                    "q {s:?}, k, v, o, do one [B, H, N, D] shape and a [3, B, H, N, D] output expected"
                ));
            }
        }
        Op::Matmul { bias, .. } | Op::MatmulGatedResidual { bias } => {
            let r = y.rank();
            if r < 2 || ins[0].rank() != r || ins[1].rank() != r {
                return bad(format!("ranks a {} b {} y {} (equal, >= 2, expected)", ins[0].rank(), ins[1].rank(), r));
            }
            let (a, b, ys) = (shape(&ins[0]), shape(&ins[1]), shape(y));
            if a[..r - 2] != ys[..r - 2] || b[..r - 2] != ys[..r - 2] {
                return bad(format!("batch dims of a {a:?} / b {b:?} differ from y {ys:?}"));
            }
            if a[r - 2] != ys[r - 2] || b[r - 1] != ys[r - 1] || a[r - 1] != b[r - 2] {
                return bad(format!("a {a:?} · b {b:?} does not give y {ys:?}"));
            }
            if bias {
                vec_of(&ins[2], ys[r - 1], "bias")?;
            }
            if let Op::MatmulGatedResidual { .. } = call.op {
                for (t, what) in ins[2 + bias as usize..].iter().zip(["x", "gate"]) {
                    if t.shape() != ys {
                        return bad(format!("{what} {:?} differs from y {ys:?}", t.shape()));
                    }
                }
            }
        }
        Op::LayerNorm { affine, .. } => {
            if ins[0].shape() != y.shape() {
                return bad(format!("x {:?} and y {:?} differ", ins[0].shape(), y.shape()));
            }
            let d = y.shape().last().copied().unwrap_or(1);
            if affine {
                vec_of(&ins[1], d, "weight")?;
                vec_of(&ins[2], d, "bias")?;
            }
        }
        Op::RmsNorm { .. } => {
            if ins[0].shape() != y.shape() {
                return bad(format!("x {:?} and y {:?} differ", ins[0].shape(), y.shape()));
            }
            vec_of(&ins[1], y.shape().last().copied().unwrap_or(1), "weight")?;
        }
        Op::Attention { bias, qk_norm, .. } => {
            if ins.iter().take(3).chain([y]).any(|t| t.rank() != 4) {
                return bad("q, k, v and o must be [B, H, N, D]".into());
            }
            let (q, k, v, o) = (shape(&ins[0]), shape(&ins[1]), shape(&ins[2]), shape(y));
            if k[..2] != q[..2] || v[..2] != q[..2] || k[3] != q[3] || v[2] != k[2] || o != [q[0], q[1], q[2], v[3]] {
                return bad(format!("q {q:?} k {k:?} v {v:?} o {o:?} are inconsistent"));
            }
            if bias && ins[3].shape() != [q[0], q[1], q[2], k[2]] {
                return bad(format!("bias {:?}, [{}, {}, {}, {}] expected", ins[3].shape(), q[0], q[1], q[2], k[2]));
            }
            if qk_norm {
                let i = 3 + bias as usize;
                vec_of(&ins[i], q[3], "q_norm")?;
                vec_of(&ins[i + 1], q[3], "k_norm")?;
            }
        }
        Op::Conv2d { stride, padding, bias } => {
            if ins[0].rank() != 4 || ins[1].rank() != 4 || y.rank() != 4 {
                return bad("x, w and y must be rank 4".into());
            }
            let (x, w, ys) = (shape(&ins[0]), shape(&ins[1]), shape(y));
            if stride.contains(&0) {
                return bad("stride 0".into());
            }
            let out = |i: usize, k: usize, p: usize, s: usize| (i + 2 * p).checked_sub(k).map(|v| v / s + 1);
            let (oh, ow) = (out(x[2], w[2], padding[0], stride[0]), out(x[3], w[3], padding[1], stride[1]));
            if w[1] != x[1] || ys[0] != x[0] || ys[1] != w[0] || Some(ys[2]) != oh || Some(ys[3]) != ow {
                return bad(format!("x {x:?} w {w:?} stride {stride:?} padding {padding:?} do not give y {ys:?}"));
            }
            if bias {
                vec_of(&ins[2], w[0], "bias")?;
            }
        }
        Op::GroupNorm { groups, affine, .. } => {
            let x = shape(&ins[0]);
            if x.len() < 2 || x != shape(y) || groups == 0 || x[1] % groups != 0 {
                return bad(format!("x {x:?} y {:?} groups {groups}", y.shape()));
            }
            if affine {
                vec_of(&ins[1], x[1], "weight")?;
                vec_of(&ins[2], x[1], "bias")?;
            }
        }
        Op::UpsampleNearest2d { factor } => {
            let (x, ys) = (shape(&ins[0]), shape(y));
            if x.len() != 4 || factor == 0 || ys != [x[0], x[1], x[2] * factor, x[3] * factor] {
                return bad(format!("x {x:?} ×{factor} does not give y {ys:?}"));
            }
        }
        Op::Gather => {
            let (t, ids, ys) = (shape(&ins[0]), shape(&ins[1]), shape(y));
            if t.len() != 2 || ids.len() != 1 || ys != [ids[0], t[1]] {
                return bad(format!("table {t:?} ids {ids:?} y {ys:?} (table [V, D], ids [N], y [N, D])"));
            }
        }
    }
    Ok(())
}

/// The dtypes this device stores (all) and computes float ops in (f32, f16, bf16; integers for copy/fill/ids).
pub fn dtypes() -> Vec<DType> {
    DType::ALL.to_vec()
}
