//! Every op on the GPU against the reference device, on random inputs: the op test cases every backend runs
//! (`sd3_core::testing::cases`), and this file's own NMSE-based sweep over every float dtype. Skips (with the
//! reason) when no CUDA device is usable; on a machine with one, run with `cargo test -p sd3-backend-cuda`.

mod common;

use common::{check, gpu, lim, Pair};
use sd3_backend_cuda::CudaProvider;
use sd3_core::BackendProvider;
use sd3_core::{AttentionParams, BinaryOp, DType, Device, Result, Tensor, UnaryOp};
use std::sync::{Arc, OnceLock};

/// The CUDA device shared by the shared cases' tests, opened once.
fn device() -> Option<Arc<dyn Device>> {
    static DEV: OnceLock<Option<Arc<dyn Device>>> = OnceLock::new();
    DEV.get_or_init(|| match CudaProvider::new("").and_then(|p| p.open_device(0)) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping CUDA tests: {e}");
            None
        }
    })
    .clone()
}

// Every shared case but `gather_bad_ids`: the device finds a bad id asynchronously and reports it at the next
// synchronisation without the table's range (`out_of_range_gather_is_an_error` below checks that error).
sd3_core::backend_tests!(device();
    copy_casts_and_views,
    fill,
    unary_all,
    binary_broadcast_and_maps,
    matmul_shapes_layouts_dtypes,
    matmul_half_precision_tiles,
    softmax_and_norms,
    attention_long_masked_normed,
    attention_half_precision_tiles,
    conv2d_and_upsample,
    gather_rows,
);

fn params<'a>(causal: bool, bias: Option<&'a Tensor>, norm: Option<&'a Tensor>) -> AttentionParams<'a> {
    let mut a = AttentionParams::new(0.125);
    a.causal = causal;
    a.bias = bias;
    a.qk_norm = norm.map(|n| (n, n, 1e-6));
    a
}

#[test]
fn every_op_matches_the_reference() -> Result<()> {
    let Some(mut p) = Pair::open(42) else { return Ok(()) };
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let (g, c) = p.rand(&[3, 33, 17], dt, -2.0, 2.0)?;
        let (g2, c2) = p.rand(&[33, 1], dt, -1.0, 1.0)?;
        for u in UnaryOp::ALL {
            let (gi, ci) = if matches!(u, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip) {
                (
                    g.affine(0.0, 0.0)?.add(&g.unary(UnaryOp::Abs)?)?.affine(1.0, 0.5)?,
                    c.unary(UnaryOp::Abs)?.affine(1.0, 0.5)?,
                )
            } else {
                (g.clone(), c.clone())
            };
            check(&format!("unary.{} {dt}", u.name()), &gi.unary(u)?, &ci.unary(u)?, lim(dt, 1e-10))?;
        }
        for bop in BinaryOp::ALL {
            let (gb, cb) = if bop == BinaryOp::Div {
                (g2.affine(1.0, 2.0)?, c2.affine(1.0, 2.0)?)
            } else {
                (g2.clone(), c2.clone())
            };
            check(&format!("binary.{} {dt}", bop.name()), &g.binary(bop, &gb)?, &c.binary(bop, &cb)?, lim(dt, 1e-10))?;
        }
        check(
            &format!("transpose copy {dt}"),
            &g.transpose(0, 2)?.contiguous()?,
            &c.transpose(0, 2)?.contiguous()?,
            0.0,
        )?;
        // Head-split permutes (rank-4 views with a unit, 8-aligned last dim: the vectorised path).
        let (g4, c4) = p.rand(&[2, 5, 3, 16], dt, -1.0, 1.0)?;
        let (gp, cp) = (g4.permute(&[0, 2, 1, 3])?, c4.permute(&[0, 2, 1, 3])?);
        check(&format!("permute copy rank 4 {dt}"), &gp.contiguous()?, &cp.contiguous()?, 0.0)?;
        let (gr, cr) = p.rand(&[3, 1, 16], dt, -1.0, 1.0)?;
        check(&format!("add rank 4 broadcast {dt}"), &gp.add(&gr)?, &cp.add(&cr)?, lim(dt, 1e-10))?;
        check(&format!("cast {dt}->f32"), &g.to_dtype(DType::F32)?, &c.to_dtype(DType::F32)?, 0.0)?;
        check(&format!("softmax {dt}"), &g.softmax()?, &c.softmax()?, lim(dt, 1e-10))?;
        let (gw, cw) = p.rand(&[17], dt, 0.5, 1.5)?;
        let (gb, cb) = p.rand(&[17], dt, -0.5, 0.5)?;
        check(
            &format!("layer_norm {dt}"),
            &g.layer_norm(Some(&gw), Some(&gb), 1e-5)?,
            &c.layer_norm(Some(&cw), Some(&cb), 1e-5)?,
            lim(dt, 1e-10),
        )?;
        check(&format!("rms_norm {dt}"), &g.rms_norm(&gw, 1e-6)?, &c.rms_norm(&cw, 1e-6)?, lim(dt, 1e-10))?;
        let (gs, cs) = p.rand(&[3, 1, 17], dt, -0.5, 0.5)?;
        check(
            &format!("ln_modulate {dt}"),
            &g.layer_norm_modulate(&gs, &gb, 1e-6)?,
            &c.layer_norm_modulate(&cs, &cb, 1e-6)?,
            lim(dt, 1e-10),
        )?;
        check(
            &format!("gated_residual {dt}"),
            &g.gated_residual(&gs, &g)?,
            &c.gated_residual(&cs, &c)?,
            lim(dt, 1e-10),
        )?;
        // matmul: plain, transposed operand, batched with broadcast, linear with bias
        let (ga, ca) = p.rand(&[2, 37, 70], dt, -1.0, 1.0)?;
        let (gm, cm) = p.rand(&[70, 29], dt, -1.0, 1.0)?;
        check(&format!("matmul bcast {dt}"), &ga.matmul(&gm)?, &ca.matmul(&cm)?, lim(dt, 1e-9))?;
        let (gw2, cw2) = p.rand(&[29, 70], dt, -1.0, 1.0)?;
        let (gb2, cb2) = p.rand(&[29], dt, -1.0, 1.0)?;
        check(&format!("linear {dt}"), &ga.linear(&gw2, Some(&gb2))?, &ca.linear(&cw2, Some(&cb2))?, lim(dt, 1e-9))?;
        check(
            &format!("matmul transposed a {dt}"),
            &ga.transpose(1, 2)?.transpose(1, 2)?.matmul(&gm)?,
            &ca.matmul(&cm)?,
            lim(dt, 1e-9),
        )?;
        // attention: plain long, causal, bias + qk norm, strided q
        for (nq, nk, dh, causal, bias, norm) in [
            (67, 1100, 64, false, false, false),
            (77, 77, 64, true, false, false),
            (40, 53, 64, false, true, true),
            (130, 77, 64, false, false, true),
            (65, 300, 128, false, false, false),
            (5, 9, 32, false, false, false),
        ] {
            let (gq, cq) = p.rand(&[2, nq, 3, dh], dt, -1.0, 1.0)?;
            let (gk, ck) = p.rand(&[2, 3, nk, dh], dt, -1.0, 1.0)?;
            let (gv, cv) = p.rand(&[2, 3, nk, dh], dt, -1.0, 1.0)?;
            let (gbias, cbias) = p.rand(&[1, 3, nq, nk], dt, -1.0, 1.0)?;
            let (gn, cn) = p.rand(&[dh], dt, 0.5, 1.5)?;
            let pg = params(causal, bias.then_some(&gbias), norm.then_some(&gn));
            let pc = params(causal, bias.then_some(&cbias), norm.then_some(&cn));
            let og = Tensor::attention(&gq.permute(&[0, 2, 1, 3])?, &gk, &gv, &pg)?;
            let oc = Tensor::attention(&cq.permute(&[0, 2, 1, 3])?, &ck, &cv, &pc)?;
            check(
                &format!("attention {nq}x{nk}x{dh} c{causal} b{bias} n{norm} {dt}"),
                &og,
                &oc,
                lim(dt, 1e-9).max(1e-8),
            )?;
        }
        // conv2d 3x3 pad 1, 1x1, stride 2; group norm; upsample
        let (gx, cx) = p.rand(&[2, 6, 13, 11], dt, -1.0, 1.0)?;
        let (gk3, ck3) = p.rand(&[5, 6, 3, 3], dt, -1.0, 1.0)?;
        let (gkb, ckb) = p.rand(&[5], dt, -1.0, 1.0)?;
        check(
            &format!("conv3x3 {dt}"),
            &gx.conv2d(&gk3, Some(&gkb), 1, 1)?,
            &cx.conv2d(&ck3, Some(&ckb), 1, 1)?,
            lim(dt, 1e-9),
        )?;
        check(
            &format!("conv3x3 s2 {dt}"),
            &gx.conv2d(&gk3, None, 2, 0)?,
            &cx.conv2d(&ck3, None, 2, 0)?,
            lim(dt, 1e-9),
        )?;
        let (gg, cg) = p.rand(&[6], dt, 0.5, 1.5)?;
        check(
            &format!("group_norm {dt}"),
            &gx.group_norm(3, Some(&gg), Some(&gg), 1e-6)?,
            &cx.group_norm(3, Some(&cg), Some(&cg), 1e-6)?,
            lim(dt, 1e-10),
        )?;
        // Groups of more than 65536 elements take the two-pass, many-block path (the VAE's shapes).
        let (gbig, cbig) = p.rand(&[1, 32, 128, 128], dt, -1.0, 3.0)?;
        let (gw4, cw4) = p.rand(&[32], dt, 0.5, 1.5)?;
        check(
            &format!("group_norm large {dt}"),
            &gbig.group_norm(4, Some(&gw4), Some(&gw4), 1e-6)?,
            &cbig.group_norm(4, Some(&cw4), Some(&cw4), 1e-6)?,
            lim(dt, 1e-10),
        )?;
        check(
            &format!("group_norm large strided {dt}"),
            &gbig.transpose(2, 3)?.group_norm(4, None, None, 1e-6)?,
            &cbig.transpose(2, 3)?.group_norm(4, None, None, 1e-6)?,
            lim(dt, 1e-10),
        )?;
        check(&format!("upsample {dt}"), &gx.upsample_nearest2d(2)?, &cx.upsample_nearest2d(2)?, 0.0)?;
        let ids = [3i64, 0, 7, 7, 1];
        let (gt, ct) = p.rand(&[9, 12], dt, -1.0, 1.0)?;
        let gi = p.gpu.from_i64(&ids, &[5])?;
        let ci = p.cpu.from_i64(&ids, &[5])?;
        check(&format!("gather {dt}"), &Tensor::gather(&gt, &gi)?, &Tensor::gather(&ct, &ci)?, 0.0)?;
    }
    Ok(())
}

#[test]
fn out_of_range_gather_is_an_error() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let table = gpu.from_f32(&[1.0; 12], &[3, 4], DType::F32)?;
    let ids = gpu.from_i64(&[1, 5], &[2])?;
    let err = Tensor::gather(&table, &ids).and_then(|t| t.to_f32_vec()).unwrap_err().to_string();
    assert!(err.contains("outside"), "{err}");
    Ok(())
}

#[test]
fn out_of_memory_is_a_clear_error_and_nothing_leaks() -> Result<()> {
    let Some(gpu) = gpu() else { return Ok(()) };
    let err = gpu.empty(&[1 << 40], DType::F32).unwrap_err().to_string();
    assert!(err.contains("out of device memory") && err.contains("requested"), "{err}");
    let t = gpu.full(&[1024, 1024], DType::F32, 2.0)?;
    assert_eq!(t.to_f32_vec()?[12345], 2.0);
    Ok(())
}
