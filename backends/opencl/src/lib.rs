//! `sd3-backend-opencl`: sd3's OpenCL backend. Every op of the core's op set runs as OpenCL C kernels
//! (`kernels/*.cl`) on any OpenCL 1.2+ device of any platform; f16/bf16 are storage formats with f32 arithmetic,
//! except f16 elementwise ops where the device reports `cl_khr_fp16` (`kernels/elementwise_half.cl`).
//!
//! - [`platform`]: enumeration of all platforms' devices (one flat device index across platforms).
//! - [`device`]: [`OpenClDevice`], the `sd3_core::Device` implementation.
//! - [`memory`], [`program_cache`]: buffers, and kernel programs built per device and cached on disk.
//! - `ops`: one module per op family, each launching the kernels of its `.cl` file.
//! - [`timing`]: device timing markers from OpenCL profiling events.

pub mod device;
mod kernels;
pub mod memory;
mod ops;
pub mod platform;
pub mod program_cache;
pub mod timing;

pub use device::OpenClDevice;
use sd3_core::{BackendProvider, Device, Error, Result};
use std::sync::Arc;

/// Map an OpenCL error to the core's error type: allocation failures become [`Error::OutOfMemory`],
/// a lost or invalid device [`Error::DeviceLost`], anything else a backend error naming the call.
pub(crate) fn cl_error(what: &str, e: ocl::core::Error) -> Error {
    use ocl::core::Status;
    match e.api_status() {
        Some(
            Status::CL_MEM_OBJECT_ALLOCATION_FAILURE | Status::CL_OUT_OF_RESOURCES | Status::CL_OUT_OF_HOST_MEMORY,
        ) => {
            Error::OutOfMemory { backend: "opencl".into(), requested: 0, available: 0, detail: format!("{what}: {e}") }
        }
        Some(Status::CL_INVALID_DEVICE | Status::CL_DEVICE_NOT_AVAILABLE) => {
            Error::DeviceLost { backend: "opencl".into(), msg: format!("{what}: {e}") }
        }
        _ => Error::backend("opencl", format!("{what}: {e}")),
    }
}

/// The OpenCL backend: every device of every installed platform.
pub struct OpenClProvider {
    devices: Vec<platform::ClDevice>,
}

impl OpenClProvider {
    /// Enumerate devices. Errors, with the reason, when no platform or no device is installed, so the host
    /// can report why the backend is unavailable.
    pub fn new() -> Result<OpenClProvider> {
        let devices = platform::enumerate()?;
        if devices.is_empty() {
            let reason = match platform::platform_count() {
                0 => "no OpenCL platform found: the ICD loader lists no driver \
                      (install an OpenCL driver, e.g. pocl-opencl-icd, or the GPU vendor's)"
                    .to_string(),
                n => match std::env::var(platform::PLATFORM_ENV) {
                    Ok(only) if !only.is_empty() => {
                        format!(
                            "{n} OpenCL platform(s) found, but none named like {}={only:?} has a device",
                            platform::PLATFORM_ENV
                        )
                    }
                    _ => format!("{n} OpenCL platform(s) found, but none has a device"),
                },
            };
            return Err(Error::backend("opencl", reason));
        }
        Ok(OpenClProvider { devices })
    }

    pub fn devices(&self) -> &[platform::ClDevice] {
        &self.devices
    }

    /// Open device `index` (counted across all platforms) as the concrete type.
    pub fn open(&self, index: usize) -> Result<OpenClDevice> {
        let cl = self.devices.get(index).ok_or_else(|| {
            let names: Vec<String> =
                self.devices.iter().enumerate().map(|(i, d)| format!("{i}: {}", d.display_name())).collect();
            Error::InvalidArgument(format!(
                "opencl: no device {index}; {} device(s): {}",
                self.devices.len(),
                names.join(", ")
            ))
        })?;
        OpenClDevice::open(cl.clone())
    }
}

impl BackendProvider for OpenClProvider {
    fn name(&self) -> &str {
        "opencl"
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

// The plugin entry point: the host loads `libsd3_backend_opencl.so` and calls `init`, which enumerates the
// devices (an error naming why when there is no platform or device). No options are read.
sd3_core::export_backend!("opencl", |_options: &str| OpenClProvider::new());
