//! The im2col convolution (`src/conv_im2col.rs`), which devices with cooperative matrices take for f16: here
//! forced with `SD3_VULKAN_CONV=im2col:65536` (set before the device is opened; this binary's only test, so no
//! other thread reads the environment), so that it also runs on lavapipe, with bands of columns small enough
//! that every image takes several. Padding, stride 2, 1x1 kernels, permuted weights, with and without bias,
//! against the reference.

mod common;

use sd3_core::testing::{check, tol_for, Spec};
use sd3_core::DType::F16;
use sd3_core::Op;

#[test]
fn im2col_convolutions_match_the_reference() {
    std::env::set_var("SD3_VULKAN_CONV", "im2col:65536");
    let Some(dev) = common::device() else { return };
    let dev = dev.as_ref();
    let conv = |stride: usize, padding: usize, bias: bool| Op::Conv2d {
        stride: [stride, stride],
        padding: [padding, padding],
        bias,
    };
    let (x, w, b) = (Spec::new(&[2, 64, 24, 40], F16), Spec::new(&[72, 64, 3, 3], F16), Spec::new(&[72], F16));
    check(dev, "im2col 3x3 pad 1", conv(1, 1, true), &[x, w, b], &Spec::new(&[2, 72, 24, 40], F16), tol_for(F16, 0.0));
    let (x, w) = (Spec::new(&[1, 64, 33, 48], F16), Spec::permuted(&[40, 64, 3, 3], &[1, 0, 2, 3], F16));
    let y = Spec::new(&[1, 40, 17, 24], F16);
    check(dev, "im2col stride 2 permuted weights", conv(2, 1, false), &[x, w], &y, tol_for(F16, 0.0));
    let (x, w, b) = (Spec::new(&[2, 128, 16, 16], F16), Spec::new(&[32, 128, 1, 1], F16), Spec::new(&[32], F16));
    check(dev, "im2col 1x1", conv(1, 0, true), &[x, w, b], &Spec::new(&[2, 32, 16, 16], F16), tol_for(F16, 0.0));
}
