//! `VK_NV_cooperative_matrix2`: workgroup-scope cooperative matrices with tensor-addressed loads, row reductions and
//! per-element functions (the `*_cm2.comp` shaders). On NVIDIA the driver then splits a whole workgroup's tile
//! among its subgroups and stages operands through shared memory itself, which NVIDIA's compiler does better than
//! our subgroup-scope shaders do by hand.
//!
//! ash 0.38 (Vulkan headers 1.3.281) predates the extension (1.3.300), so its structures are declared here from the
//! Vulkan registry and chained by hand.

use crate::instance::VkInstance;
use ash::vk;
use std::ffi::c_void;

/// The extension's name.
pub const EXTENSION: &std::ffi::CStr = c"VK_NV_cooperative_matrix2";
const STYPE_FEATURES: vk::StructureType = vk::StructureType::from_raw(1_000_593_000);
const STYPE_FLEXIBLE_PROPERTIES: vk::StructureType = vk::StructureType::from_raw(1_000_593_001);
const STYPE_PROPERTIES: vk::StructureType = vk::StructureType::from_raw(1_000_593_002);

/// `VkPhysicalDeviceCooperativeMatrix2FeaturesNV`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Features {
    s_type: vk::StructureType,
    p_next: *mut c_void,
    pub workgroup_scope: vk::Bool32,
    pub flexible_dimensions: vk::Bool32,
    pub reductions: vk::Bool32,
    pub conversions: vk::Bool32,
    pub per_element_operations: vk::Bool32,
    pub tensor_addressing: vk::Bool32,
    pub block_loads: vk::Bool32,
}

impl Default for Features {
    fn default() -> Self {
        Features {
            s_type: STYPE_FEATURES,
            p_next: std::ptr::null_mut(),
            workgroup_scope: 0,
            flexible_dimensions: 0,
            reductions: 0,
            conversions: 0,
            per_element_operations: 0,
            tensor_addressing: 0,
            block_loads: 0,
        }
    }
}

impl Features {
    /// What the `*_cm2.comp` shaders use.
    pub fn needed() -> Features {
        Features {
            workgroup_scope: 1,
            flexible_dimensions: 1,
            reductions: 1,
            conversions: 1,
            per_element_operations: 1,
            tensor_addressing: 1,
            ..Features::default()
        }
    }

    fn covers(&self, need: &Features) -> bool {
        let f = |a: vk::Bool32, b: vk::Bool32| a != 0 || b == 0;
        f(self.workgroup_scope, need.workgroup_scope)
            && f(self.flexible_dimensions, need.flexible_dimensions)
            && f(self.reductions, need.reductions)
            && f(self.conversions, need.conversions)
            && f(self.per_element_operations, need.per_element_operations)
            && f(self.tensor_addressing, need.tensor_addressing)
    }

    /// Links `self` in front of the `pNext` chain `next`; returns the new head.
    ///
    /// # Safety
    /// `self` must outlive every use of the chain.
    pub unsafe fn chain(&mut self, next: *const c_void) -> *mut c_void {
        self.p_next = next.cast_mut();
        (self as *mut Features).cast()
    }
}

/// `VkPhysicalDeviceCooperativeMatrix2PropertiesNV`.
#[repr(C)]
struct Properties {
    s_type: vk::StructureType,
    p_next: *mut c_void,
    workgroup_scope_max_workgroup_size: u32,
    flexible_dimensions_max_dimension: u32,
    workgroup_scope_reserved_shared_memory: u32,
}

/// `VkCooperativeMatrixFlexibleDimensionsPropertiesNV`.
#[repr(C)]
#[derive(Clone, Copy)]
struct FlexibleProperties {
    s_type: vk::StructureType,
    p_next: *mut c_void,
    m_granularity: u32,
    n_granularity: u32,
    k_granularity: u32,
    a_type: vk::ComponentTypeKHR,
    b_type: vk::ComponentTypeKHR,
    c_type: vk::ComponentTypeKHR,
    result_type: vk::ComponentTypeKHR,
    saturating_accumulation: vk::Bool32,
    scope: vk::ScopeKHR,
    workgroup_invocations: u32,
}

type GetFlexibleProperties =
    unsafe extern "system" fn(vk::PhysicalDevice, *mut u32, *mut FlexibleProperties) -> vk::Result;

/// One workgroup-scope f16 x f16 -> f32 configuration the device lists: dimensions in multiples of the
/// granularities, for workgroups of `invocations`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlexibleShape {
    pub granularity: (u32, u32, u32),
    pub invocations: u32,
}

/// What a device offers of the extension.
#[derive(Clone, Debug, Default)]
pub struct Support {
    pub features: Option<Features>,
    pub max_workgroup_size: u32,
    pub max_dimension: u32,
    pub reserved_shared_memory: u32,
    /// Workgroup-scope f16 x f16 -> f32 configurations.
    pub shapes: Vec<FlexibleShape>,
}

// SAFETY: the raw pointer in `Features` is null outside a create call.
unsafe impl Send for Support {}
unsafe impl Sync for Support {}

impl Support {
    /// The device offers every feature the shaders use, and a workgroup-scope f16 configuration for workgroups of
    /// `invocations` whose granularities divide (m, n, k).
    pub fn runs(&self, invocations: u32, (m, n, k): (u32, u32, u32)) -> bool {
        self.features.is_some_and(|f| f.covers(&Features::needed()))
            && self.max_dimension >= m.max(n).max(k)
            && self.shapes.iter().any(|s| {
                s.invocations == invocations
                    && m.is_multiple_of(s.granularity.0)
                    && n.is_multiple_of(s.granularity.1)
                    && k.is_multiple_of(s.granularity.2)
            })
    }

    pub fn describe(&self) -> String {
        match self.features {
            None => "VK_NV_cooperative_matrix2=false".to_string(),
            Some(f) => format!(
                "VK_NV_cooperative_matrix2=workgroupScope:{},flexibleDimensions:{},reductions:{},conversions:{},\
                 perElementOperations:{},tensorAddressing:{},maxWorkgroupSize:{},maxDimension:{},\
                 reservedSharedMemory:{},f16_shapes:{}",
                f.workgroup_scope != 0,
                f.flexible_dimensions != 0,
                f.reductions != 0,
                f.conversions != 0,
                f.per_element_operations != 0,
                f.tensor_addressing != 0,
                self.max_workgroup_size,
                self.max_dimension,
                self.reserved_shared_memory,
                self.shapes
                    .iter()
                    .map(|s| format!("{}x{}x{}@{}", s.granularity.0, s.granularity.1, s.granularity.2, s.invocations))
                    .collect::<Vec<_>>()
                    .join("/")
            ),
        }
    }
}

/// What `h` offers of the extension (`offered`: the extension is listed and the device is Vulkan 1.3, which the
/// SPIR-V 1.6 of these shaders needs).
///
/// # Safety
/// `h` must be a physical device of `inst`.
pub unsafe fn query(inst: &VkInstance, h: vk::PhysicalDevice, offered: bool) -> Support {
    if !offered {
        return Support::default();
    }
    let i = &inst.instance;
    let mut features = Features::default();
    let mut f2 = vk::PhysicalDeviceFeatures2::default();
    f2.p_next = features.chain(f2.p_next);
    i.get_physical_device_features2(h, &mut f2);
    features.p_next = std::ptr::null_mut();
    let mut props = Properties {
        s_type: STYPE_PROPERTIES,
        p_next: std::ptr::null_mut(),
        workgroup_scope_max_workgroup_size: 0,
        flexible_dimensions_max_dimension: 0,
        workgroup_scope_reserved_shared_memory: 0,
    };
    let mut p2 = vk::PhysicalDeviceProperties2 { p_next: (&mut props as *mut Properties).cast(), ..Default::default() };
    i.get_physical_device_properties2(h, &mut p2);
    let mut shapes = Vec::new();
    let name = c"vkGetPhysicalDeviceCooperativeMatrixFlexibleDimensionsPropertiesNV";
    if let Some(f) = inst.entry.get_instance_proc_addr(i.handle(), name.as_ptr()) {
        // SAFETY: the loader returned this entry point under its registered name and signature.
        let get: GetFlexibleProperties = std::mem::transmute(f);
        let mut count = 0u32;
        if get(h, &mut count, std::ptr::null_mut()) == vk::Result::SUCCESS {
            let blank = FlexibleProperties {
                s_type: STYPE_FLEXIBLE_PROPERTIES,
                p_next: std::ptr::null_mut(),
                m_granularity: 0,
                n_granularity: 0,
                k_granularity: 0,
                a_type: vk::ComponentTypeKHR::FLOAT16,
                b_type: vk::ComponentTypeKHR::FLOAT16,
                c_type: vk::ComponentTypeKHR::FLOAT16,
                result_type: vk::ComponentTypeKHR::FLOAT16,
                saturating_accumulation: 0,
                scope: vk::ScopeKHR::DEVICE,
                workgroup_invocations: 0,
            };
            let mut list = vec![blank; count as usize];
            if get(h, &mut count, list.as_mut_ptr()) == vk::Result::SUCCESS {
                let f16 = vk::ComponentTypeKHR::FLOAT16;
                let f32 = vk::ComponentTypeKHR::FLOAT32;
                shapes = list[..count as usize]
                    .iter()
                    .filter(|p| {
                        p.scope == vk::ScopeKHR::WORKGROUP
                            && (p.a_type, p.b_type, p.c_type, p.result_type) == (f16, f16, f32, f32)
                    })
                    .map(|p| FlexibleShape {
                        granularity: (p.m_granularity, p.n_granularity, p.k_granularity),
                        invocations: p.workgroup_invocations,
                    })
                    .collect();
            }
        }
    }
    Support {
        features: Some(features),
        max_workgroup_size: props.workgroup_scope_max_workgroup_size,
        max_dimension: props.flexible_dimensions_max_dimension,
        reserved_shared_memory: props.workgroup_scope_reserved_shared_memory,
        shapes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h200() -> Support {
        // What NVIDIA's driver 580 reports on an H200 (26 Nov 2026).
        let shape = |g: (u32, u32, u32), invocations| FlexibleShape { granularity: g, invocations };
        Support {
            features: Some(Features { block_loads: 1, ..Features::needed() }),
            max_workgroup_size: 256,
            max_dimension: 1024,
            reserved_shared_memory: 8192,
            shapes: vec![
                shape((16, 16, 16), 32),
                shape((16, 16, 16), 64),
                shape((32, 16, 16), 128),
                shape((32, 32, 16), 256),
            ],
        }
    }

    #[test]
    fn runs_where_a_listed_shape_divides_the_tile() {
        let s = h200();
        assert!(s.runs(128, (64, 32, 64)));
        assert!(s.runs(256, (128, 256, 64)));
        let (invocations, tile) = crate::coop::CM2_ATTENTION;
        assert!(s.runs(invocations, tile), "the landed attention_cm2 on the H200");
        // 128 invocations need rows in multiples of 32; no listing for 96 invocations.
        assert!(!s.runs(128, (48, 32, 64)));
        assert!(!s.runs(96, (64, 32, 64)));
        // Beyond the largest flexible dimension.
        assert!(!s.runs(128, (2048, 32, 64)));
    }

    #[test]
    fn declines_missing_features_or_extension() {
        assert!(!Support::default().runs(128, (64, 32, 64)));
        let mut s = h200();
        s.features = Some(Features { reductions: 0, ..Features::needed() });
        assert!(!s.runs(128, (64, 32, 64)));
        s.features = Some(Features { tensor_addressing: 0, ..Features::needed() });
        assert!(!s.runs(128, (64, 32, 64)));
        assert!(Support::default().describe().ends_with("false"));
        assert!(h200().describe().contains("f16_shapes:16x16x16@32/16x16x16@64/32x16x16@128/32x32x16@256"));
    }
}
