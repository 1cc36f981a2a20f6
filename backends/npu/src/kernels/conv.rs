//! Image kernels: direct 2-D convolution (activations in NCHW or NC1HWC0) and group norm.

use super::format::nc1hwc0_index;
use super::rows::load_vec;
use super::Operand;
use crate::arena::Mem;
use crate::par::par_for;

/// An `[N, C, H, W]` activation, as the conv kernel reads or writes it.
pub enum Activation<'a> {
    /// Through its strides.
    Nchw(&'a Operand),
    /// In NC1HWC0 (see [`super::format`]) with these logical dims.
    Nc1hwc0 { mem: Mem, dims: [usize; 4] },
}

impl Activation<'_> {
    fn dims(&self) -> [usize; 4] {
        match self {
            Activation::Nchw(t) => [t.shape()[0], t.shape()[1], t.shape()[2], t.shape()[3]],
            Activation::Nc1hwc0 { dims, .. } => *dims,
        }
    }

    #[inline]
    fn index(&self, n: usize, c: usize, y: usize, x: usize) -> usize {
        match self {
            Activation::Nchw(t) => {
                let s = &t.layout.strides;
                t.layout.offset + n * s[0] + c * s[1] + y * s[2] + x * s[3]
            }
            Activation::Nc1hwc0 { dims, .. } => nc1hwc0_index(dims[1], dims[2], dims[3], n, c, y, x),
        }
    }

    fn mem(&self) -> &Mem {
        match self {
            Activation::Nchw(t) => &t.mem,
            Activation::Nc1hwc0 { mem, .. } => mem,
        }
    }
}

/// `y [N,O,OH,OW] = conv(x [N,C,H,W], w [O,C,KH,KW]) (+ bias [O])`, dilation 1, groups 1, zero padding.
pub fn conv2d(
    x: &Activation,
    w: &Operand,
    bias: Option<&Operand>,
    y: &Activation,
    stride: [usize; 2],
    pad: [usize; 2],
) {
    let [n, c, h, wd] = x.dims();
    let [_, o, oh, ow] = y.dims();
    let (kh, kw) = (w.shape()[2], w.shape()[3]);
    let bias = bias.map(load_vec);
    let (xm, ym) = (x.mem(), y.mem());
    par_for(n * o, 1, |planes| {
        let mut wl = vec![0f32; c * kh * kw];
        for pl in planes {
            let (ni, oi) = (pl / o, pl % o);
            for ci in 0..c {
                for ky in 0..kh {
                    for kx in 0..kw {
                        // SAFETY: inside w's bounds-checked view.
                        wl[(ci * kh + ky) * kw + kx] = unsafe { w.load(w.at(&[oi, ci, ky, kx])) };
                    }
                }
            }
            let b = bias.as_ref().map_or(0.0, |b| b[oi]);
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0f32;
                    for ci in 0..c {
                        for ky in 0..kh {
                            let iy = (oy * stride[0] + ky) as isize - pad[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * stride[1] + kx) as isize - pad[1] as isize;
                                if ix < 0 || ix >= wd as isize {
                                    continue;
                                }
                                // SAFETY: (ni, ci, iy, ix) is inside x.
                                let xv = unsafe { xm.load(x.index(ni, ci, iy as usize, ix as usize)) };
                                acc += xv * wl[(ci * kh + ky) * kw + kx];
                            }
                        }
                    }
                    // SAFETY: inside y; (n, o) planes are disjoint between work items.
                    unsafe { ym.store(y.index(ni, oi, oy, ox), acc + b) };
                }
            }
        }
    });
}

/// Group norm over `(C/groups, spatial...)` of `x [N, C, ...]`, then the per-channel affine.
pub fn group_norm(x: &Operand, affine: Option<(&Operand, &Operand)>, y: &Operand, groups: usize, eps: f32) {
    let (n, c) = (x.shape()[0], x.shape()[1]);
    let cpg = c / groups;
    let wb = affine.map(|(w, b)| (load_vec(w), load_vec(b)));
    // The (n, c) plane of an operand, as a layout over the spatial dims.
    let plane = |t: &Operand, ni: usize, ci: usize| {
        let l = &t.layout;
        sd3_core::Layout {
            shape: l.shape[2..].to_vec(),
            strides: l.strides[2..].to_vec(),
            offset: l.offset + ni * l.strides[0] + ci * l.strides[1],
        }
    };
    par_for(n * groups, 1, |items| {
        for it in items {
            let (ni, g) = (it / groups, it % groups);
            let (mut sum, mut count) = (0f64, 0usize);
            for ci in g * cpg..(g + 1) * cpg {
                // SAFETY: spatial indices of a bounds-checked view.
                plane(x, ni, ci).for_each_index(|i| sum += unsafe { x.load(i) } as f64);
                count += plane(x, ni, ci).elem_count();
            }
            let mean = sum / count.max(1) as f64;
            let mut var = 0f64;
            for ci in g * cpg..(g + 1) * cpg {
                // SAFETY: as above.
                plane(x, ni, ci).for_each_index(|i| var += (unsafe { x.load(i) } as f64 - mean).powi(2));
            }
            let inv = 1.0 / (var / count.max(1) as f64 + eps as f64).sqrt();
            for ci in g * cpg..(g + 1) * cpg {
                let (w, b) = wb.as_ref().map_or((1.0, 0.0), |(w, b)| (w[ci], b[ci]));
                let xs: Vec<usize> = {
                    let mut v = Vec::new();
                    plane(x, ni, ci).for_each_index(|i| v.push(i));
                    v
                };
                let mut k = 0;
                plane(y, ni, ci).for_each_index(|i| {
                    // SAFETY: x and y planes have the same shape; (n, group) items are disjoint.
                    unsafe {
                        let v = ((x.load(xs[k]) as f64 - mean) * inv) as f32;
                        y.store(i, v * w + b);
                    }
                    k += 1;
                });
            }
        }
    });
}
