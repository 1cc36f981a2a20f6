//! Debug aid: the driver's statistics of each compute pipeline (`VK_KHR_pipeline_executable_properties`), printed to
//! stderr as pipelines are created when `SD3_VULKAN_PIPELINE_STATS=1`. NVIDIA's driver reports registers per thread,
//! local memory (spills), shared memory and the like: what decides occupancy and whether a kernel spills.

use ash::vk;
use std::ffi::CStr;

/// Environment switch: `1` enables the extension's feature at device creation and prints the statistics.
pub const STATS_ENV: &str = "SD3_VULKAN_PIPELINE_STATS";

pub fn requested() -> bool {
    std::env::var(STATS_ENV).is_ok_and(|v| v == "1")
}

fn text(s: &[std::ffi::c_char]) -> String {
    // SAFETY: c_char and u8 have the same size and alignment.
    let bytes = unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), s.len()) };
    CStr::from_bytes_until_nul(bytes).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Print every statistic of every executable of `pipeline` (created with `CAPTURE_STATISTICS_KHR`) on one line.
pub fn print(ext: &ash::khr::pipeline_executable_properties::Device, pipeline: vk::Pipeline, name: &str) {
    let info = vk::PipelineInfoKHR::default().pipeline(pipeline);
    // SAFETY: `pipeline` is a live pipeline of the extension's device, created with statistics capture.
    let execs = match unsafe { ext.get_pipeline_executable_properties(&info) } {
        Ok(e) => e,
        Err(e) => return eprintln!("pipeline stats {name}: vkGetPipelineExecutablePropertiesKHR: {e}"),
    };
    for (i, exec) in execs.iter().enumerate() {
        let ei = vk::PipelineExecutableInfoKHR::default().pipeline(pipeline).executable_index(i as u32);
        // SAFETY: as above; `i` is an executable index the driver listed.
        let stats = match unsafe { ext.get_pipeline_executable_statistics(&ei) } {
            Ok(s) => s,
            Err(e) => return eprintln!("pipeline stats {name}: vkGetPipelineExecutableStatisticsKHR: {e}"),
        };
        let fields: Vec<String> = stats
            .iter()
            .map(|s| {
                // SAFETY: the union member read is the one `format` names.
                let v = unsafe {
                    match s.format {
                        vk::PipelineExecutableStatisticFormatKHR::BOOL32 => format!("{}", s.value.b32 != 0),
                        vk::PipelineExecutableStatisticFormatKHR::INT64 => format!("{}", s.value.i64),
                        vk::PipelineExecutableStatisticFormatKHR::UINT64 => format!("{}", s.value.u64),
                        vk::PipelineExecutableStatisticFormatKHR::FLOAT64 => format!("{:.3}", s.value.f64),
                        _ => "?".to_string(),
                    }
                };
                format!("{}={v}", text(&s.name))
            })
            .collect();
        eprintln!(
            "pipeline stats {name} [{}, subgroup {}]: {}",
            text(&exec.name),
            exec.subgroup_size,
            fields.join(", ")
        );
    }
}

/// Whether `h` offers the extension with its `pipelineExecutableInfo` feature.
///
/// # Safety
/// `h` is a physical device of `i`.
pub unsafe fn offered(i: &ash::Instance, h: vk::PhysicalDevice) -> bool {
    let exts = i.enumerate_device_extension_properties(h).unwrap_or_default();
    if !exts.iter().any(|e| text(&e.extension_name) == vk::KHR_PIPELINE_EXECUTABLE_PROPERTIES_NAME.to_string_lossy()) {
        return false;
    }
    let mut f = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
    let mut f2 = vk::PhysicalDeviceFeatures2::default().push_next(&mut f);
    i.get_physical_device_features2(h, &mut f2);
    f.pipeline_executable_info != 0
}
