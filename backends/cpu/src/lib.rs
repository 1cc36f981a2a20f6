//! The built-in CPU backend. (Initial version: delegates to the reference device; the fast kernels replace it.)

use sd3_core::reference::ReferenceDevice;
use sd3_core::{BackendProvider, BuiltinBackend, Device, Result};
use std::sync::Arc;

pub struct CpuProvider;

impl BackendProvider for CpuProvider {
    fn name(&self) -> &str {
        "cpu"
    }
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }
    fn device_count(&self) -> usize {
        1
    }
    fn open_device(&self, _index: usize) -> Result<Arc<dyn Device>> {
        Ok(Arc::new(ReferenceDevice::new()))
    }
}

/// The CPU device, for hosts that need it directly (e.g. as the fallback of another backend).
pub fn cpu_device() -> Arc<dyn Device> {
    Arc::new(ReferenceDevice::new())
}

sd3_core::inventory::submit! {
    BuiltinBackend { name: "cpu", create: |_options| Ok(Box::new(CpuProvider)) }
}
