//! The CUDA backend: every op of `sd3-core` on an NVIDIA GPU.
//!
//! CUDA's libraries are loaded at run time (cudarc's dynamic loading), so this plugin builds on machines
//! without CUDA; [`CudaProvider::new`] probes for the driver, NVRTC and cuBLAS first and reports what is
//! missing as a clean error instead of letting a loader panic.
//!
//! - `device.rs`: the `Device` implementation and op dispatch
//! - `kernels.rs` + `kernels/*.cu`: NVRTC-compiled kernels, cached on disk
//! - `gemm.rs`: matrix products through cuBLAS; `lt.rs`: linears with a fused bias through cuBLASLt;
//!   `attention.rs`: the tensor-core flash kernels (`wgmma` on Hopper, `mma.sync` from sm_80), or products through
//!   cuBLAS
//! - `memory.rs`: the caching allocator
//! - `events.rs`: `--benchmark` timing markers as CUDA events

mod attention;
mod device;
mod events;
mod gemm;
mod gemv;
mod kernels;
mod lt;
mod memory;
mod params;
mod products;
mod rows;

pub use device::CudaDevice;
use sd3_core::{BackendProvider, Device, Error, Result};
use std::sync::Arc;

/// The CUDA libraries the backend needs, each with the file names tried (cudarc's candidates, CUDA 13).
const LIBRARIES: [(&str, &[&str]); 4] = [
    ("the NVIDIA driver (libcuda)", &["libcuda.so.1", "libcuda.so"]),
    ("NVRTC", &["libnvrtc.so.13", "libnvrtc.so"]),
    ("cuBLAS", &["libcublas.so.13", "libcublas.so"]),
    ("cuBLASLt", &["libcublasLt.so.13", "libcublasLt.so"]),
];

fn probe_libraries() -> Result<()> {
    for (what, names) in LIBRARIES {
        // SAFETY: loading a system library runs its initialisers; these are NVIDIA's own libraries.
        let found = names.iter().any(|n| unsafe { libloading::Library::new(n) }.is_ok());
        if !found {
            return Err(Error::backend(
                "cuda",
                format!(
                    "{what} not found (tried {}); install CUDA 13 or add its lib64 to LD_LIBRARY_PATH",
                    names.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

pub struct CudaProvider {
    count: usize,
}

impl CudaProvider {
    /// Probe the libraries and count the GPUs. Options are not used yet.
    pub fn new(_options: &str) -> Result<CudaProvider> {
        probe_libraries()?;
        let count = std::panic::catch_unwind(|| {
            cudarc::driver::result::init().map_err(device::drv)?;
            cudarc::driver::result::device::get_count().map_err(device::drv)
        })
        .map_err(|_| Error::backend("cuda", "the CUDA driver failed to initialise (panic in the loader)"))??;
        if count <= 0 {
            return Err(Error::backend("cuda", "no CUDA device present"));
        }
        Ok(CudaProvider { count: count as usize })
    }
}

impl BackendProvider for CudaProvider {
    fn name(&self) -> &str {
        "cuda"
    }
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }
    fn device_count(&self) -> usize {
        self.count
    }
    fn open_device(&self, index: usize) -> Result<Arc<dyn Device>> {
        if index >= self.count {
            return Err(Error::InvalidArgument(format!("cuda: device {index} requested, {} present", self.count)));
        }
        Ok(Arc::new(CudaDevice::new(index)?))
    }
}

sd3_core::export_backend!("cuda", |options: &str| CudaProvider::new(options));
