//! The CUDA C kernels, compiled with NVRTC for the present GPU when first needed and cached on disk as PTX,
//! keyed by architecture and source hash (`$XDG_CACHE_HOME/sd3/cuda` or `~/.cache/sd3/cuda`).

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};
use sd3_core::{Error, Result};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

const SOURCES: [&str; 6] = [
    include_str!("../kernels/elementwise.cu"),
    include_str!("../kernels/rows.cu"),
    FLASH_COMMON,
    include_str!("../kernels/flash.cu"),
    include_str!("../kernels/flash_bwd.cu"),
    include_str!("../kernels/gemv.cu"),
];
const COMMON: &str = include_str!("../kernels/common.cuh");
/// The Hopper attention, a module of its own: `wgmma` needs the arch-specific target `compute_90a`, whose PTX
/// loads only on compute capability 9.0.
const HOPPER_SOURCES: [&str; 2] = [FLASH_COMMON, include_str!("../kernels/flash_sm90.cu")];
const FLASH_COMMON: &str = include_str!("../kernels/flash_common.cuh");

/// Every kernel entry point, loaded once per device.
pub struct Kernels {
    _module: Arc<CudaModule>,
    pub ew: CudaFunction,
    pub ew_vec: CudaFunction,
    /// `ew_vec` with 32-bit index arithmetic, for fewer than 2^31 elements.
    pub ew_vec32: CudaFunction,
    pub upsample: CudaFunction,
    /// Nearest upsampling of 16-bit data, eight pixels per thread.
    pub upsample_h8: CudaFunction,
    pub gather: CudaFunction,
    pub row_op: CudaFunction,
    /// Warp-per-row norms for rows of at most 1024, 1536 and 3072 elements, `[f16/bf16 rows][size]`.
    pub row_warp: [[CudaFunction; 3]; 2],
    pub group_norm: CudaFunction,
    pub group_norm_stats: CudaFunction,
    pub group_norm_apply: CudaFunction,
    /// Group norm with 16-byte accesses, for contiguous operands with 8-aligned planes.
    pub group_norm_stats8: CudaFunction,
    pub group_norm_coeffs: CudaFunction,
    pub group_norm_apply8: CudaFunction,
    pub im2col: CudaFunction,
    /// im2col of 16-bit data, eight pixels per thread.
    pub im2col8_h: CudaFunction,
    pub gemv_rows: CudaFunction,
    /// Tensor-core attention, indexed `[bf16 as usize][head_dim == 128]`; `None` before sm_80 (no cp.async or
    /// bf16 mma there).
    pub flash: Option<[[CudaFunction; 2]; 2]>,
    /// The attention's backward (`kernels/flash_bwd.cu`), `[bf16 as usize][dq, dkdv]`; `None` before sm_80.
    pub flash_bwd: Option<[[CudaFunction; 2]; 2]>,
    /// The `wgmma` attention for head dim 64 on compute capability 9.0, `[f16, bf16]`; `None` elsewhere or when
    /// `SD3_CUDA_FLASH90=off` (which keeps the `mma.sync` kernel, for comparison).
    pub flash90: Option<[CudaFunction; 2]>,
    /// Why `flash90` is `None` on a compute-capability-9.0 GPU (e.g. an NVRTC without `compute_90a`), shown by
    /// `sd3 devices`.
    pub flash90_unavailable: Option<String>,
}

/// Dynamic shared memory of `kernels/flash_sm90.cu`: double-buffered K and V tiles of 64 × 64 halves, plus 1 KiB
/// to align them to the 1024-byte swizzle atom.
pub const FLASH90_SMEM_BYTES: u32 = 4 * 64 * 64 * 2 + 1024;

fn source(parts: &[&str]) -> String {
    let mut s = String::from(COMMON);
    for part in parts {
        s.push('\n');
        s.push_str(part);
    }
    s
}

fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("sd3").join("cuda"))
}

fn compile(src: &str, arch: &'static str) -> Result<Ptx> {
    let opts = CompileOptions { arch: Some(arch), options: vec!["--std=c++17".into()], ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts)
        .map_err(|e| Error::backend("cuda", format!("NVRTC failed to compile the kernels for {arch}: {e:?}")))
}

impl Kernels {
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels> {
        let (major, minor) = ctx.compute_capability().map_err(|e| Error::backend("cuda", e.to_string()))?;
        if major < 7 {
            return Err(Error::backend(
                "cuda",
                format!("compute capability {major}.{minor} is older than the 7.0 the kernels need"),
            ));
        }
        let module = load_module(ctx, &source(&SOURCES), format!("compute_{major}{minor}"))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| Error::backend("cuda", format!("kernel `{name}` missing from the module: {e}")))
        };
        // A failure here (e.g. an NVRTC too old for `compute_90a`) leaves the Hopper attention out, with the reason
        // kept for `sd3 devices`; the sm_80 kernel covers its calls.
        let (flash90, flash90_unavailable) = match (major, minor) {
            (9, 0) => match load_flash90(ctx) {
                Ok(f) => (f, None),
                Err(e) => (None, Some(e.to_string())),
            },
            _ => (None, None),
        };
        Ok(Kernels {
            ew: f("ew")?,
            ew_vec: f("ew_vec")?,
            ew_vec32: f("ew_vec32")?,
            upsample: f("upsample_nearest2d")?,
            upsample_h8: f("upsample_nearest2d_h8")?,
            gather: f("gather_rows")?,
            row_op: f("row_op")?,
            row_warp: [
                [f("row_warp4")?, f("row_warp6")?, f("row_warp12")?],
                [f("row_warp4_h")?, f("row_warp6_h")?, f("row_warp12_h")?],
            ],
            group_norm: f("group_norm")?,
            group_norm_stats: f("group_norm_stats")?,
            group_norm_apply: f("group_norm_apply")?,
            group_norm_stats8: f("group_norm_stats8")?,
            group_norm_coeffs: f("group_norm_coeffs")?,
            group_norm_apply8: f("group_norm_apply8")?,
            im2col: f("im2col")?,
            im2col8_h: f("im2col8_h")?,
            gemv_rows: f("gemv_rows")?,
            flash: if major >= 8 { Some(load_flash(&f)?) } else { None },
            flash_bwd: if major >= 8 {
                let bwd = |name: &str| flash_fn(&f, name, 64, 64);
                Some([
                    [bwd("flash_bwd_dq_f16")?, bwd("flash_bwd_dkdv_f16")?],
                    [bwd("flash_bwd_dq_bf16")?, bwd("flash_bwd_dkdv_bf16")?],
                ])
            } else {
                None
            },
            flash90,
            flash90_unavailable,
            _module: module,
        })
    }
}

/// Compiles `src` for `arch` (or takes it from the disk cache) and loads it.
fn load_module(ctx: &Arc<CudaContext>, src: &str, arch: String) -> Result<Arc<CudaModule>> {
    let arch: &'static str = Box::leak(arch.into_boxed_str());
    let mut h = DefaultHasher::new();
    src.hash(&mut h);
    arch.hash(&mut h);
    let key = format!("{arch}-{:016x}.ptx", h.finish());
    let cached = cache_dir().map(|d| d.join(&key));
    let ptx = match cached.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        Some(text) => Ptx::from_src(text),
        None => {
            let ptx = compile(src, arch)?;
            if let (Some(path), Some(dir)) = (&cached, cache_dir()) {
                // The cache is an optimisation: failing to write it is not an error.
                let _ = std::fs::create_dir_all(dir).and_then(|_| std::fs::write(path, ptx.to_src()));
            }
            ptx
        }
    };
    ctx.load_module(ptx).map_err(|e| Error::backend("cuda", format!("loading the kernel module for {arch}: {e}")))
}

/// The Hopper attention, unless `SD3_CUDA_FLASH90=off`.
fn load_flash90(ctx: &Arc<CudaContext>) -> Result<Option<[CudaFunction; 2]>> {
    if std::env::var("SD3_CUDA_FLASH90").is_ok_and(|v| v == "off") {
        return Ok(None);
    }
    let module = load_module(ctx, &source(&HOPPER_SOURCES), "compute_90a".into())?;
    let load = |name: &str| -> Result<CudaFunction> {
        let func = module
            .load_function(name)
            .map_err(|e| Error::backend("cuda", format!("kernel `{name}` missing from the module: {e}")))?;
        func.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            FLASH90_SMEM_BYTES as i32,
        )
        .map_err(|e| Error::backend("cuda", format!("kernel `{name}`: cannot reserve shared memory: {e}")))?;
        Ok(func)
    };
    Ok(Some([load("flash90_f16")?, load("flash90_bf16")?]))
}

/// Dynamic shared memory of the flash kernels: double-buffered K and V tiles of `key_tile` rows, rows padded by
/// 8 elements (mirrors `kernels/flash.cu`).
pub fn flash_smem_bytes(head_dim: usize, key_tile: usize) -> u32 {
    (4 * key_tile * (head_dim + 8) * 2) as u32
}

fn flash_fn(
    f: &dyn Fn(&str) -> Result<CudaFunction>,
    name: &str,
    head_dim: usize,
    key_tile: usize,
) -> Result<CudaFunction> {
    let func = f(name)?;
    // Above 48 KiB a kernel must opt in to dynamic shared memory.
    func.set_attribute(
        cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        flash_smem_bytes(head_dim, key_tile) as i32,
    )
    .map_err(|e| Error::backend("cuda", format!("kernel `{name}`: cannot reserve shared memory: {e}")))?;
    Ok(func)
}

fn load_flash(f: &dyn Fn(&str) -> Result<CudaFunction>) -> Result<[[CudaFunction; 2]; 2]> {
    Ok([
        [flash_fn(f, "flash_f16_64", 64, 64)?, flash_fn(f, "flash_f16_128", 128, 64)?],
        [flash_fn(f, "flash_bf16_64", 64, 64)?, flash_fn(f, "flash_bf16_128", 128, 64)?],
    ])
}
