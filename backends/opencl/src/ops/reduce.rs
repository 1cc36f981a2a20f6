//! Softmax and the norms (layer, RMS, adaLN layer-norm-modulate, group): segment reductions of
//! kernels/reduce.cl, one work-group per segment.

use super::args::{collapse, contig_bits, Args, ClView};
use super::Ctx;
use crate::kernels::ProgramKind;
use sd3_core::{Op, OpCall, Result, TensorDesc};

// `NORM_*` in reduce.cl.
const NORM_RMS: u32 = 1;
const NORM_MUL: u32 = 2;
const NORM_ADD: u32 = 4;
const NORM_MODULATE: u32 = 8;

/// Strides of a per-channel vector `w` broadcast over a tensor of rank `rank` along dim `dim`.
fn along(w: &TensorDesc, rank: usize, dim: usize) -> Vec<usize> {
    let mut st = vec![0; rank];
    st[dim] = w.strides()[0];
    st
}

pub fn run(cx: &mut Ctx, call: &OpCall) -> Result<()> {
    let (x, y) = (&call.inputs[0], &call.outputs[0]);
    let shape = y.shape();
    let rank = shape.len();
    let last = *shape.last().unwrap_or(&1);
    let n = y.elem_count();
    let wg = cx.dev.tuning.reduce_wg;

    if let Op::Softmax = call.op {
        let (sh, v, c) = collapse(shape, &[(x.strides(), x.layout.offset), (y.strides(), y.layout.offset)]);
        let k = cx.kernel(ProgramKind::Reduce, "softmax", "")?;
        Args::new(&k)
            .u32(last as u32)
            .shape(&sh)
            .u32(contig_bits(&c, &[0, 3]))
            .operand(&cx.mem(x)?, x.dtype, &v[0])
            .operand(&cx.mem(y)?, y.dtype, &v[1])
            .done()?;
        return cx.launch(&k, [n / last * wg, 1, 1], [wg, 1, 1]);
    }

    // Segment length, mode, eps, and the multiplier p and addend q as (desc, strides over y's shape).
    let ins = call.inputs;
    type Operand<'t> = Option<(&'t TensorDesc, Vec<usize>)>;
    let (seglen, mode, eps, p, q): (usize, u32, f32, Operand, Operand) = match call.op {
        Op::LayerNorm { eps, affine: false } => (last, 0, eps, None, None),
        Op::LayerNorm { eps, affine: true } => (
            last,
            NORM_MUL | NORM_ADD,
            eps,
            Some((&ins[1], along(&ins[1], rank, rank - 1))),
            Some((&ins[2], along(&ins[2], rank, rank - 1))),
        ),
        Op::RmsNorm { eps } => (last, NORM_RMS | NORM_MUL, eps, Some((&ins[1], along(&ins[1], rank, rank - 1))), None),
        Op::LayerNormModulate { eps } => (
            last,
            NORM_MUL | NORM_ADD | NORM_MODULATE,
            eps,
            Some((&ins[1], ins[1].strides().to_vec())),
            Some((&ins[2], ins[2].strides().to_vec())),
        ),
        Op::GroupNorm { groups, eps, affine } => {
            let seg = n / shape[0] / groups;
            if affine {
                let (w, b) = (&ins[1], &ins[2]);
                (seg, NORM_MUL | NORM_ADD, eps, Some((w, along(w, rank, 1))), Some((b, along(b, rank, 1))))
            } else {
                (seg, 0, eps, None, None)
            }
        }
        _ => unreachable!("reduce::run called for {}", call.op.name()),
    };
    // Unused p/q are bound to x with x's view (never read).
    let p = p.unwrap_or((x, x.strides().to_vec()));
    let q = q.unwrap_or((x, x.strides().to_vec()));
    let views = [
        (x.strides(), x.layout.offset),
        (&p.1[..], p.0.layout.offset),
        (&q.1[..], q.0.layout.offset),
        (y.strides(), y.layout.offset),
    ];
    let (sh, v, c): (_, Vec<ClView>, _) = collapse(shape, &views);
    let k = cx.kernel(ProgramKind::Reduce, "seg_norm", "")?;
    Args::new(&k)
        .u32(seglen as u32)
        .shape(&sh)
        .u32(mode)
        .f32(eps)
        .u32(contig_bits(&c, &[0, 1, 2, 3]))
        .operand(&cx.mem(x)?, x.dtype, &v[0])
        .operand(&cx.mem(p.0)?, p.0.dtype, &v[1])
        .operand(&cx.mem(q.0)?, q.0.dtype, &v[2])
        .operand(&cx.mem(y)?, y.dtype, &v[3])
        .done()?;
    cx.launch(&k, [n / seglen * wg, 1, 1], [wg, 1, 1])
}
