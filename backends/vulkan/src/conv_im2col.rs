//! Convolution on the cooperative matrices, for f16 on a device that has them (the VAE decoder's convolutions):
//! an explicit im2col whose product runs on the whole-tile matmul shader instead of `conv_gemm.comp`'s scalar
//! implicit GEMM. Per image and band of output rows:
//! 1. `im2col.comp` writes the band's patches as columns `[pixels, KH·KW·C]` (K ordered tap, then channel), zero
//!    in the padding, straight from the NCHW input (through shared memory: coalesced reads, whole-sector writes);
//! 2. one matmul `w'[O, KH·KW·C] · columnsᵀ` writes the band of the output `[O, pixels]`, with the weights
//!    reordered once per call to `[O, KH, KW, C]` (a copy), so that both operands are contiguous along K (the
//!    whole-tile shader's condition, with K a multiple of 64);
//! 3. the bias, broadcast along the pixels, is added to the band.
//!
//! The scratch (the reordered weights, one band of columns of at most [`BAND_BYTES`]) is freed once recorded: a
//! later dispatch that writes those bytes waits for the pending reads (the device's barrier tracking).

use crate::device::VulkanDevice;
use crate::pipelines::Kernel;
use sd3_core::{BinaryOp, BufferId, DType, Device, Layout, Op, OpCall, Result, TensorDesc};

/// The largest band of columns (bytes): bands of output rows are sized to fit.
const BAND_BYTES: usize = 128 << 20;

/// Environment switch, read when a device is opened: `SD3_VULKAN_CONV=gemm` keeps every convolution on
/// `conv_gemm.comp` (for comparisons); `SD3_VULKAN_CONV=im2col` takes this path also without cooperative matrices
/// (its products then run on `matmul.comp`), so that lavapipe tests it (`tests/conv_im2col.rs`);
/// `SD3_VULKAN_CONV=im2col:BYTES` also caps the bands of columns at BYTES, to test several bands on small images.
pub const CONV_ENV: &str = "SD3_VULKAN_CONV";

/// Which convolution path a device takes ([`CONV_ENV`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPath {
    /// im2col where [`applies`] holds (cooperative matrices), else `conv_gemm.comp`.
    Auto,
    Gemm,
    /// Wherever the shapes allow, with bands of columns of at most this many bytes.
    Im2col(usize),
}

impl ConvPath {
    pub fn from_env() -> ConvPath {
        match std::env::var(CONV_ENV).as_deref() {
            Ok("gemm") => ConvPath::Gemm,
            Ok("im2col") => ConvPath::Im2col(BAND_BYTES),
            Ok(v) => match v.strip_prefix("im2col:").and_then(|b| b.parse().ok()) {
                Some(bytes) => ConvPath::Im2col(bytes),
                None => {
                    eprintln!("{CONV_ENV}={v:?} not understood (gemm, im2col or im2col:BYTES): ignored");
                    ConvPath::Auto
                }
            },
            Err(_) => ConvPath::Auto,
        }
    }
}

/// Whether `call` runs here: a convolution of f16 tensors on a device with the cooperative shaders (see
/// [`ConvPath`]), C a multiple of 8 and K = C·KH·KW a multiple of 64, output rows a multiple of 8 pixels wide, and
/// each output image contiguous in its last two dims with 16-byte aligned channel planes (so that every band is a
/// 16-byte aligned `[O, pixels]` view).
pub fn applies(dev: &VulkanDevice, call: &OpCall) -> bool {
    let Op::Conv2d { .. } = call.op else { return false };
    let (x, w, y) = (&call.inputs[0], &call.inputs[1], &call.outputs[0]);
    let (ws, ys) = (w.shape(), y.shape());
    let k = ws[1] * ws[2] * ws[3];
    let yst = y.strides();
    let wanted = match dev.conv_path {
        ConvPath::Auto => dev.coop.is_some(),
        ConvPath::Gemm => false,
        ConvPath::Im2col(_) => true,
    };
    wanted
        && [x, w, y].iter().all(|t| t.dtype == DType::F16 && t.rank() == 4)
        && (!matches!(call.op, Op::Conv2d { bias: true, .. }) || call.inputs[2].dtype == DType::F16)
        && k.is_multiple_of(64)
        && ws[1].is_multiple_of(8)
        && ys[3].is_multiple_of(8)
        && yst[3] == 1
        && yst[2] == ys[3]
        && yst[1].is_multiple_of(8)
        && yst[0].is_multiple_of(8)
        && y.layout.offset.is_multiple_of(8)
}

fn view(t: &TensorDesc, shape: &[usize], strides: &[usize], offset: usize) -> TensorDesc {
    TensorDesc {
        buffer: t.buffer,
        dtype: t.dtype,
        layout: Layout { shape: shape.to_vec(), strides: strides.to_vec(), offset },
    }
}

fn scratch(buffer: BufferId, shape: &[usize]) -> TensorDesc {
    TensorDesc { buffer, dtype: DType::F16, layout: Layout::contiguous(shape) }
}

pub fn execute(dev: &VulkanDevice, call: &OpCall) -> Result<()> {
    let Op::Conv2d { stride: [sh, sw], padding: [ph, pw], bias } = call.op else {
        unreachable!("applies() checked the op")
    };
    let (x, w, y) = (&call.inputs[0], &call.inputs[1], &call.outputs[0]);
    let (xs, ws, ys) = (x.shape(), w.shape(), y.shape());
    let (n, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (o, kh, kw) = (ws[0], ws[2], ws[3]);
    let (oh, ow) = (ys[2], ys[3]);
    let k = c * kh * kw;
    let band_bytes = match dev.conv_path {
        ConvPath::Im2col(bytes) => bytes,
        _ => BAND_BYTES,
    };
    // At most 65535 workgroups of 32 pixels per band (im2col.comp's grid).
    let band_rows = (band_bytes / (ow * k * 2)).min(65535 * 32 / ow).clamp(1, oh);
    let mut owned = Vec::new();
    let result = (|| {
        let mut alloc = |elems: usize| -> Result<BufferId> {
            let id = dev.alloc(elems * 2)?;
            owned.push(id);
            Ok(id)
        };
        let wt = scratch(alloc(o * k)?, &[o, kh, kw, c]);
        let cols = alloc(band_rows * ow * k)?;
        let run = |op: Op, inputs: &[TensorDesc], output: &TensorDesc| {
            crate::ops::execute(dev, &OpCall { op, inputs, outputs: std::slice::from_ref(output) })
        };
        // The weights as [O, KH, KW, C]: K ordered (tap, channel) like the columns.
        let wst = w.strides();
        let w_perm = view(w, &[o, kh, kw, c], &[wst[0], wst[2], wst[3], wst[1]], w.layout.offset);
        run(Op::Copy, &[w_perm], &wt)?;
        let w_matrix = view(&wt, &[o, k], &[k, 1], 0);
        let (xst, yst) = (x.strides(), y.strides());
        for img in 0..n {
            let image = view(x, &[c, h, wd], &xst[1..], x.layout.offset + img * xst[0]);
            for oh0 in (0..oh).step_by(band_rows) {
                let pixels = band_rows.min(oh - oh0) * ow;
                let columns = scratch(cols, &[pixels, k]);
                let geometry = [c, kw, ow, sh, sw, ph, pw, oh0, pixels, k, h, wd];
                im2col(dev, &image, &columns, geometry)?;
                let band = view(y, &[o, pixels], &[yst[1], 1], y.layout.offset + img * yst[0] + oh0 * yst[2]);
                let columns_t = view(&columns, &[k, pixels], &[1, k], 0);
                run(Op::Matmul { bias: false, act: None }, &[w_matrix.clone(), columns_t], &band)?;
                if bias {
                    let b = &call.inputs[2];
                    let b_rows = view(b, &[o, pixels], &[b.strides()[0], 0], b.layout.offset);
                    run(Op::Binary(BinaryOp::Add), &[band.clone(), b_rows], &band)?;
                }
            }
        }
        Ok(())
    })();
    for id in owned {
        dev.free(id);
    }
    result
}

/// One band of `image`'s ([C, H, W]) patches into `columns` ([pixels, K]) on `im2col.comp`; `geometry` is its
/// parameters [0..12) (C, KW, OW, strides, paddings, first row, pixels, K, H, W).
fn im2col(dev: &VulkanDevice, image: &TensorDesc, columns: &TensorDesc, geometry: [usize; 12]) -> Result<()> {
    let mut st = dev.lock();
    let (bx, bc) = (st.bind(image)?, st.bind(columns)?);
    let mut p = [0u32; 16];
    for (i, v) in geometry.into_iter().enumerate() {
        p[i] = v as u32;
    }
    p[12] = bx.elem_offset;
    for (i, s) in image.strides().iter().enumerate() {
        p[13 + i] = *s as u32;
    }
    // Pixel tiles of 32 × kernel taps × chunks of 64 channels.
    let (c, taps) = (geometry[0], geometry[9] / geometry[0]);
    let grid = [geometry[8].div_ceil(32) as u32, taps as u32, c.div_ceil(64) as u32];
    st.dispatch(dev.raw(), dev.queue(), Kernel::Im2col, &p, &[(1, bc), (2, bx)], grid)
}
