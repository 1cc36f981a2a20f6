//! The Vulkan loader, the instance, and what each physical device offers (`sd3 devices` shows it).
//!
//! The loader (`libvulkan.so.1`) is opened at run time through `ash`'s `loaded` feature, so a machine without it
//! gets an error naming the reason instead of a failed link.

use crate::vk_error;
use ash::vk;
use sd3_core::{DType, DeviceInfo, DeviceKind, Error, Result};
use std::ffi::CStr;
use std::sync::Arc;

/// The loaded library and one instance; destroyed when the provider and every device opened from it are gone.
pub struct VkInstance {
    pub entry: ash::Entry,
    pub instance: ash::Instance,
}

impl Drop for VkInstance {
    fn drop(&mut self) {
        // SAFETY: every child object (devices) holds an `Arc` to this instance and is dropped first.
        unsafe { self.instance.destroy_instance(None) };
    }
}

impl VkInstance {
    /// Load the Vulkan loader and create an instance (for Vulkan 1.3: the cooperative-matrix-2 shaders are
    /// SPIR-V 1.6; devices of 1.2 still qualify and run the others).
    pub fn new() -> Result<Arc<VkInstance>> {
        // SAFETY: loading the system's Vulkan loader library; ash resolves its entry points.
        let entry = unsafe { ash::Entry::load() }.map_err(|e| {
            Error::backend(
                "vulkan",
                format!(
                    "cannot load the Vulkan loader (libvulkan.so.1): {e}; install it (Debian/Ubuntu: \
                     `apt-get install libvulkan1` plus a driver, e.g. mesa-vulkan-drivers for the CPU device)"
                ),
            )
        })?;
        let app = vk::ApplicationInfo::default()
            .application_name(c"sd3")
            .engine_name(c"sd3")
            .api_version(vk::API_VERSION_1_3);
        let info = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: valid create info; no layers or extensions.
        let instance = unsafe { entry.create_instance(&info, None) }.map_err(|e| match e {
            vk::Result::ERROR_INCOMPATIBLE_DRIVER => Error::backend(
                "vulkan",
                format!(
                    "vkCreateInstance: {e}: the loader found no usable Vulkan 1.2 driver (ICD); install one \
                     (the GPU vendor's, or mesa-vulkan-drivers for the CPU device); VK_LOADER_DEBUG=driver shows why"
                ),
            ),
            e => vk_error("vkCreateInstance", e),
        })?;
        Ok(Arc::new(VkInstance { entry, instance }))
    }
}

/// One physical device and the properties the backend uses or reports.
#[derive(Clone, Debug)]
pub struct PhysicalDevice {
    pub handle: vk::PhysicalDevice,
    pub name: String,
    pub kind: DeviceKind,
    /// A discrete GPU (its tensors go in memory that is not host-visible by default; see `HOST_VISIBLE_ENV`).
    pub discrete: bool,
    pub vendor_id: u32,
    pub device_id: u32,
    pub api_version: u32,
    pub driver: String,
    /// (size in bytes, device-local) of each memory heap.
    pub heaps: Vec<(u64, bool)>,
    /// Each memory type as `heap:flags` (DL device-local, HV host-visible, HC host-coherent, HK host-cached).
    pub memory_types: Vec<String>,
    pub shader_float16: bool,
    pub storage_16bit: bool,
    /// `VK_KHR_cooperative_matrix` is offered (listed; the shaders use the NV form, see [`CoopShape`]).
    pub cooperative_matrix: bool,
    /// `VK_NV_cooperative_matrix` is offered with its `cooperativeMatrix` feature: the form glslc 2023 compiles.
    pub cooperative_matrix_nv: bool,
    /// The cooperative-matrix shapes and types the device lists (KHR and NV queries).
    pub coop_shapes: Vec<CoopShape>,
    /// What the device offers of `VK_NV_cooperative_matrix2` (with `VK_KHR_cooperative_matrix`, on Vulkan 1.3).
    pub cm2: crate::cm2::Support,
    pub vulkan_memory_model: bool,
    pub subgroup_size: u32,
    /// Subgroup arithmetic (`subgroupAdd`) in compute shaders: `rows_vec8.comp` needs it.
    pub subgroup_arithmetic: bool,
    pub limits: vk::PhysicalDeviceLimits,
    pub max_memory_allocation: u64,
    /// A queue family with compute support.
    pub compute_family: Option<u32>,
    /// Valid bits of that family's timestamps (0: no timestamp queries).
    pub timestamp_bits: u32,
}

/// One cooperative-matrix configuration a device lists: MxNxK with the A/B, C and result component types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopShape {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub ab: vk::ComponentTypeKHR,
    pub c: vk::ComponentTypeKHR,
    pub result: vk::ComponentTypeKHR,
    /// Listed by the NV query (else the KHR one).
    pub nv: bool,
}

impl CoopShape {
    /// f16 inputs with f32 accumulation, the form the cooperative-matrix shaders use.
    pub fn is_f16_f32(&self) -> bool {
        self.ab == vk::ComponentTypeKHR::FLOAT16
            && self.c == vk::ComponentTypeKHR::FLOAT32
            && self.result == vk::ComponentTypeKHR::FLOAT32
    }

    fn describe(&self) -> String {
        let t = |c: vk::ComponentTypeKHR| match c {
            vk::ComponentTypeKHR::FLOAT16 => "f16".to_string(),
            vk::ComponentTypeKHR::FLOAT32 => "f32".to_string(),
            vk::ComponentTypeKHR::SINT8 => "i8".to_string(),
            vk::ComponentTypeKHR::UINT8 => "u8".to_string(),
            vk::ComponentTypeKHR::SINT32 => "i32".to_string(),
            vk::ComponentTypeKHR::UINT32 => "u32".to_string(),
            other => format!("{other:?}"),
        };
        format!(
            "{}x{}x{}:{}->{}{}",
            self.m,
            self.n,
            self.k,
            t(self.ab),
            t(self.result),
            if self.nv { "(nv)" } else { "" }
        )
    }
}

/// The cooperative-matrix configurations of `h` (subgroup scope only), from whichever extensions it offers.
unsafe fn coop_shapes(inst: &VkInstance, h: vk::PhysicalDevice, khr: bool, nv: bool) -> Vec<CoopShape> {
    let mut out = Vec::new();
    if khr {
        let ext = ash::khr::cooperative_matrix::Instance::new(&inst.entry, &inst.instance);
        for p in ext.get_physical_device_cooperative_matrix_properties(h).unwrap_or_default() {
            if p.scope == vk::ScopeKHR::SUBGROUP {
                let (m, n, k) = (p.m_size, p.n_size, p.k_size);
                out.push(CoopShape { m, n, k, ab: p.a_type, c: p.c_type, result: p.result_type, nv: false });
            }
        }
    }
    if nv {
        let ext = ash::nv::cooperative_matrix::Instance::new(&inst.entry, &inst.instance);
        let f = ext.fp().get_physical_device_cooperative_matrix_properties_nv;
        let mut count = 0u32;
        if f(h, &mut count, std::ptr::null_mut()) == vk::Result::SUCCESS && count > 0 {
            let mut props = vec![vk::CooperativeMatrixPropertiesNV::default(); count as usize];
            if f(h, &mut count, props.as_mut_ptr()) == vk::Result::SUCCESS {
                for p in &props[..count as usize] {
                    if p.scope == vk::ScopeKHR::SUBGROUP {
                        let (m, n, k) = (p.m_size, p.n_size, p.k_size);
                        out.push(CoopShape { m, n, k, ab: p.a_type, c: p.c_type, result: p.d_type, nv: true });
                    }
                }
            }
        }
    }
    out
}

fn c_chars(s: &[std::ffi::c_char]) -> String {
    CStr::from_bytes_until_nul(bytemuck_chars(s)).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

fn bytemuck_chars(s: &[std::ffi::c_char]) -> &[u8] {
    // SAFETY: c_char and u8 have the same size and alignment.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
}

/// Every physical device of the instance that supports Vulkan 1.2.
pub fn enumerate(inst: &VkInstance) -> Result<(Vec<PhysicalDevice>, Vec<String>)> {
    let i = &inst.instance;
    // SAFETY: valid instance.
    let handles = unsafe { i.enumerate_physical_devices() }.map_err(|e| vk_error("vkEnumeratePhysicalDevices", e))?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for h in handles {
        // SAFETY: `h` comes from this instance; the chained structs live through each call.
        unsafe {
            let props = i.get_physical_device_properties(h);
            let name = c_chars(&props.device_name);
            if props.api_version < vk::API_VERSION_1_2 {
                skipped.push(format!(
                    "{name}: Vulkan {}.{} < 1.2",
                    vk::api_version_major(props.api_version),
                    vk::api_version_minor(props.api_version)
                ));
                continue;
            }
            let mut driver = vk::PhysicalDeviceDriverProperties::default();
            let mut maint3 = vk::PhysicalDeviceMaintenance3Properties::default();
            let mut subgroup = vk::PhysicalDeviceSubgroupProperties::default();
            let mut p2 = vk::PhysicalDeviceProperties2::default()
                .push_next(&mut driver)
                .push_next(&mut maint3)
                .push_next(&mut subgroup);
            i.get_physical_device_properties2(h, &mut p2);
            let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
            let mut f16s = vk::PhysicalDevice16BitStorageFeatures::default();
            let exts = i.enumerate_device_extension_properties(h).unwrap_or_default();
            let has = |name: &CStr| exts.iter().any(|e| c_chars(&e.extension_name) == name.to_string_lossy());
            let cooperative_matrix = has(vk::KHR_COOPERATIVE_MATRIX_NAME);
            let nv_ext = has(vk::NV_COOPERATIVE_MATRIX_NAME);
            let mut fnv = vk::PhysicalDeviceCooperativeMatrixFeaturesNV::default();
            let mut f2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut f12).push_next(&mut f16s);
            if nv_ext {
                f2 = f2.push_next(&mut fnv);
            }
            i.get_physical_device_features2(h, &mut f2);
            let cooperative_matrix_nv = nv_ext && fnv.cooperative_matrix != 0;
            let coop_shapes = coop_shapes(inst, h, cooperative_matrix, cooperative_matrix_nv);
            let cm2_offered =
                cooperative_matrix && has(crate::cm2::EXTENSION) && props.api_version >= vk::API_VERSION_1_3;
            let cm2 = crate::cm2::query(inst, h, cm2_offered);
            let mem = i.get_physical_device_memory_properties(h);
            let heaps = mem.memory_heaps[..mem.memory_heap_count as usize]
                .iter()
                .map(|hp| (hp.size, hp.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL)))
                .collect();
            let memory_types = mem.memory_types[..mem.memory_type_count as usize]
                .iter()
                .map(|t| {
                    let f = t.property_flags;
                    let names = [
                        (vk::MemoryPropertyFlags::DEVICE_LOCAL, "DL"),
                        (vk::MemoryPropertyFlags::HOST_VISIBLE, "HV"),
                        (vk::MemoryPropertyFlags::HOST_COHERENT, "HC"),
                        (vk::MemoryPropertyFlags::HOST_CACHED, "HK"),
                    ];
                    let flags: Vec<&str> = names.iter().filter(|(b, _)| f.contains(*b)).map(|(_, n)| *n).collect();
                    format!("{}:{}", t.heap_index, if flags.is_empty() { "-".to_string() } else { flags.join("+") })
                })
                .collect();
            let families = i.get_physical_device_queue_family_properties(h);
            let compute_family =
                families.iter().position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE)).map(|p| p as u32);
            let timestamp_bits = compute_family.map_or(0, |f| families[f as usize].timestamp_valid_bits);
            let kind = match props.device_type {
                vk::PhysicalDeviceType::CPU => DeviceKind::Cpu,
                vk::PhysicalDeviceType::DISCRETE_GPU
                | vk::PhysicalDeviceType::INTEGRATED_GPU
                | vk::PhysicalDeviceType::VIRTUAL_GPU => DeviceKind::Gpu,
                _ => DeviceKind::Other,
            };
            out.push(PhysicalDevice {
                handle: h,
                name,
                kind,
                discrete: props.device_type == vk::PhysicalDeviceType::DISCRETE_GPU,
                vendor_id: props.vendor_id,
                device_id: props.device_id,
                api_version: props.api_version,
                driver: format!("{} {}", c_chars(&driver.driver_name), c_chars(&driver.driver_info)),
                heaps,
                memory_types,
                shader_float16: f12.shader_float16 != 0,
                storage_16bit: f16s.storage_buffer16_bit_access != 0,
                cooperative_matrix,
                cooperative_matrix_nv,
                coop_shapes,
                cm2,
                vulkan_memory_model: f12.vulkan_memory_model != 0,
                subgroup_size: subgroup.subgroup_size,
                subgroup_arithmetic: subgroup.supported_stages.contains(vk::ShaderStageFlags::COMPUTE)
                    && subgroup.supported_operations.contains(vk::SubgroupFeatureFlags::ARITHMETIC),
                limits: props.limits,
                max_memory_allocation: maint3.max_memory_allocation_size,
                compute_family,
                timestamp_bits,
            });
        }
    }
    Ok((out, skipped))
}

impl PhysicalDevice {
    pub fn info(&self) -> DeviceInfo {
        let device_local: u64 = self.heaps.iter().filter(|h| h.1).map(|h| h.0).sum();
        let l = &self.limits;
        let heaps: Vec<String> = self
            .heaps
            .iter()
            .map(|(s, local)| format!("{}MiB{}", s >> 20, if *local { "(device-local)" } else { "" }))
            .collect();
        DeviceInfo {
            name: self.name.clone(),
            kind: self.kind,
            memory_bytes: if self.kind == DeviceKind::Cpu { 0 } else { device_local },
            free_memory_bytes: 0,
            pci_id: None,
            dtypes: DType::ALL.to_vec(),
            capabilities: vec![
                format!(
                    "vulkan_api={}.{}.{}",
                    vk::api_version_major(self.api_version),
                    vk::api_version_minor(self.api_version),
                    vk::api_version_patch(self.api_version)
                ),
                format!("vendor_id=0x{:04x}", self.vendor_id),
                format!("device_id=0x{:04x}", self.device_id),
                format!("driver={}", self.driver.trim()),
                format!("memory_heaps={}", heaps.join(",")),
                format!("memory_types={}", self.memory_types.join(",")),
                format!("shaderFloat16={}", self.shader_float16),
                format!("storageBuffer16BitAccess={}", self.storage_16bit),
                format!("VK_KHR_cooperative_matrix={}", self.cooperative_matrix),
                format!("VK_NV_cooperative_matrix={}", self.cooperative_matrix_nv),
                format!(
                    "cooperative_matrix_shapes={}",
                    self.coop_shapes.iter().map(CoopShape::describe).collect::<Vec<_>>().join(",")
                ),
                self.cm2.describe(),
                format!("vulkanMemoryModel={}", self.vulkan_memory_model),
                format!("subgroupSize={},subgroupArithmetic={}", self.subgroup_size, self.subgroup_arithmetic),
                format!("timestampPeriod={}ns,timestampValidBits={}", l.timestamp_period, self.timestamp_bits),
                format!("maxStorageBufferRange={}", l.max_storage_buffer_range),
                format!("maxMemoryAllocationSize={}", self.max_memory_allocation),
                format!("maxComputeWorkGroupCount={:?}", l.max_compute_work_group_count),
                format!("maxComputeWorkGroupInvocations={}", l.max_compute_work_group_invocations),
                format!("maxComputeSharedMemorySize={}", l.max_compute_shared_memory_size),
                // f16/bf16 are storage formats: packed in 32-bit words, computed in f32. Integer dtypes: copies
                // and fills (and gather ids) only.
                "f16_compute=f32".to_string(),
            ],
        }
    }
}
