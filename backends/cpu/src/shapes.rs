//! What makes a call valid for the CPU device: the core's [`validate`] plus the shape rules of each op
//! (`docs/ops.md`), so kernels can index without further checks.

use sd3_core::reference::validate;
use sd3_core::{DType, Error, Op, OpCall, Result, TensorDesc, MAX_RANK};

pub fn check(call: &OpCall) -> Result<()> {
    validate(call)?;
    let name = call.op.name();
    let bad = |msg: String| Err(Error::shape(name.clone(), msg));
    for t in call.inputs.iter().chain(call.outputs) {
        let l = &t.layout;
        if l.shape.len() != l.strides.len() || l.rank() > MAX_RANK {
            return bad(format!("layout with shape {:?} and strides {:?}", l.shape, l.strides));
        }
    }
    let ins = call.inputs;
    let y = call.outputs[0].shape();
    let vec_of = |t: &TensorDesc, n: usize, what: &str| -> Result<()> {
        if t.shape() != [n] {
            return Err(Error::shape(name.clone(), format!("{what} has shape {:?}, expected [{n}]", t.shape())));
        }
        Ok(())
    };
    match call.op {
        // Declined: the core runs it as a matmul and a gated residual (the fusion saves a pass on GPUs only).
        Op::MatmulGatedResidual { .. } => {
            return Err(Error::Unsupported {
                backend: "cpu".into(),
                op: name,
                detail: "runs as its matmul and gated residual".into(),
            })
        }
        // Declined: the training code runs its products as separate ops, with this backend's matmul.
        Op::AttentionBackward { .. } => {
            return Err(Error::Unsupported {
                backend: "cpu".into(),
                op: name,
                detail: "runs as separate products in the training code".into(),
            })
        }
        Op::Matmul { bias, .. } => {
            let r = y.len();
            let (a, b) = (ins[0].shape(), ins[1].shape());
            if r < 2 || a.len() != r || b.len() != r {
                return bad(format!("a {a:?} x b {b:?} -> y {y:?}: equal ranks >= 2 expected"));
            }
            let (m, n, k) = (y[r - 2], y[r - 1], a[r - 1]);
            if a[..r - 2] != y[..r - 2] || b[..r - 2] != y[..r - 2] || a[r - 2] != m || b[r - 2] != k || b[r - 1] != n {
                return bad(format!("a {a:?} x b {b:?} -> y {y:?}: shapes do not chain"));
            }
            if bias {
                vec_of(&ins[2], n, "bias")?;
            }
        }
        Op::Softmax | Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::LayerNormModulate { .. } => {
            if ins[0].shape() != y || y.is_empty() {
                return bad(format!(
                    "input {:?} and output {y:?} must have one equal shape of rank >= 1",
                    ins[0].shape()
                ));
            }
            let d = y[y.len() - 1];
            match call.op {
                Op::LayerNorm { affine: true, .. } => {
                    vec_of(&ins[1], d, "weight")?;
                    vec_of(&ins[2], d, "bias")?;
                }
                Op::RmsNorm { .. } => vec_of(&ins[1], d, "weight")?,
                _ => {}
            }
        }
        Op::Attention { bias, qk_norm, .. } => {
            let (q, k, v) = (ins[0].shape(), ins[1].shape(), ins[2].shape());
            let ok =
                q.len() == 4 && k.len() == 4 && v.len() == 4 && k[..2] == q[..2] && v[..3] == k[..3] && q[3] == k[3];
            if !ok || y != [q[0], q[1], q[2], v[3]] {
                return bad(format!("q {q:?}, k {k:?}, v {v:?} -> out {y:?}"));
            }
            if bias && ins[3].shape() != [q[0], q[1], q[2], k[2]] {
                return bad(format!("bias {:?}, expected {:?}", ins[3].shape(), [q[0], q[1], q[2], k[2]]));
            }
            if qk_norm {
                let first = 3 + bias as usize;
                vec_of(&ins[first], q[3], "q_norm")?;
                vec_of(&ins[first + 1], q[3], "k_norm")?;
            }
        }
        Op::Conv2d { stride, padding, bias } => {
            let (x, w) = (ins[0].shape(), ins[1].shape());
            if x.len() != 4 || w.len() != 4 || w[1] != x[1] || stride.contains(&0) {
                return bad(format!("input {x:?} with weight {w:?}, stride {stride:?}"));
            }
            let (ph, pw) = (x[2] + 2 * padding[0], x[3] + 2 * padding[1]);
            if ph < w[2] || pw < w[3] {
                return bad(format!("kernel {:?} larger than padded input {x:?}", &w[2..]));
            }
            let expect = [x[0], w[0], (ph - w[2]) / stride[0] + 1, (pw - w[3]) / stride[1] + 1];
            if y != expect {
                return bad(format!("output {y:?}, expected {expect:?}"));
            }
            if bias {
                vec_of(&ins[2], w[0], "bias")?;
            }
        }
        Op::GroupNorm { groups, affine, .. } => {
            let x = ins[0].shape();
            if x != y || x.len() < 2 || groups == 0 || !x[1].is_multiple_of(groups) {
                return bad(format!("{groups} groups for input {x:?} -> output {y:?}"));
            }
            if affine {
                vec_of(&ins[1], x[1], "weight")?;
                vec_of(&ins[2], x[1], "bias")?;
            }
        }
        Op::UpsampleNearest2d { factor } => {
            let x = ins[0].shape();
            if x.len() != 4 || factor == 0 || y != [x[0], x[1], x[2] * factor, x[3] * factor] {
                return bad(format!("{x:?} by {factor} -> {y:?}"));
            }
        }
        Op::Gather => {
            let (t, ids) = (ins[0].shape(), ins[1].shape());
            if t.len() != 2 || ids.len() != 1 || y != [ids[0], t[1]] {
                return bad(format!("table {t:?}, ids {ids:?} -> {y:?}"));
            }
            if !matches!(ins[1].dtype, DType::I32 | DType::I64) {
                return bad(format!("ids are {}, expected i32 or i64", ins[1].dtype));
            }
        }
        Op::Copy | Op::Fill { .. } | Op::Unary(_) | Op::Binary(_) | Op::Affine { .. } => {}
        Op::Modulate | Op::GatedResidual => {}
    }
    Ok(())
}
