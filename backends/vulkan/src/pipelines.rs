//! The compute shaders (SPIR-V compiled from `shaders/*.comp` by `build.rs`) and their pipelines, created on first
//! use and cached for the device's life. Every shader has the same interface: binding 0 the parameter words,
//! binding 1 the output, bindings 2..=7 the inputs (`shaders/common.glsl`), so one descriptor-set layout and one
//! pipeline layout serve them all.

use crate::vk_error;
use ash::vk;
use sd3_core::Result;

/// Storage-buffer bindings per dispatch: parameters, output, up to six inputs.
pub const BINDINGS: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Elementwise,
    Rows,
    /// Layer norm and layer-norm-modulate over f16 rows in registers, one subgroup per row (rows_vec8.comp).
    RowsVec8,
    Matmul,
    Attention,
    /// Attention for head dims 65..=128.
    Attention128,
    Conv2d,
    /// Convolution as an implicit GEMM (conv_gemm.comp).
    ConvGemm,
    GroupNorm,
    /// The columns of the im2col convolution (im2col.comp; see `conv_im2col.rs`).
    Im2col,
    Gather,
    /// Matmul with at most 8 rows of a and b contiguous along K (matvec.comp).
    Matvec,
    /// Matmul and attention on cooperative matrices (f16 operands), 16x16x16 or 16x8x16 fragments.
    MatmulCoop16,
    MatmulCoop8,
    AttentionCoop16,
    AttentionCoop8,
    /// The cooperative matmul without per-element bounds checks (but for a partial last tile): K a multiple of 64,
    /// vector-loadable operands and an output stored fragment by fragment (matmul_coop_tiles*.comp; see
    /// `coop::TILES_K_STEP`).
    MatmulCoopTiles16,
    MatmulCoopTiles8,
    /// `MatmulCoop16` and `MatmulCoopTiles16` in the KHR extension's form (matmul_khr16.comp,
    /// matmul_khr_tiles16.comp; see `coop::KHR_ENV`).
    MatmulKhr16,
    MatmulKhrTiles16,
    /// Attention on workgroup-scope cooperative matrices (`VK_NV_cooperative_matrix2`; see `coop::CM2_ATTENTION`).
    AttentionCm2,
}

impl Kernel {
    pub const ALL: [Kernel; 21] = [
        Kernel::Elementwise,
        Kernel::Rows,
        Kernel::RowsVec8,
        Kernel::Matmul,
        Kernel::Attention,
        Kernel::Attention128,
        Kernel::Conv2d,
        Kernel::ConvGemm,
        Kernel::GroupNorm,
        Kernel::Im2col,
        Kernel::Gather,
        Kernel::Matvec,
        Kernel::MatmulCoop16,
        Kernel::MatmulCoop8,
        Kernel::AttentionCoop16,
        Kernel::AttentionCoop8,
        Kernel::MatmulCoopTiles16,
        Kernel::MatmulCoopTiles8,
        Kernel::MatmulKhr16,
        Kernel::MatmulKhrTiles16,
        Kernel::AttentionCm2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Elementwise => "elementwise",
            Kernel::Rows => "rows",
            Kernel::RowsVec8 => "rows_vec8",
            Kernel::Matmul => "matmul",
            Kernel::Attention => "attention",
            Kernel::Attention128 => "attention128",
            Kernel::Conv2d => "conv2d",
            Kernel::ConvGemm => "conv_gemm",
            Kernel::GroupNorm => "group_norm",
            Kernel::Im2col => "im2col",
            Kernel::Gather => "gather",
            Kernel::Matvec => "matvec",
            Kernel::MatmulCoop16 => "matmul_coop16",
            Kernel::MatmulCoop8 => "matmul_coop8",
            Kernel::AttentionCoop16 => "attention_coop16",
            Kernel::AttentionCoop8 => "attention_coop8",
            Kernel::MatmulCoopTiles16 => "matmul_coop_tiles16",
            Kernel::MatmulCoopTiles8 => "matmul_coop_tiles8",
            Kernel::MatmulKhr16 => "matmul_khr16",
            Kernel::MatmulKhrTiles16 => "matmul_khr_tiles16",
            Kernel::AttentionCm2 => "attention_cm2",
        }
    }

    /// The SPIR-V of this kernel, or of its variant `<name>_<variant>` (a benchmark alternative; see
    /// [`VARIANT_ENV`]).
    fn spirv(self, variant: Option<&str>) -> Result<&'static [u8]> {
        let name = match variant {
            Some(v) => format!("{}_{v}", self.name()),
            None => self.name().to_string(),
        };
        SHADERS.iter().find(|(n, _)| *n == name).map(|(_, code)| *code).ok_or_else(|| {
            sd3_core::Error::InvalidArgument(format!(
                "vulkan: no shader {name}.comp (set by {VARIANT_ENV}); variants: {}",
                SHADERS.iter().map(|(n, _)| *n).filter(|n| n.starts_with(self.name())).collect::<Vec<_>>().join(", ")
            ))
        })
    }
}

include!(concat!(env!("OUT_DIR"), "/shaders.rs"));

/// Environment switch for benchmarks: `SD3_VULKAN_VARIANT=matmul_coop16:a,attention_coop16:b` builds each named
/// kernel from `shaders/<kernel>_<variant>.comp` (e.g. `matmul_coop16_a.comp`) instead of `shaders/<kernel>.comp`,
/// so one binary can time alternatives of a shader on a device. A variant that does not exist is an error when the
/// kernel's pipeline is first built. (No variant is kept in the tree once measured; `build.rs` compiles any
/// `*.comp` added.)
pub const VARIANT_ENV: &str = "SD3_VULKAN_VARIANT";

fn variants_from_env() -> Vec<(String, String)> {
    std::env::var(VARIANT_ENV)
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

pub struct Pipelines {
    pub set_layout: vk::DescriptorSetLayout,
    pub layout: vk::PipelineLayout,
    cache: [Option<vk::Pipeline>; Kernel::ALL.len()],
    pub created: usize,
    variants: Vec<(String, String)>,
    /// Set where `SD3_VULKAN_PIPELINE_STATS=1` and the device has the extension: print the driver's statistics of
    /// each pipeline created (see [`crate::stats`]).
    pub stats: Option<ash::khr::pipeline_executable_properties::Device>,
}

impl Pipelines {
    pub fn new(device: &ash::Device) -> Result<Pipelines> {
        let bindings: Vec<vk::DescriptorSetLayoutBinding> = (0..BINDINGS)
            .map(|b| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(b)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        // SAFETY: valid create infos; the layouts are destroyed in `destroy`.
        unsafe {
            let set_layout = device
                .create_descriptor_set_layout(&vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings), None)
                .map_err(|e| vk_error("vkCreateDescriptorSetLayout", e))?;
            let layouts = [set_layout];
            let layout = device
                .create_pipeline_layout(&vk::PipelineLayoutCreateInfo::default().set_layouts(&layouts), None)
                .map_err(|e| vk_error("vkCreatePipelineLayout", e))?;
            Ok(Pipelines {
                set_layout,
                layout,
                cache: [None; Kernel::ALL.len()],
                created: 0,
                variants: variants_from_env(),
                stats: None,
            })
        }
    }

    /// The pipeline of `k`, created on first use. A driver that fails to build it gives an error naming the shader.
    pub fn get(&mut self, device: &ash::Device, k: Kernel) -> Result<vk::Pipeline> {
        let slot = Kernel::ALL.iter().position(|&x| x == k).expect("every kernel is in ALL");
        if let Some(p) = self.cache[slot] {
            return Ok(p);
        }
        let variant = self.variants.iter().find(|(n, _)| n == k.name()).map(|(_, v)| v.as_str());
        let code = ash::util::read_spv(&mut std::io::Cursor::new(k.spirv(variant)?)).map_err(|e| {
            sd3_core::Error::backend("vulkan", format!("embedded SPIR-V of {} is invalid: {e}", k.name()))
        })?;
        // SAFETY: valid SPIR-V from glslc; the module is destroyed once the pipeline exists.
        unsafe {
            let module = device
                .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&code), None)
                .map_err(|e| vk_error(&format!("vkCreateShaderModule({})", k.name()), e))?;
            let stage = vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(module)
                .name(c"main");
            let mut info = vk::ComputePipelineCreateInfo::default().stage(stage).layout(self.layout);
            if self.stats.is_some() {
                info = info.flags(vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR);
            }
            let result = device.create_compute_pipelines(vk::PipelineCache::null(), &[info], None);
            device.destroy_shader_module(module, None);
            let p = result.map_err(|(_, e)| vk_error(&format!("building the {} compute pipeline", k.name()), e))?[0];
            self.cache[slot] = Some(p);
            if let Some(ext) = &self.stats {
                crate::stats::print(
                    ext,
                    p,
                    &format!("{}{}", k.name(), variant.map(|v| format!("_{v}")).unwrap_or_default()),
                );
            }
            self.created += 1;
            Ok(p)
        }
    }

    pub fn destroy(&mut self, device: &ash::Device) {
        // SAFETY: the queue is idle.
        unsafe {
            for p in self.cache.iter_mut().filter_map(|p| p.take()) {
                device.destroy_pipeline(p, None);
            }
            device.destroy_pipeline_layout(self.layout, None);
            device.destroy_descriptor_set_layout(self.set_layout, None);
        }
    }
}
