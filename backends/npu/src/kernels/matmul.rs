//! Tiled batched matmul with f32 accumulation: `y [.., M, N] = a [.., M, K] · b [.., K, N] (+ bias [N])`.
//!
//! The output is cut into `MB × NB` tiles (one work item each, spread over threads). For each tile the K axis is
//! walked in steps of `KB`: an `MB × KB` tile of `a` and a `KB × NB` tile of `b` are loaded into local f32
//! buffers (the emulated L0A / L0B buffers) and multiplied into the local accumulator (L0C), which is finally
//! written to `y` with the bias. `b` is read either through its strides or from its FRACTAL_NZ copy.

use super::format::nz_index;
use super::Operand;
use crate::arena::Mem;
use crate::par::par_for;

const MB: usize = 32;
const NB: usize = 128;
const KB: usize = 128;

/// Where the `b` operand is read from.
pub enum BSource<'a> {
    /// The operand itself, through its strides.
    Strided(&'a Operand),
    /// A FRACTAL_NZ copy of a `[K, N]` matrix shared by every batch (see [`super::format`]).
    Nz { mem: Mem, k: usize },
}

/// Buffer index of batch `bi` (row-major over y's batch dims) of an operand with y's rank.
fn batch_base(op: &Operand, batch_shape: &[usize], mut bi: usize) -> usize {
    let mut pos = op.layout.offset;
    for d in (0..batch_shape.len()).rev() {
        pos += (bi % batch_shape[d]) * op.layout.strides[d];
        bi /= batch_shape[d];
    }
    pos
}

pub fn matmul(a: &Operand, b: BSource, bias: Option<&Operand>, y: &Operand) {
    let r = y.layout.rank();
    let (m, n) = (y.shape()[r - 2], y.shape()[r - 1]);
    let k = a.shape()[r - 1];
    let batch_shape = &y.shape()[..r - 2];
    let batch: usize = batch_shape.iter().product();
    let (mt, nt) = (m.div_ceil(MB), n.div_ceil(NB));
    let (sam, sak) = (a.layout.strides[r - 2], a.layout.strides[r - 1]);
    let (sym, syn) = (y.layout.strides[r - 2], y.layout.strides[r - 1]);
    let bias: Option<Vec<f32>> = bias.map(super::rows::load_vec);
    par_for(batch * mt * nt, 1, |items| {
        let mut at = vec![0f32; MB * KB];
        let mut bt = vec![0f32; KB * NB];
        let mut acc = vec![0f32; MB * NB];
        for item in items {
            let (bi, tile) = (item / (mt * nt), item % (mt * nt));
            let (i0, j0) = ((tile / nt) * MB, (tile % nt) * NB);
            let (mb, nb) = (MB.min(m - i0), NB.min(n - j0));
            let a0 = batch_base(a, batch_shape, bi);
            let y0 = batch_base(y, batch_shape, bi);
            acc[..MB * NB].fill(0.0);
            for p0 in (0..k).step_by(KB) {
                let kb = KB.min(k - p0);
                // SAFETY: every index below is inside a bounds-checked view (i < M, p < K, j < N).
                unsafe {
                    for i in 0..mb {
                        for p in 0..kb {
                            at[i * KB + p] = a.load(a0 + (i0 + i) * sam + (p0 + p) * sak);
                        }
                    }
                    match &b {
                        BSource::Strided(b) => {
                            let b0 = batch_base(b, batch_shape, bi);
                            let (sbk, sbn) = (b.layout.strides[r - 2], b.layout.strides[r - 1]);
                            for p in 0..kb {
                                for j in 0..nb {
                                    bt[p * NB + j] = b.load(b0 + (p0 + p) * sbk + (j0 + j) * sbn);
                                }
                            }
                        }
                        BSource::Nz { mem, k } => {
                            for p in 0..kb {
                                for j in 0..nb {
                                    bt[p * NB + j] = mem.load(nz_index(*k, p0 + p, j0 + j));
                                }
                            }
                        }
                    }
                }
                for i in 0..mb {
                    let arow = &at[i * KB..i * KB + kb];
                    let crow = &mut acc[i * NB..i * NB + nb];
                    for (p, &av) in arow.iter().enumerate() {
                        let brow = &bt[p * NB..p * NB + nb];
                        for (c, &bv) in crow.iter_mut().zip(brow) {
                            *c += av * bv;
                        }
                    }
                }
            }
            for i in 0..mb {
                for j in 0..nb {
                    let v = acc[i * NB + j] + bias.as_ref().map_or(0.0, |bias| bias[j0 + j]);
                    // SAFETY: (i0+i, j0+j) is inside y; tiles are disjoint between work items.
                    unsafe { y.store(y0 + (i0 + i) * sym + (j0 + j) * syn, v) };
                }
            }
        }
    });
}
