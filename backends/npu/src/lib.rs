//! `sd3-backend-npu`: the NPU stub plugin.
//!
//! An NPU-kind device emulated on the host that behaves as Paddle's NPU flags say
//! (`../shared/reference/paddle.md` §2.3): its own device-memory arena, the allocator `FLAGS_allocator_strategy`
//! chooses, private storage formats under `FLAGS_npu_storage_format`, contiguous copies of views when
//! `FLAGS_use_stride_kernel=0`, and the two scale paths of `FLAGS_npu_scale_aclnn`. It is also the worked
//! example of `docs/writing-a-backend.md`, so it uses only what a vendor has: the `sd3-core` SDK.
//!
//! - [`flags`]: the flags and their Paddle parsing; [`config`]: options (`arena_mb=`) and the arena size.
//! - [`alloc`]: the allocator; [`arena`]: the device memory.
//! - [`kernels`]: the compute; `launch`: the flags around each kernel; [`device`]: the `Device` itself.

pub mod alloc;
pub mod arena;
mod check;
pub mod config;
pub mod device;
pub mod flags;
pub mod kernels;
mod launch;
mod par;

pub use config::NpuConfig;
pub use device::NpuDevice;
pub use flags::{AllocatorStrategy, NpuFlags};

use sd3_core::{BackendProvider, Device, Error, Result};
use std::sync::{Arc, Mutex};

/// The backend: one emulated card, created on first open and shared by every later open.
pub struct NpuProvider {
    config: NpuConfig,
    device: Mutex<Option<Arc<NpuDevice>>>,
}

impl NpuProvider {
    pub fn new(config: NpuConfig) -> NpuProvider {
        NpuProvider { config, device: Mutex::new(None) }
    }

    /// Plugin initialisation: the flags from the environment, the arena size from `options` or the environment.
    /// Invalid flag values and malformed options are errors.
    pub fn from_env(options: &str) -> Result<NpuProvider> {
        Ok(NpuProvider::new(NpuConfig::from_env(options)?))
    }

    pub fn config(&self) -> &NpuConfig {
        &self.config
    }

    /// The device, as its concrete type (for tests and tools that want allocator figures).
    pub fn npu_device(&self) -> Result<Arc<NpuDevice>> {
        let mut slot = self.device.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let d = Arc::new(NpuDevice::new(self.config.clone())?);
        *slot = Some(d.clone());
        Ok(d)
    }
}

impl BackendProvider for NpuProvider {
    fn name(&self) -> &str {
        "npu"
    }
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }
    fn device_count(&self) -> usize {
        1
    }
    fn open_device(&self, index: usize) -> Result<Arc<dyn Device>> {
        if index != 0 {
            return Err(Error::InvalidArgument(format!("npu: device {index} does not exist (1 device)")));
        }
        Ok(self.npu_device()?)
    }
}

// The plugin entry symbol (`sd3_backend_entry`): what makes `libsd3_backend_npu.so` loadable by `sd3`. Flags
// and the arena size are read when the host calls `init` with its options string.
sd3_core::export_backend!("npu", |options: &str| NpuProvider::from_env(options));
