//! `sd3-backend-vulkan`: sd3's Vulkan backend. Every op of the core's op set runs as a GLSL compute shader
//! (`shaders/*.comp`, compiled to SPIR-V by `build.rs` with `glslc` and embedded) on any Vulkan 1.2 device,
//! in f32, f16 and bf16 (f16/bf16 as storage formats with f32 arithmetic); copies and fills also take i32, i64, u8. The Vulkan loader is opened at run
//! time (`ash`'s `loaded` feature): the plugin has no link dependency on it.
//!
//! - [`instance`]: the loader, the instance, physical devices and their properties.
//! - [`device`]: [`VulkanDevice`], the `sd3_core::Device`: command batching, uploads/downloads, binding ranges.
//! - `markers`: `--benchmark` timing markers as timestamp queries.
//! - [`memory`]: the block sub-allocator; [`pipelines`]: the shaders' pipelines, created once and cached.
//! - [`coop`]: whether matmul and attention run on cooperative matrices (tensor cores), chosen at run time.
//! - `attention_wide`: attention with head dims above 128 as matmul, softmax, matmul.
//! - `ops`: which calls run here, and the parameters each shader gets.

mod attention_wide;
pub mod cm2;
pub(crate) mod conv_im2col;
pub mod coop;
pub mod device;
pub mod instance;
mod markers;
pub mod memory;
mod ops;
pub mod pipelines;
mod stats;

use ash::vk;
pub use device::VulkanDevice;
use instance::{PhysicalDevice, VkInstance};
use sd3_core::{BackendProvider, Device, Error, Result};
use std::sync::Arc;

/// Map a Vulkan error to the core's error type: out-of-memory results become [`Error::OutOfMemory`], a lost
/// device [`Error::DeviceLost`], anything else a backend error naming the call.
pub(crate) fn vk_error(what: &str, e: vk::Result) -> Error {
    match e {
        vk::Result::ERROR_OUT_OF_DEVICE_MEMORY | vk::Result::ERROR_OUT_OF_HOST_MEMORY => {
            Error::OutOfMemory { backend: "vulkan".into(), requested: 0, available: 0, detail: format!("{what}: {e}") }
        }
        vk::Result::ERROR_DEVICE_LOST => Error::DeviceLost { backend: "vulkan".into(), msg: format!("{what}: {e}") },
        _ => Error::backend("vulkan", format!("{what}: {e}")),
    }
}

/// Environment switch for [`VulkanProvider::open`]: `1` puts tensors in host-visible device-local memory where the
/// device has it (resizable BAR), `0` in device-local memory that is not host-visible (uploads and downloads through
/// the staging buffer). Default: not host-visible on discrete GPUs, host-visible elsewhere (lavapipe, integrated).
pub const HOST_VISIBLE_ENV: &str = "SD3_VULKAN_HOST_VISIBLE";

/// The Vulkan backend: every Vulkan 1.2 physical device.
pub struct VulkanProvider {
    instance: Arc<VkInstance>,
    devices: Vec<PhysicalDevice>,
}

impl VulkanProvider {
    /// Load the loader and enumerate devices. Errors, with the reason, when the loader is missing or no
    /// device qualifies, so the host reports why the backend is unavailable.
    pub fn new() -> Result<VulkanProvider> {
        let instance = VkInstance::new()?;
        let (devices, skipped) = instance::enumerate(&instance)?;
        if devices.is_empty() {
            let reason = if skipped.is_empty() {
                "the Vulkan loader lists no physical device: no Vulkan driver (ICD) is installed \
                 (install the GPU vendor's driver, or mesa-vulkan-drivers for the lavapipe CPU device)"
                    .to_string()
            } else {
                format!("no Vulkan 1.2 device: {}", skipped.join("; "))
            };
            return Err(Error::backend("vulkan", reason));
        }
        Ok(VulkanProvider { instance, devices })
    }

    pub fn devices(&self) -> &[PhysicalDevice] {
        &self.devices
    }

    /// Open device `index` as the concrete type, its tensor memory chosen by [`HOST_VISIBLE_ENV`] or the device kind.
    pub fn open(&self, index: usize) -> Result<VulkanDevice> {
        let discrete = self.devices.get(index).is_some_and(|d| d.discrete);
        let host_visible = match std::env::var(HOST_VISIBLE_ENV).as_deref() {
            Ok("1") => true,
            Ok("0") => false,
            _ => !discrete,
        };
        self.open_with(index, !host_visible)
    }

    /// Open device `index`; `unmapped_memory`: tensors in device-local memory that is not host-visible where the
    /// device has such a type, and uploads/downloads through the staging buffer in any case (see
    /// [`VulkanDevice::open_with`]).
    pub fn open_with(&self, index: usize, unmapped_memory: bool) -> Result<VulkanDevice> {
        let phys = self.devices.get(index).ok_or_else(|| {
            let names: Vec<String> = self.devices.iter().enumerate().map(|(i, d)| format!("{i}: {}", d.name)).collect();
            Error::InvalidArgument(format!(
                "vulkan: no device {index}; {} device(s): {}",
                self.devices.len(),
                names.join(", ")
            ))
        })?;
        VulkanDevice::open_with(self.instance.clone(), phys.clone(), unmapped_memory)
    }
}

impl BackendProvider for VulkanProvider {
    fn name(&self) -> &str {
        "vulkan"
    }
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }
    fn device_count(&self) -> usize {
        self.devices.len()
    }
    fn open_device(&self, index: usize) -> Result<Arc<dyn Device>> {
        Ok(Arc::new(self.open(index)?))
    }
}

// The plugin entry point: `init` loads the Vulkan loader and enumerates devices (an error naming why when the
// loader or a device is missing). No options are read.
sd3_core::export_backend!("vulkan", |_options: &str| VulkanProvider::new());
