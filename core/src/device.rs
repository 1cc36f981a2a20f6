//! The [`Device`] trait every backend implements, and [`BackendProvider`], which enumerates a backend's devices.

use crate::{BufferId, DType, Error, OpCall, Result};
use std::sync::Arc;

/// What kind of processor a device is (`SD3_DEVICE_KIND_*`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu = 0,
    Gpu = 1,
    Npu = 2,
    Other = 3,
}

impl DeviceKind {
    pub fn from_id(id: u32) -> DeviceKind {
        match id {
            0 => DeviceKind::Cpu,
            1 => DeviceKind::Gpu,
            2 => DeviceKind::Npu,
            _ => DeviceKind::Other,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "CPU",
            DeviceKind::Gpu => "GPU",
            DeviceKind::Npu => "NPU",
            DeviceKind::Other => "other",
        }
    }
}

/// Properties of a device, as shown by `sd3 devices`.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: DeviceKind,
    /// Total device memory in bytes; 0 when unknown or shared with the host.
    pub memory_bytes: u64,
    /// Free device memory in bytes; 0 when unknown.
    pub free_memory_bytes: u64,
    /// PCI bus id (`0000:3b:00.0`) where known, so the same card seen by two backends can be recognised.
    pub pci_id: Option<String>,
    /// The dtypes the device computes in.
    pub dtypes: Vec<DType>,
    /// Free-form `key=value` capabilities and settings (`tensor_cores`, `fp16`, `FLAGS_npu_storage_format=0`, ...).
    pub capabilities: Vec<String>,
}

/// A timestamp queued on a device's queue by [`Device::record_marker`]: an opaque handle, valid until
/// [`Device::release_marker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MarkerId(pub u64);

/// One accelerator (or the host) as the core sees it.
///
/// Execution is in order on one queue per device: `execute`, `upload` and `copy` may return before the work is
/// done; `download` and `synchronize` wait for everything queued before them. Buffers are opaque handles owned by
/// the device; a buffer is only freed when no queued work uses it (the device keeps it alive until then).
/// Implementations must be callable from several threads (`Send + Sync`), serialising internally as needed.
pub trait Device: Send + Sync {
    fn info(&self) -> DeviceInfo;

    /// Allocate `bytes` bytes of device memory. Errors with [`crate::Error::OutOfMemory`] when it cannot.
    fn alloc(&self, bytes: usize) -> Result<BufferId>;
    fn free(&self, buffer: BufferId);
    /// Copy host bytes into `buffer` starting at byte `offset`.
    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()>;
    /// Copy bytes of `buffer` starting at byte `offset` into `out` (synchronises).
    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()>;
    /// Device-to-device byte copy.
    fn copy_buffer(
        &self,
        src: BufferId,
        src_offset: usize,
        dst: BufferId,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()>;

    /// Whether [`Device::execute`] can run this call (op, dtypes, layouts). Must be cheap and never fail.
    fn supports(&self, call: &OpCall) -> bool;
    /// Queue an op. Only called for calls `supports` accepted.
    fn execute(&self, call: &OpCall) -> Result<()>;
    /// Wait until all queued work is done.
    fn synchronize(&self) -> Result<()>;

    /// Backend-specific statistics as `key=value` lines (allocator figures, copy counts...), for `--benchmark`.
    fn stats(&self) -> Vec<String> {
        Vec::new()
    }

    /// Optional device timing: queue a timestamp that completes after all work queued so far. `Ok(None)` (the
    /// default) means the device has no timing markers. Must not synchronise.
    fn record_marker(&self) -> Result<Option<MarkerId>> {
        Ok(None)
    }
    /// Seconds of device time between two markers from [`Device::record_marker`], `start` recorded first.
    /// Waits for `end` to complete.
    fn marker_elapsed(&self, start: MarkerId, end: MarkerId) -> Result<f64> {
        let _ = (start, end);
        Err(Error::Unsupported {
            backend: self.info().name,
            op: "marker_elapsed".into(),
            detail: "this device records no timing markers".into(),
        })
    }
    /// Release a marker; it is not used afterwards.
    fn release_marker(&self, marker: MarkerId) {
        let _ = marker;
    }
}

/// A backend: a named family of devices (`cpu`, `cuda`, `vulkan`, `opencl`, `npu`, or a vendor's name).
/// Built-in backends and loaded plugins both appear as providers.
pub trait BackendProvider: Send + Sync {
    fn name(&self) -> &str;
    /// Version string of the backend implementation.
    fn version(&self) -> String {
        String::new()
    }
    fn device_count(&self) -> usize;
    fn open_device(&self, index: usize) -> Result<Arc<dyn Device>>;
}

/// A backend compiled into the host binary, registered with `inventory::submit!`.
pub struct BuiltinBackend {
    pub name: &'static str,
    /// Creates the provider; `options` is the `key=value;...` option string given by the user.
    pub create: fn(options: &str) -> Result<Box<dyn BackendProvider>>,
}

inventory::collect!(BuiltinBackend);

/// Every backend compiled into this binary.
pub fn builtin_backends() -> impl Iterator<Item = &'static BuiltinBackend> {
    inventory::iter::<BuiltinBackend>.into_iter()
}
