//! Whether a device runs matmul and attention on cooperative matrices (tensor cores), and with which fragment
//! shape. The subgroup-scope shaders use `GL_NV_cooperative_matrix` (the form the distributions' glslc compiles;
//! NVIDIA's drivers offer it beside the KHR one), f16 operands with f32 accumulation, subgroups of 32. Where
//! glslang 15 built them and the device's `VK_KHR_cooperative_matrix` lists the 16x16x16 f16 shape, the matmuls run
//! in the KHR form instead (faster on NVIDIA's driver, see [`KHR_ENV`]), and the attention on workgroup scope
//! (`VK_NV_cooperative_matrix2`) where the device has it. Everything else (lavapipe, other GPUs, f32/bf16 operands)
//! runs the scalar shaders.

use crate::instance::{CoopShape, PhysicalDevice};
use crate::pipelines::Kernel;

/// Shared memory the cooperative attention shader declares (`attention_coop.glsl`: K, V, P tiles in f16 and the
/// per-subgroup f32 score slices).
pub const ATTENTION_SHARED_BYTES: u32 = 2 * (64 * 72 * 2) + 4 * 16 * 72 * 2 + 4 * 16 * 68 * 4;
// Within the 48 KiB every NVIDIA Vulkan driver offers.
const _: () = assert!(ATTENTION_SHARED_BYTES <= 48 * 1024);
/// Environment switch: `SD3_VULKAN_COOP=0` keeps a capable device on the scalar shaders (for comparisons).
pub const DISABLE_ENV: &str = "SD3_VULKAN_COOP";
/// Environment switch: `SD3_VULKAN_COOP_SHAPE=16x8x16` makes a device that lists both shapes use the 16x8x16
/// kernels (to test them on a device that would pick 16x16x16).
pub const SHAPE_ENV: &str = "SD3_VULKAN_COOP_SHAPE";
/// Environment switch: `SD3_VULKAN_CM2=0` keeps a device with `VK_NV_cooperative_matrix2` on the subgroup-scope
/// cooperative shaders (for comparisons).
pub const CM2_ENV: &str = "SD3_VULKAN_CM2";
/// Environment switch: `SD3_VULKAN_KHR=0` runs the cooperative matmuls in `VK_NV_cooperative_matrix`'s form
/// (`matmul_coop16.comp`, `matmul_coop_tiles16.comp`) on a device whose KHR extension lists the 16x16x16 f16 shape,
/// where they otherwise run in the KHR form (`matmul_khr16.comp`, `matmul_khr_tiles16.comp`): on NVIDIA's driver
/// the same products run 1.6× faster in that form, and the forward 17% faster (docs/performance.md, "The KHR form
/// and the attention's tiles").
pub const KHR_ENV: &str = "SD3_VULKAN_KHR";
/// Workgroup size and the (query rows, key tile, head dim) of `attention_cm2.comp`: the device must list a
/// workgroup-scope f16 shape for this many invocations whose granularities divide them.
pub const CM2_ATTENTION: (u32, (u32, u32, u32)) = (256, (128, 32, 64));

/// Timing only: `SD3_VULKAN_CM2_ROWS=128` sets the query rows per workgroup of `attention_cm2.comp`'s grid, for
/// `SD3_VULKAN_VARIANT` builds of it with another `BR`. Default the landed shader's 128.
pub const CM2_ROWS_ENV: &str = "SD3_VULKAN_CM2_ROWS";

pub fn cm2_attention_rows() -> usize {
    static ROWS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        let rows = std::env::var(CM2_ROWS_ENV).ok().and_then(|v| v.parse().ok()).filter(|&r: &usize| r > 0);
        rows.unwrap_or(CM2_ATTENTION.1 .0 as usize)
    })
}

/// The K step of the whole-tile matmul (`matmul_coop_tiles*.comp`): it runs where K is a multiple of this, both
/// operands are f16 and contiguous along K in 16-byte aligned rows, and y is f16 or f32, contiguous along N, with
/// 16-byte aligned rows (M and N any: only a last partial tile checks bounds). Everything else runs
/// `matmul_coop*.comp`.
pub const TILES_K_STEP: usize = 64;

/// Timing only: `SD3_VULKAN_TILES=256x128` sets the whole-tile kernel's (rows, columns) per workgroup, for
/// `SD3_VULKAN_VARIANT` builds of it with other subgroup grids (a `matmul_khr_tiles16_<variant>.comp` that sets
/// `WGM`, `WGN`, `WM`, `WN`; `scripts/bench_vulkan_khr.sh tiles`). Default 128x128, the landed kernels' tile.
pub const TILES_ENV: &str = "SD3_VULKAN_TILES";

pub fn tiles_block() -> (usize, usize) {
    static TILE: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    *TILE.get_or_init(|| {
        std::env::var(TILES_ENV)
            .ok()
            .and_then(|v| v.split_once('x').and_then(|(m, n)| Some((m.parse().ok()?, n.parse().ok()?))))
            .filter(|&(m, n): &(usize, usize)| m > 0 && n > 0)
            .unwrap_or((128, 128))
    })
}

/// The cooperative-matrix kernels a device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopKernels {
    pub matmul: Kernel,
    /// The matmul for whole tiles (see [`TILES_K_STEP`]).
    pub matmul_tiles: Kernel,
    pub attention: Kernel,
    /// Fragment shape M x N x K.
    pub shape: (u32, u32, u32),
    /// The workgroup-scope shaders (`*_cm2.comp`, `VK_NV_cooperative_matrix2`) run where they apply.
    pub cm2: bool,
    /// The matmuls are the KHR form's (the device needs `VK_KHR_cooperative_matrix` enabled).
    pub khr: bool,
}

/// The features the cooperative shaders need, as a device reports them.
#[derive(Clone, Debug, Default)]
pub struct CoopSupport<'a> {
    pub nv_extension: bool,
    pub shader_float16: bool,
    pub vulkan_memory_model: bool,
    pub subgroup_size: u32,
    pub shared_memory: u32,
    pub shapes: &'a [CoopShape],
    /// `VK_NV_cooperative_matrix2` covers the `*_cm2.comp` shaders, with 16-bit storage (see [`crate::cm2`]).
    pub cm2: bool,
    /// `VK_KHR_cooperative_matrix` lists f16 16x16x16 at subgroup scope, and the `*_khr*.comp` shaders were built.
    pub khr: bool,
}

impl<'a> CoopSupport<'a> {
    pub fn of(p: &'a PhysicalDevice) -> CoopSupport<'a> {
        CoopSupport {
            nv_extension: p.cooperative_matrix_nv,
            shader_float16: p.shader_float16,
            vulkan_memory_model: p.vulkan_memory_model,
            subgroup_size: p.subgroup_size,
            shared_memory: p.limits.max_compute_shared_memory_size,
            shapes: &p.coop_shapes,
            cm2: crate::pipelines::CM2_SHADERS_BUILT && p.storage_16bit && p.cm2.runs(CM2_ATTENTION.0, CM2_ATTENTION.1),
            khr: crate::pipelines::CM2_SHADERS_BUILT
                && p.cooperative_matrix
                && p.coop_shapes.iter().any(|c| !c.nv && c.is_f16_f32() && (c.m, c.n, c.k) == (16, 16, 16)),
        }
    }
}

/// The kernels to use, or None (then the scalar shaders run everything). Prefers 16x16x16 fragments.
pub fn select(s: &CoopSupport) -> Option<CoopKernels> {
    select_shape(s, false)
}

/// [`select`], or with `narrow` the 16x8x16 kernels wherever the device lists that shape.
pub fn select_shape(s: &CoopSupport, narrow: bool) -> Option<CoopKernels> {
    if !(s.nv_extension && s.shader_float16 && s.vulkan_memory_model)
        || s.subgroup_size != 32
        || s.shared_memory < ATTENTION_SHARED_BYTES
    {
        return None;
    }
    let listed = |m, n, k| s.shapes.iter().any(|c| c.nv && c.is_f16_f32() && (c.m, c.n, c.k) == (m, n, k));
    if listed(16, 16, 16) && !(narrow && listed(16, 8, 16)) {
        Some(CoopKernels {
            matmul: if s.khr { Kernel::MatmulKhr16 } else { Kernel::MatmulCoop16 },
            matmul_tiles: if s.khr { Kernel::MatmulKhrTiles16 } else { Kernel::MatmulCoopTiles16 },
            attention: Kernel::AttentionCoop16,
            shape: (16, 16, 16),
            cm2: s.cm2,
            khr: s.khr,
        })
    } else if listed(16, 8, 16) {
        Some(CoopKernels {
            matmul: Kernel::MatmulCoop8,
            matmul_tiles: Kernel::MatmulCoopTiles8,
            attention: Kernel::AttentionCoop8,
            shape: (16, 8, 16),
            cm2: s.cm2,
            khr: false,
        })
    } else {
        None
    }
}

/// [`select`], unless `SD3_VULKAN_COOP=0`.
pub fn select_for(p: &PhysicalDevice) -> Option<CoopKernels> {
    if std::env::var(DISABLE_ENV).is_ok_and(|v| v == "0") {
        return None;
    }
    let narrow = std::env::var(SHAPE_ENV).is_ok_and(|v| v == "16x8x16");
    let mut s = CoopSupport::of(p);
    s.cm2 &= !std::env::var(CM2_ENV).is_ok_and(|v| v == "0");
    s.khr &= !std::env::var(KHR_ENV).is_ok_and(|v| v == "0");
    select_shape(&s, narrow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ash::vk::ComponentTypeKHR as T;

    fn shape(m: u32, n: u32, k: u32, ab: T, acc: T, nv: bool) -> CoopShape {
        CoopShape { m, n, k, ab, c: acc, result: acc, nv }
    }

    fn nvidia(shapes: &[CoopShape]) -> CoopSupport<'_> {
        CoopSupport {
            nv_extension: true,
            shader_float16: true,
            vulkan_memory_model: true,
            subgroup_size: 32,
            shared_memory: 49152,
            shapes,
            cm2: false,
            khr: false,
        }
    }

    #[test]
    fn the_khr_form_of_the_matmuls_only_where_supported() {
        let both = [shape(16, 16, 16, T::FLOAT16, T::FLOAT32, true), shape(16, 16, 16, T::FLOAT16, T::FLOAT32, false)];
        let k = select(&CoopSupport { khr: true, ..nvidia(&both) }).unwrap();
        assert_eq!((k.matmul_tiles, k.matmul, k.khr), (Kernel::MatmulKhrTiles16, Kernel::MatmulKhr16, true));
        assert_eq!(select(&nvidia(&both)).unwrap().matmul_tiles, Kernel::MatmulCoopTiles16);
        // The 16x8x16 kernels have no KHR form.
        let three = [both[0], both[1], shape(16, 8, 16, T::FLOAT16, T::FLOAT32, true)];
        let k = select_shape(&CoopSupport { khr: true, ..nvidia(&three) }, true).unwrap();
        assert_eq!((k.matmul_tiles, k.khr), (Kernel::MatmulCoopTiles8, false));
    }

    #[test]
    fn prefers_16x16x16_then_16x8x16() {
        let both = [shape(16, 8, 16, T::FLOAT16, T::FLOAT32, true), shape(16, 16, 16, T::FLOAT16, T::FLOAT32, true)];
        assert_eq!(select(&nvidia(&both)).unwrap().matmul, Kernel::MatmulCoop16);
        let narrow = [shape(16, 8, 16, T::FLOAT16, T::FLOAT32, true)];
        let k = select(&nvidia(&narrow)).unwrap();
        assert_eq!((k.matmul, k.attention, k.shape), (Kernel::MatmulCoop8, Kernel::AttentionCoop8, (16, 8, 16)));
        assert_eq!(select_shape(&nvidia(&both), true).unwrap().matmul, Kernel::MatmulCoop8);
        let wide = [shape(16, 16, 16, T::FLOAT16, T::FLOAT32, true)];
        assert_eq!(select_shape(&nvidia(&wide), true).unwrap().matmul, Kernel::MatmulCoop16);
    }

    #[test]
    fn workgroup_scope_shaders_follow_the_support() {
        let ok = [shape(16, 16, 16, T::FLOAT16, T::FLOAT32, true)];
        assert!(!select(&nvidia(&ok)).unwrap().cm2);
        assert!(select(&CoopSupport { cm2: true, ..nvidia(&ok) }).unwrap().cm2);
        let narrow = [shape(16, 8, 16, T::FLOAT16, T::FLOAT32, true)];
        assert!(select(&CoopSupport { cm2: true, ..nvidia(&narrow) }).unwrap().cm2);
        // Without the subgroup-scope shapes nothing cooperative runs, the workgroup-scope attention included.
        assert_eq!(select(&CoopSupport { cm2: true, ..nvidia(&[]) }), None);
    }

    #[test]
    fn declines_what_the_shaders_cannot_use() {
        // f16 accumulation only, KHR-only listings, no listing at all.
        let f16acc = [shape(16, 16, 16, T::FLOAT16, T::FLOAT16, true)];
        assert_eq!(select(&nvidia(&f16acc)), None);
        let khr = [shape(16, 16, 16, T::FLOAT16, T::FLOAT32, false)];
        assert_eq!(select(&nvidia(&khr)), None);
        assert_eq!(select(&nvidia(&[])), None);
        let ok = [shape(16, 16, 16, T::FLOAT16, T::FLOAT32, true)];
        let base = nvidia(&ok);
        assert!(select(&base).is_some());
        for broken in [
            CoopSupport { nv_extension: false, ..base.clone() },
            CoopSupport { shader_float16: false, ..base.clone() },
            CoopSupport { vulkan_memory_model: false, ..base.clone() },
            CoopSupport { subgroup_size: 64, ..base.clone() },
            CoopSupport { shared_memory: 32768, ..base.clone() },
        ] {
            assert_eq!(select(&broken), None, "{broken:?}");
        }
    }
}
