//! Enumeration of every OpenCL device of every platform, with the properties `sd3 devices` shows.
//!
//! Queries go straight to the ICD loader (`clGetPlatformIDs`, `clGet*Info`): `ocl`'s own platform listing
//! retries for ten seconds when no platform is installed, and a missing platform must be a quick, clear answer.

use ocl::ffi::{self, cl_device_id, cl_platform_id, cl_uint};
use sd3_core::{DType, DeviceInfo, DeviceKind, Error, Result};
use std::ffi::c_void;
use std::ptr;

/// `CL_PLATFORM_NOT_FOUND_KHR`: the loader found no installable client driver.
const PLATFORM_NOT_FOUND_KHR: i32 = -1001;
/// `CL_DEVICE_NOT_FOUND`.
const DEVICE_NOT_FOUND: i32 = -1;
/// `cl_nv_device_attribute_query`: PCI bus and slot of an NVIDIA device.
const DEVICE_PCI_BUS_ID_NV: u32 = 0x4008;
const DEVICE_PCI_SLOT_ID_NV: u32 = 0x4009;
const DEVICE_PCI_DOMAIN_ID_NV: u32 = 0x400A;
/// `cl_nv_device_attribute_query`: compute capability (major) of an NVIDIA device.
const DEVICE_COMPUTE_CAPABILITY_MAJOR_NV: u32 = 0x4000;
/// `cl_amd_device_attribute_query`: the PCIe topology of an AMD device.
const DEVICE_TOPOLOGY_AMD: u32 = 0x4037;
/// `cl_khr_pci_bus_info`.
const DEVICE_PCI_BUS_INFO_KHR: u32 = 0x410F;

/// One OpenCL device, with the facts the backend needs to open and tune for it.
#[derive(Clone, Debug)]
pub struct ClDevice {
    pub platform: cl_platform_id,
    pub device: cl_device_id,
    pub platform_name: String,
    pub name: String,
    pub vendor: String,
    pub kind: DeviceKind,
    pub driver_version: String,
    pub device_version: String,
    pub extensions: String,
    pub global_mem: u64,
    pub max_alloc: u64,
    pub local_mem: u64,
    pub max_work_group: usize,
    pub compute_units: u32,
    pub pci_id: Option<String>,
    /// NVIDIA sm_80 or newer: the GEMM kernels may use `mma.sync` through inline PTX.
    pub tensor_cores: bool,
}

// The ids are handles owned by the ICD loader for the life of the process.
unsafe impl Send for ClDevice {}
unsafe impl Sync for ClDevice {}

impl ClDevice {
    pub fn has_extension(&self, ext: &str) -> bool {
        self.extensions.split_whitespace().any(|e| e == ext)
    }

    /// Whether the OpenCL C compiler takes f16 arithmetic: the device reports `cl_khr_fp16`. (NVIDIA's driver
    /// 580 does not report it, and its compiler rejects `half` arithmetic: measured on an H200.) Where the
    /// build still fails, the f32 path is kept.
    pub fn half_math_capable(&self) -> bool {
        self.has_extension("cl_khr_fp16")
    }

    /// `name (platform)`, for messages.
    pub fn display_name(&self) -> String {
        format!("{} ({})", self.name, self.platform_name)
    }

    pub fn info(&self) -> DeviceInfo {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        DeviceInfo {
            name: self.name.clone(),
            kind: self.kind,
            memory_bytes: self.global_mem,
            free_memory_bytes: 0,
            pci_id: self.pci_id.clone(),
            dtypes: DType::ALL.to_vec(),
            capabilities: vec![
                format!("platform={}", self.platform_name),
                format!("vendor={}", self.vendor),
                format!("driver={}", self.driver_version),
                format!("opencl={}", self.device_version),
                format!("cl_khr_fp16={}", yes_no(self.has_extension("cl_khr_fp16"))),
                format!("cl_khr_fp64={}", yes_no(self.has_extension("cl_khr_fp64"))),
                format!("compute_units={}", self.compute_units),
                format!("tensor_cores={}", if self.tensor_cores { "mma.sync (f16/bf16 matmul, conv2d)" } else { "no" }),
                format!("max_alloc_bytes={}", self.max_alloc),
                format!("local_mem_bytes={}", self.local_mem),
                format!(
                    "arithmetic={}",
                    if self.half_math_capable() {
                        "f32, f16 for f16 add/sub/mul/neg/square/relu/modulate/gated"
                    } else {
                        "f32"
                    }
                ),
            ],
        }
    }
}

fn cl_err(what: &str, code: i32) -> Error {
    Error::backend("opencl", format!("{what} failed with OpenCL status {code}"))
}

fn platform_ids() -> Result<Vec<cl_platform_id>> {
    let mut n: cl_uint = 0;
    let code = unsafe { ffi::clGetPlatformIDs(0, ptr::null_mut(), &mut n) };
    if code == PLATFORM_NOT_FOUND_KHR || (code == 0 && n == 0) {
        return Ok(Vec::new());
    }
    if code != 0 {
        return Err(cl_err("clGetPlatformIDs", code));
    }
    let mut ids = vec![ptr::null_mut(); n as usize];
    let code = unsafe { ffi::clGetPlatformIDs(n, ids.as_mut_ptr(), ptr::null_mut()) };
    if code != 0 {
        return Err(cl_err("clGetPlatformIDs", code));
    }
    Ok(ids)
}

fn device_ids(platform: cl_platform_id) -> Result<Vec<cl_device_id>> {
    let mut n: cl_uint = 0;
    let all = ffi::CL_DEVICE_TYPE_ALL;
    let code = unsafe { ffi::clGetDeviceIDs(platform, all, 0, ptr::null_mut(), &mut n) };
    if code == DEVICE_NOT_FOUND || (code == 0 && n == 0) {
        return Ok(Vec::new());
    }
    if code != 0 {
        return Err(cl_err("clGetDeviceIDs", code));
    }
    let mut ids = vec![ptr::null_mut(); n as usize];
    let code = unsafe { ffi::clGetDeviceIDs(platform, all, n, ids.as_mut_ptr(), ptr::null_mut()) };
    if code != 0 {
        return Err(cl_err("clGetDeviceIDs", code));
    }
    Ok(ids)
}

fn platform_bytes(p: cl_platform_id, param: u32) -> Option<Vec<u8>> {
    let mut size = 0usize;
    if unsafe { ffi::clGetPlatformInfo(p, param, 0, ptr::null_mut(), &mut size) } != 0 {
        return None;
    }
    let mut buf = vec![0u8; size];
    let code = unsafe { ffi::clGetPlatformInfo(p, param, size, buf.as_mut_ptr() as *mut c_void, ptr::null_mut()) };
    (code == 0).then_some(buf)
}

pub(crate) fn device_bytes(d: cl_device_id, param: u32) -> Option<Vec<u8>> {
    let mut size = 0usize;
    if unsafe { ffi::clGetDeviceInfo(d, param, 0, ptr::null_mut(), &mut size) } != 0 {
        return None;
    }
    let mut buf = vec![0u8; size];
    let code = unsafe { ffi::clGetDeviceInfo(d, param, size, buf.as_mut_ptr() as *mut c_void, ptr::null_mut()) };
    (code == 0).then_some(buf)
}

fn c_string(bytes: Option<Vec<u8>>) -> String {
    let bytes = bytes.unwrap_or_default();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_string()
}

fn device_u64(d: cl_device_id, param: u32) -> u64 {
    match device_bytes(d, param) {
        Some(b) if b.len() >= 8 => u64::from_le_bytes(b[..8].try_into().unwrap()),
        Some(b) if b.len() >= 4 => u32::from_le_bytes(b[..4].try_into().unwrap()) as u64,
        _ => 0,
    }
}

fn device_u32(d: cl_device_id, param: u32) -> Option<u32> {
    device_bytes(d, param).filter(|b| b.len() >= 4).map(|b| u32::from_le_bytes(b[..4].try_into().unwrap()))
}

/// PCI id from whichever extension the driver offers (lower case, `dddd:bb:dd.f`).
fn pci_id(d: cl_device_id, extensions: &str) -> Option<String> {
    let has = |e: &str| extensions.split_whitespace().any(|x| x == e);
    if has("cl_khr_pci_bus_info") {
        if let Some(b) = device_bytes(d, DEVICE_PCI_BUS_INFO_KHR).filter(|b| b.len() >= 16) {
            let w = |i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
            return Some(format!("{:04x}:{:02x}:{:02x}.{:x}", w(0), w(1), w(2), w(3)));
        }
    }
    if has("cl_nv_device_attribute_query") {
        let bus = device_u32(d, DEVICE_PCI_BUS_ID_NV)?;
        let slot = device_u32(d, DEVICE_PCI_SLOT_ID_NV)?;
        let domain = device_u32(d, DEVICE_PCI_DOMAIN_ID_NV).unwrap_or(0);
        // The slot id packs device (bits 3..) and function (bits 0..3).
        return Some(format!("{domain:04x}:{bus:02x}:{:02x}.{:x}", slot >> 3, slot & 7));
    }
    if has("cl_amd_device_attribute_query") {
        let b = device_bytes(d, DEVICE_TOPOLOGY_AMD).filter(|b| b.len() >= 24)?;
        // cl_device_topology_amd: type (1 = PCIe), 17 unused bytes, then bus, device, function.
        if u32::from_le_bytes(b[..4].try_into().unwrap()) == 1 {
            return Some(format!("0000:{:02x}:{:02x}.{:x}", b[21], b[22], b[23]));
        }
    }
    None
}

fn describe(platform: cl_platform_id, platform_name: &str, device: cl_device_id) -> ClDevice {
    let kind_bits = device_u64(device, ffi::CL_DEVICE_TYPE);
    let kind = if kind_bits & ffi::CL_DEVICE_TYPE_GPU != 0 {
        DeviceKind::Gpu
    } else if kind_bits & ffi::CL_DEVICE_TYPE_CPU != 0 {
        DeviceKind::Cpu
    } else {
        DeviceKind::Other
    };
    let extensions = c_string(device_bytes(device, ffi::CL_DEVICE_EXTENSIONS));
    let nv = extensions.split_whitespace().any(|e| e == "cl_nv_device_attribute_query");
    let tensor_cores = nv && device_u32(device, DEVICE_COMPUTE_CAPABILITY_MAJOR_NV).is_some_and(|cc| cc >= 8);
    ClDevice {
        platform,
        device,
        platform_name: platform_name.to_string(),
        name: c_string(device_bytes(device, ffi::CL_DEVICE_NAME)),
        vendor: c_string(device_bytes(device, ffi::CL_DEVICE_VENDOR)),
        kind,
        driver_version: c_string(device_bytes(device, ffi::CL_DRIVER_VERSION)),
        device_version: c_string(device_bytes(device, ffi::CL_DEVICE_VERSION)),
        pci_id: pci_id(device, &extensions),
        tensor_cores,
        extensions,
        global_mem: device_u64(device, ffi::CL_DEVICE_GLOBAL_MEM_SIZE),
        max_alloc: device_u64(device, ffi::CL_DEVICE_MAX_MEM_ALLOC_SIZE),
        local_mem: device_u64(device, ffi::CL_DEVICE_LOCAL_MEM_SIZE),
        max_work_group: device_u64(device, ffi::CL_DEVICE_MAX_WORK_GROUP_SIZE) as usize,
        compute_units: device_u32(device, ffi::CL_DEVICE_MAX_COMPUTE_UNITS).unwrap_or(0),
    }
}

/// Every device of every platform, platforms in loader order. An error only when the loader itself fails;
/// no platform at all is an empty list (the caller words the rejection).
/// Environment variable: when set (non-empty), only platforms whose name contains it (case-insensitive) are
/// enumerated, e.g. `SD3_OPENCL_PLATFORM=nvidia` on a machine that also has PoCL, so that device 0 is the GPU.
pub const PLATFORM_ENV: &str = "SD3_OPENCL_PLATFORM";

pub fn enumerate() -> Result<Vec<ClDevice>> {
    let only = std::env::var(PLATFORM_ENV).ok().filter(|v| !v.is_empty()).map(|v| v.to_lowercase());
    let mut out = Vec::new();
    for p in platform_ids()? {
        let pname = c_string(platform_bytes(p, ffi::CL_PLATFORM_NAME));
        if only.as_ref().is_some_and(|o| !pname.to_lowercase().contains(o.as_str())) {
            continue;
        }
        for d in device_ids(p)? {
            out.push(describe(p, &pname, d));
        }
    }
    Ok(out)
}

/// Number of platforms installed (for the wording of "no devices").
pub fn platform_count() -> usize {
    platform_ids().map(|p| p.len()).unwrap_or(0)
}
