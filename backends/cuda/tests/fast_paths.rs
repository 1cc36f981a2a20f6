//! The CUDA backend's specialised kernels against the reference device, at the shapes and layouts that select
//! them: the warp-per-row norms (`row_warp`), the 32-bit-index vectorised elementwise kernel (`ew_vec32`), and
//! the tensor-core attention on the strided views of a fused `[B, N, 3, H, Dh]` projection (the MM-DiT's joint
//! attention layout), with sequence lengths that are not multiples of the tiles; the 16-byte im2col, group norm
//! and upsampling of the VAE decoder. Skips without a CUDA device.

mod common;

use common::{lim, Pair};
use sd3_core::{AttentionParams, DType, Result, Tensor, UnaryOp};

/// [`common::check`] at the dtype's limit, and no infinity either.
fn check(name: &str, got: &Tensor, want: &Tensor, f32_limit: f64) -> Result<()> {
    assert!(got.to_f32_vec()?.iter().all(|v| v.is_finite()), "{name}: non-finite output");
    common::check(name, got, want, lim(got.dtype(), f32_limit))
}

#[test]
fn warp_per_row_norms() -> Result<()> {
    let Some(mut p) = Pair::open(7) else { return Ok(()) };
    for dt in [DType::F32, DType::F16, DType::BF16] {
        // 1536: SD3-medium's width; 8: the smallest row; 3072: the largest row_warp takes; 3080: one past.
        for d in [1536, 8, 3072, 3080] {
            let (gx, cx) = p.rand(&[2, 37, d], dt, -3.0, 3.0)?;
            let (gw, cw) = p.rand(&[d], dt, 0.5, 1.5)?;
            let (gb, cb) = p.rand(&[d], dt, -0.5, 0.5)?;
            check(
                &format!("layer_norm affine d{d} {dt}"),
                &gx.layer_norm(Some(&gw), Some(&gb), 1e-6)?,
                &cx.layer_norm(Some(&cw), Some(&cb), 1e-6)?,
                1e-10,
            )?;
            check(
                &format!("layer_norm plain d{d} {dt}"),
                &gx.layer_norm(None, None, 1e-6)?,
                &cx.layer_norm(None, None, 1e-6)?,
                1e-10,
            )?;
            check(&format!("rms_norm d{d} {dt}"), &gx.rms_norm(&gw, 1e-6)?, &cx.rms_norm(&cw, 1e-6)?, 1e-10)?;
            // adaLN: scale and shift broadcast over tokens, as the MM-DiT's modulation.
            let (gs, cs) = p.rand(&[2, 1, d], dt, -0.5, 0.5)?;
            let (gh, ch) = p.rand(&[2, 1, d], dt, -0.5, 0.5)?;
            check(
                &format!("ln_modulate d{d} {dt}"),
                &gx.layer_norm_modulate(&gs, &gh, 1e-6)?,
                &cx.layer_norm_modulate(&cs, &ch, 1e-6)?,
                1e-10,
            )?;
        }
        // Rows of a strided view (every other token): row starts stay 8-aligned.
        let (gx, cx) = p.rand(&[2, 20, 64], dt, -3.0, 3.0)?;
        let (gs, cs) = p.rand(&[2, 1, 64], dt, -0.5, 0.5)?;
        let (gv, cv) = (gx.narrow(1, 3, 9)?, cx.narrow(1, 3, 9)?);
        check(
            &format!("ln_modulate strided rows {dt}"),
            &gv.layer_norm_modulate(&gs, &gs, 1e-6)?,
            &cv.layer_norm_modulate(&cs, &cs, 1e-6)?,
            1e-10,
        )?;
    }
    Ok(())
}

#[test]
fn vectorised_elementwise_at_size() -> Result<()> {
    let Some(mut p) = Pair::open(7) else { return Ok(()) };
    for dt in [DType::F16, DType::BF16, DType::F32] {
        let (gx, cx) = p.rand(&[2, 333, 6144], dt, -4.0, 4.0)?;
        check(
            &format!("gelu_tanh [2,333,6144] {dt}"),
            &gx.unary(UnaryOp::GeluTanh)?,
            &cx.unary(UnaryOp::GeluTanh)?,
            1e-10,
        )?;
        let (gy, cy) = p.rand(&[2, 333, 6144], dt, -1.0, 1.0)?;
        let (gg, cg) = p.rand(&[2, 1, 6144], dt, -1.0, 1.0)?;
        check(
            &format!("gated_residual broadcast gate {dt}"),
            &gx.gated_residual(&gg, &gy)?,
            &cx.gated_residual(&cg, &cy)?,
            1e-10,
        )?;
        // Head split of a fused projection: [B, N, 3, H, Dh] → q as [B, H, N, Dh].
        let (gq, cq) = p.rand(&[2, 77, 3, 6, 64], dt, -1.0, 1.0)?;
        let head_first = |t: &Tensor| t.narrow(2, 1, 1)?.squeeze(2)?.permute(&[0, 2, 1, 3])?.contiguous();
        check(&format!("head split copy {dt}"), &head_first(&gq)?, &head_first(&cq)?, 0.0)?;
    }
    Ok(())
}

#[test]
fn flash_attention_on_joint_layout_views() -> Result<()> {
    let Some(mut p) = Pair::open(7) else { return Ok(()) };
    for dt in [DType::F16, DType::BF16] {
        // (queries = keys, heads, head dim): tile-aligned, ragged, and shorter than one tile.
        for (n, h, dh) in [(256, 2, 64), (333, 3, 64), (45, 2, 64), (200, 2, 128), (70, 1, 128)] {
            let (gx, cx) = p.rand(&[2, n, 3, h, dh], dt, -2.0, 2.0)?;
            let split = |t: &Tensor, i: usize| t.narrow(2, i, 1)?.squeeze(2)?.permute(&[0, 2, 1, 3]);
            let params = AttentionParams::new((dh as f32).powf(-0.5));
            let og = Tensor::attention(&split(&gx, 0)?, &split(&gx, 1)?, &split(&gx, 2)?, &params)?;
            let oc = Tensor::attention(&split(&cx, 0)?, &split(&cx, 1)?, &split(&cx, 2)?, &params)?;
            check(&format!("attention joint views n{n} h{h} d{dh} {dt}"), &og, &oc, 1e-8)?;
            // Only a prefix of the queries (the last MM-DiT block's image-only queries).
            let q = |t: &Tensor| split(t, 0)?.narrow(2, 0, n / 2 + 1);
            let og = Tensor::attention(&q(&gx)?, &split(&gx, 1)?, &split(&gx, 2)?, &params)?;
            let oc = Tensor::attention(&q(&cx)?, &split(&cx, 1)?, &split(&cx, 2)?, &params)?;
            check(&format!("attention query prefix n{n} h{h} d{dh} {dt}"), &og, &oc, 1e-8)?;
        }
    }
    Ok(())
}

#[test]
fn few_row_linears() -> Result<()> {
    let Some(mut p) = Pair::open(7) else { return Ok(()) };
    for dt in [DType::F32, DType::F16, DType::BF16] {
        // (rows, in, out): the adaLN modulation's shape, one row, the most rows the kernel takes, one more.
        for (m, k, n) in [(2, 1536, 9216), (1, 64, 24), (8, 256, 40), (9, 256, 40)] {
            let (gx, cx) = p.rand(&[m, k], dt, -1.0, 1.0)?;
            let (gw, cw) = p.rand(&[n, k], dt, -0.1, 0.1)?;
            let (gb, cb) = p.rand(&[n], dt, -1.0, 1.0)?;
            check(
                &format!("linear {m}x{k} -> {n} {dt}"),
                &gx.linear(&gw, Some(&gb))?,
                &cx.linear(&cw, Some(&cb))?,
                1e-9,
            )?;
            check(
                &format!("linear {m}x{k} -> {n} no bias {dt}"),
                &gx.linear(&gw, None)?,
                &cx.linear(&cw, None)?,
                1e-9,
            )?;
        }
        // Rows of a strided view (every other row of a larger batch).
        let (gx, cx) = p.rand(&[6, 128], dt, -1.0, 1.0)?;
        let (gw, cw) = p.rand(&[16, 128], dt, -0.1, 0.1)?;
        let pick = |t: &Tensor| t.reshape(&[3, 256])?.narrow(1, 0, 128);
        check(
            &format!("linear strided rows {dt}"),
            &pick(&gx)?.linear(&gw, None)?,
            &pick(&cx)?.linear(&cw, None)?,
            1e-9,
        )?;
    }
    Ok(())
}

#[test]
fn linears_with_fused_activations() -> Result<()> {
    let Some(mut p) = Pair::open(7) else { return Ok(()) };
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let (gx, cx) = p.rand(&[2, 50, 64], dt, -2.0, 2.0)?;
        let (gw, cw) = p.rand(&[96, 64], dt, -0.3, 0.3)?;
        let (gb, cb) = p.rand(&[96], dt, -1.0, 1.0)?;
        // GELU and ReLU go into cuBLASLt's epilogue; SiLU runs as the product, then the op in place.
        for act in [UnaryOp::GeluTanh, UnaryOp::Relu, UnaryOp::Silu] {
            check(
                &format!("linear + {} {dt}", act.name()),
                &gx.linear_act(&gw, Some(&gb), Some(act))?,
                &cx.linear_act(&cw, Some(&cb), Some(act))?,
                1e-9,
            )?;
        }
        check(
            &format!("linear + gelu, no bias {dt}"),
            &gx.linear_act(&gw, None, Some(UnaryOp::GeluTanh))?,
            &cx.linear_act(&cw, None, Some(UnaryOp::GeluTanh))?,
            1e-9,
        )?;
        // Into rows 10..60 of a [2, 80, 96] buffer (the joint attention's fused projections): a batched product
        // with the weight broadcast; rows outside stay as they were.
        let (gbuf, cbuf) = p.rand(&[2, 80, 96], dt, -1.0, 1.0)?;
        gx.linear_into(&gw, Some(&gb), None, &gbuf.narrow(1, 10, 50)?)?;
        cx.linear_into(&cw, Some(&cb), None, &cbuf.narrow(1, 10, 50)?)?;
        check(&format!("linear into buffer rows {dt}"), &gbuf, &cbuf, 1e-9)?;
        gx.linear_into(&gw, Some(&gb), Some(UnaryOp::GeluTanh), &gbuf.narrow(1, 30, 50)?)?;
        cx.linear_into(&cw, Some(&cb), Some(UnaryOp::GeluTanh), &cbuf.narrow(1, 30, 50)?)?;
        check(&format!("linear + gelu into buffer rows {dt}"), &gbuf, &cbuf, 1e-9)?;
    }
    Ok(())
}

#[test]
fn vae_kernels_eight_pixels_per_thread() -> Result<()> {
    let Some(mut p) = Pair::open(7) else { return Ok(()) };
    for dt in [DType::F16, DType::BF16] {
        // Output widths that are multiples of 8 take `im2col8_h`: padding on both edges, stride 2, a 1x1
        // kernel, a second sample, and an input view with an offset (a channel slice of a bigger tensor).
        let (gx, cx) = p.rand(&[2, 8, 16, 32], dt, -1.0, 1.0)?;
        let (gk, ck) = p.rand(&[5, 8, 3, 3], dt, -1.0, 1.0)?;
        let (gb, cb) = p.rand(&[5], dt, -1.0, 1.0)?;
        for (stride, pad) in [(1, 1), (2, 1), (1, 0)] {
            check(
                &format!("conv3x3 s{stride} p{pad} {dt}"),
                &gx.conv2d(&gk, Some(&gb), stride, pad)?,
                &cx.conv2d(&ck, Some(&cb), stride, pad)?,
                1e-9,
            )?;
        }
        let (g1, c1) = p.rand(&[5, 8, 1, 1], dt, -1.0, 1.0)?;
        check(&format!("conv1x1 {dt}"), &gx.conv2d(&g1, None, 1, 0)?, &cx.conv2d(&c1, None, 1, 0)?, 1e-9)?;
        let slice = |t: &Tensor| t.narrow(1, 2, 6);
        let (gk6, ck6) = p.rand(&[4, 6, 3, 3], dt, -1.0, 1.0)?;
        check(
            &format!("conv3x3 channel slice {dt}"),
            &slice(&gx)?.conv2d(&gk6, None, 1, 1)?,
            &slice(&cx)?.conv2d(&ck6, None, 1, 1)?,
            1e-9,
        )?;
        // Nearest upsampling with 16-byte stores: factors 2 and 3, and a channel slice as input.
        for factor in [2, 3] {
            let name = format!("upsample x{factor} {dt}");
            check(&name, &gx.upsample_nearest2d(factor)?, &cx.upsample_nearest2d(factor)?, 0.0)?;
        }
        check(
            &format!("upsample channel slice {dt}"),
            &slice(&gx)?.upsample_nearest2d(2)?,
            &slice(&cx)?.upsample_nearest2d(2)?,
            0.0,
        )?;
        // Group norm over groups of 65536 elements (the many-block path) with 16-byte accesses, two samples,
        // without and with the affine weights, on data whose mean is far from zero.
        let (gn, cn) = p.rand(&[2, 16, 128, 128], dt, 1.0, 5.0)?;
        let (gw, cw) = p.rand(&[16], dt, 0.5, 1.5)?;
        check(
            &format!("group_norm 16-byte {dt}"),
            &gn.group_norm(4, None, None, 1e-6)?,
            &cn.group_norm(4, None, None, 1e-6)?,
            1e-10,
        )?;
        check(
            &format!("group_norm 16-byte affine {dt}"),
            &gn.group_norm(4, Some(&gw), Some(&gw), 1e-6)?,
            &cn.group_norm(4, Some(&cw), Some(&cw), 1e-6)?,
            1e-10,
        )?;
    }
    Ok(())
}
