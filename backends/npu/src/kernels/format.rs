//! Ascend private storage formats (`FLAGS_npu_storage_format`) and the conversion kernels at their boundaries
//! (the `TransData` of CANN). Both pad to blocks of 16, so their physical size exceeds the logical one.
//!
//! - FRACTAL_NZ of a `[K, N]` matrix: `[N1, K1, 16, 16]` with `K1 = ⌈K/16⌉`, `N1 = ⌈N/16⌉`: 16×16 fractals,
//!   row-major inside, the fractals themselves column-major (all K fractals of a column strip are adjacent).
//! - NC1HWC0 of an `[N, C, H, W]` activation: `[N, C1, H, W, C0]` with `C0 = 16`, `C1 = ⌈C/16⌉`.
//!
//! Padding elements are zero.

use super::Operand;
use crate::arena::Mem;
use crate::par::par_for;

pub const BLOCK: usize = 16;

/// Elements of the FRACTAL_NZ form of a `[k, n]` matrix.
pub fn nz_elems(k: usize, n: usize) -> usize {
    k.div_ceil(BLOCK) * n.div_ceil(BLOCK) * BLOCK * BLOCK
}

/// Element index of `(p, j)` of a `[k, _]` matrix in FRACTAL_NZ.
#[inline]
pub fn nz_index(k: usize, p: usize, j: usize) -> usize {
    let k1 = k.div_ceil(BLOCK);
    (((j / BLOCK) * k1 + p / BLOCK) * BLOCK + p % BLOCK) * BLOCK + j % BLOCK
}

/// Elements of the NC1HWC0 form of `[n, c, h, w]`.
pub fn nc1hwc0_elems(n: usize, c: usize, h: usize, w: usize) -> usize {
    n * c.div_ceil(BLOCK) * h * w * BLOCK
}

/// Element index of `(ni, ci, y, x)` of an `[_, c, h, w]` tensor in NC1HWC0.
#[inline]
pub fn nc1hwc0_index(c: usize, h: usize, w: usize, ni: usize, ci: usize, y: usize, x: usize) -> usize {
    ((((ni * c.div_ceil(BLOCK) + ci / BLOCK) * h + y) * w + x) * BLOCK) + ci % BLOCK
}

/// ND → FRACTAL_NZ of the last two dims of `src` (`[.., K, N]`; batch index 0 is taken, the caller only converts
/// matrices shared by every batch). `dst` holds [`nz_elems`] elements of `src`'s dtype.
pub fn nd_to_nz(src: &Operand, dst: Mem) {
    let r = src.layout.rank();
    let (k, n) = (src.shape()[r - 2], src.shape()[r - 1]);
    let (sk, sn) = (src.layout.strides[r - 2], src.layout.strides[r - 1]);
    let base = src.layout.offset;
    let (k1, n1) = (k.div_ceil(BLOCK), n.div_ceil(BLOCK));
    par_for(n1, 1, |strips| {
        for jb in strips {
            for p in 0..k1 * BLOCK {
                for j in jb * BLOCK..(jb + 1) * BLOCK {
                    // SAFETY: (p, j) inside the padded matrix; padding reads nothing from src. Strips are disjoint.
                    unsafe {
                        let v = if p < k && j < n { src.load(base + p * sk + j * sn) } else { 0.0 };
                        dst.store(nz_index(k, p, j), v);
                    }
                }
            }
        }
    });
}

/// NCHW (any strides) → NC1HWC0 in `dst` ([`nc1hwc0_elems`] elements).
pub fn nchw_to_nc1hwc0(src: &Operand, dst: Mem) {
    let (n, c, h, w) = (src.shape()[0], src.shape()[1], src.shape()[2], src.shape()[3]);
    let c1 = c.div_ceil(BLOCK);
    par_for(n * c1, 1, |blocks| {
        for nb in blocks {
            let (ni, cb) = (nb / c1, nb % c1);
            for ci in cb * BLOCK..(cb + 1) * BLOCK {
                for y in 0..h {
                    for x in 0..w {
                        // SAFETY: indices inside src (ci < c) and the padded dst; (n, c1) blocks are disjoint.
                        unsafe {
                            let v = if ci < c { src.load(src.at(&[ni, ci, y, x])) } else { 0.0 };
                            dst.store(nc1hwc0_index(c, h, w, ni, ci, y, x), v);
                        }
                    }
                }
            }
        }
    });
}

/// NC1HWC0 in `src` → NCHW `dst` (any strides), dropping the channel padding.
pub fn nc1hwc0_to_nchw(src: Mem, dst: &Operand) {
    let (n, c, h, w) = (dst.shape()[0], dst.shape()[1], dst.shape()[2], dst.shape()[3]);
    par_for(n * c, 1, |planes| {
        for pl in planes {
            let (ni, ci) = (pl / c, pl % c);
            for y in 0..h {
                for x in 0..w {
                    // SAFETY: indices inside both views; planes are disjoint.
                    unsafe { dst.store(dst.at(&[ni, ci, y, x]), src.load(nc1hwc0_index(c, h, w, ni, ci, y, x))) };
                }
            }
        }
    });
}
