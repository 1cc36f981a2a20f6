//! The Tensor API on the reference device: views, broadcasting, linear, cat, fallback.

use sd3_core::reference::ReferenceDevice;
use sd3_core::{Backend, DType, Device, Op, OpCall, Result, Tensor};
use std::sync::Arc;

fn backend() -> Backend {
    Backend::new("reference", Arc::new(ReferenceDevice::new()))
}

#[test]
fn linear_matches_hand_computation() -> Result<()> {
    let b = backend();
    let x = b.from_f32(&[1., 2., 3., 4., 5., 6.], &[2, 3], DType::F32)?;
    let w = b.from_f32(&[1., 0., -1., 2., 1., 0.], &[2, 3], DType::F32)?;
    let bias = b.from_f32(&[0.5, -0.5], &[2], DType::F32)?;
    let y = x.linear(&w, Some(&bias))?;
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(y.to_f32_vec()?, vec![1. - 3. + 0.5, 2. + 2. - 0.5, 4. - 6. + 0.5, 8. + 5. - 0.5]);
    Ok(())
}

#[test]
fn views_broadcast_and_cat() -> Result<()> {
    let b = backend();
    let x = b.from_f32(&(0..6).map(|v| v as f32).collect::<Vec<_>>(), &[2, 3], DType::F32)?;
    assert_eq!(x.transpose(0, 1)?.to_f32_vec()?, vec![0., 3., 1., 4., 2., 5.]);
    assert_eq!(x.narrow(1, 1, 2)?.to_f32_vec()?, vec![1., 2., 4., 5.]);
    let row = b.from_f32(&[10., 20., 30.], &[3], DType::F32)?;
    assert_eq!(x.add(&row)?.to_f32_vec()?, vec![10., 21., 32., 13., 24., 35.]);
    let c = Tensor::cat(&[&x, &x.scale(2.0)?], 0)?;
    assert_eq!(c.shape(), &[4, 3]);
    assert_eq!(c.to_f32_vec()?[6..], [0., 2., 4., 6., 8., 10.]);
    let h = x.to_dtype(DType::F16)?;
    assert_eq!(h.dtype(), DType::F16);
    assert_eq!(h.to_f32_vec()?, x.to_f32_vec()?);
    Ok(())
}

/// A device that declines every op except fill, to exercise the host fallback.
struct FillOnly(ReferenceDevice);
impl Device for FillOnly {
    fn info(&self) -> sd3_core::DeviceInfo {
        self.0.info()
    }
    fn alloc(&self, n: usize) -> Result<sd3_core::BufferId> {
        self.0.alloc(n)
    }
    fn free(&self, b: sd3_core::BufferId) {
        self.0.free(b)
    }
    fn upload(&self, b: sd3_core::BufferId, o: usize, d: &[u8]) -> Result<()> {
        self.0.upload(b, o, d)
    }
    fn download(&self, b: sd3_core::BufferId, o: usize, d: &mut [u8]) -> Result<()> {
        self.0.download(b, o, d)
    }
    fn copy_buffer(&self, s: sd3_core::BufferId, so: usize, d: sd3_core::BufferId, d_o: usize, n: usize) -> Result<()> {
        self.0.copy_buffer(s, so, d, d_o, n)
    }
    fn supports(&self, call: &OpCall) -> bool {
        matches!(call.op, Op::Fill { .. })
    }
    fn execute(&self, call: &OpCall) -> Result<()> {
        self.0.execute(call)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

#[test]
fn unsupported_ops_fall_back_and_are_counted() -> Result<()> {
    let dev = Arc::new(FillOnly(ReferenceDevice::new()));
    let b = Backend::with_fallback("fill-only", dev.clone(), Arc::new(ReferenceDevice::new()), false);
    let x = b.from_f32(&[1., 2., 3., 4.], &[2, 2], DType::F32)?;
    let y = Tensor::cat(&[&x.narrow(1, 1, 1)?, &x.silu()?], 1)?;
    assert_eq!(y.shape(), &[2, 3]);
    assert!(b.fallback_counts()["copy"] >= 2);
    assert_eq!(b.fallback_counts()["unary.silu"], 1);
    let strict = Backend::with_fallback("fill-only", dev, Arc::new(ReferenceDevice::new()), true);
    let x = strict.from_f32(&[1., 2.], &[2], DType::F32)?;
    let err = x.silu().unwrap_err().to_string();
    assert!(err.contains("unary.silu") && err.contains("--strict"), "{err}");
    Ok(())
}

fn ramp(b: &Backend, shape: &[usize], seed: u32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> =
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) % 97).map(|v| v as f32 / 48.0 - 1.0).collect();
    b.from_f32(&v, shape, DType::F32)
}

/// The `_into` forms write rows of a bigger buffer (the MM-DiT's joint q/k/v) and leave the other rows alone;
/// the values are those of the allocating forms.
#[test]
fn into_forms_write_views_of_a_bigger_buffer() -> Result<()> {
    let b = backend();
    let (bs, n, s, k, m) = (2, 5, 3, 8, 6);
    let (x, c) = (ramp(&b, &[bs, n, k], 1)?, ramp(&b, &[bs, s, k], 2)?);
    let (w, bias) = (ramp(&b, &[m, k], 3)?, ramp(&b, &[m], 4)?);
    let joint = b.full(&[bs, n + s, m], DType::F32, 9.0)?;
    let gelu = Some(sd3_core::UnaryOp::GeluTanh);
    // Rows 0..n and n..n+s of each batch: the leading dims do not merge, so these are batched matmuls.
    x.linear_into(&w, Some(&bias), gelu, &joint.narrow(1, 0, n)?)?;
    assert!(joint.narrow(1, n, s)?.to_f32_vec()?.iter().all(|&v| v == 9.0), "text rows untouched");
    c.linear_into(&w, Some(&bias), None, &joint.narrow(1, n, s)?)?;
    assert_eq!(joint.narrow(1, 0, n)?.to_f32_vec()?, x.linear_act(&w, Some(&bias), gelu)?.to_f32_vec()?);
    assert_eq!(joint.narrow(1, n, s)?.to_f32_vec()?, c.linear(&w, Some(&bias))?.to_f32_vec()?);
    // And the other way round: a strided input (rows of the joint buffer) into a fresh output.
    let w2 = ramp(&b, &[4, m], 7)?;
    let via_rows = joint.narrow(1, n, s)?.linear(&w2, None)?.to_f32_vec()?;
    assert_eq!(via_rows, c.linear(&w, Some(&bias))?.linear(&w2, None)?.to_f32_vec()?);

    // Attention through a heads-first view of a tokens-first buffer: merging heads is then a plain reshape.
    let (h, dh) = (2, 4);
    let qkv = ramp(&b, &[bs, n, 3, h, dh], 5)?;
    let part = |i: usize| qkv.narrow(2, i, 1).and_then(|t| t.squeeze(2)).and_then(|t| t.permute(&[0, 2, 1, 3]));
    let p = sd3_core::AttentionParams::new(0.5);
    let want = Tensor::attention(&part(0)?, &part(1)?, &part(2)?, &p)?.permute(&[0, 2, 1, 3])?.to_f32_vec()?;
    let o = b.empty(&[bs, n, h, dh], DType::F32)?;
    Tensor::attention_into(&part(0)?, &part(1)?, &part(2)?, &p, &o.permute(&[0, 2, 1, 3])?)?;
    assert_eq!(o.to_f32_vec()?, want);

    let wn = ramp(&b, &[dh], 6)?;
    let qn = b.full(&[bs, n, h, dh], DType::F32, 0.0)?;
    part(0)?.permute(&[0, 2, 1, 3])?.rms_norm_into(&wn, 1e-6, &qn)?;
    assert_eq!(qn.to_f32_vec()?, part(0)?.permute(&[0, 2, 1, 3])?.rms_norm(&wn, 1e-6)?.to_f32_vec()?);
    assert!(x.linear_into(&w, None, None, &joint).is_err(), "an output of the wrong shape is an error");
    Ok(())
}
