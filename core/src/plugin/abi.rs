//! The `#[repr(C)]` mirror of `plugins/include/sd3_plugin.h`. Field for field the same; a test compiles a C
//! program against the header and compares every `sizeof` / `offsetof` with these types.
//!
//! Ids (dtypes, op kinds, status codes) are shared with the rest of the core: [`crate::DType`],
//! [`crate::op::kind`], [`crate::error::status`], [`crate::DeviceKind`].

use std::ffi::c_char;
use std::ffi::c_void;

/// Bumped on any incompatible change; a plugin built for another major is refused.
pub const ABI_MAJOR: u32 = 1;
/// Bumped when fields or functions are appended; older plugins keep working.
pub const ABI_MINOR: u32 = 3;
/// The one symbol a plugin library exports.
pub const ENTRY_SYMBOL: &str = "sd3_backend_entry";

/// `sd3_backend_entry(host_abi_major, host_abi_minor)`: returns the plugin's table (owned by the plugin and
/// valid until the library is unloaded), or null to decline this host.
pub type EntryFn = unsafe extern "C" fn(host_abi_major: u32, host_abi_minor: u32) -> *const sd3_plugin;

/// `sd3_tensor_desc`: one operand of an op. Filled by the host. Strides and offset count elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct sd3_tensor_desc {
    pub buffer: u64,
    pub dtype: u32,
    pub rank: u32,
    pub shape: [u64; 8],
    pub strides: [u64; 8],
    pub offset: u64,
}

/// `sd3_op_desc`: an op and its operands. Filled by the host; `struct_size` is the host's `sizeof`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sd3_op_desc {
    pub struct_size: u32,
    pub kind: u32,
    pub sub: u32,
    pub n_inputs: u32,
    pub n_outputs: u32,
    pub reserved: u32,
    pub iparams: [i64; 8],
    pub fparams: [f32; 8],
    pub inputs: *const sd3_tensor_desc,
    pub outputs: *const sd3_tensor_desc,
}

/// `sd3_device_info`: filled by the plugin; `struct_size` is the plugin's `sizeof`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sd3_device_info {
    pub struct_size: u32,
    pub kind: u32,
    pub memory_bytes: u64,
    pub free_memory_bytes: u64,
    pub name: *const c_char,
    pub pci_id: *const c_char,
    pub dtype_mask: u32,
    pub reserved: u32,
    pub capabilities: *const c_char,
}

/// `sd3_device`: the vtable of one opened device. Filled by the plugin; `struct_size` is the plugin's `sizeof`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sd3_device {
    pub struct_size: u32,
    pub reserved: u32,
    pub self_: *mut c_void,
    pub get_info: Option<unsafe extern "C" fn(self_: *mut c_void) -> *const sd3_device_info>,
    pub alloc: Option<unsafe extern "C" fn(self_: *mut c_void, bytes: u64, out_buffer: *mut u64) -> i32>,
    pub free: Option<unsafe extern "C" fn(self_: *mut c_void, buffer: u64)>,
    pub upload: Option<
        unsafe extern "C" fn(self_: *mut c_void, buffer: u64, offset: u64, data: *const c_void, bytes: u64) -> i32,
    >,
    pub download:
        Option<unsafe extern "C" fn(self_: *mut c_void, buffer: u64, offset: u64, out: *mut c_void, bytes: u64) -> i32>,
    pub copy: Option<
        unsafe extern "C" fn(
            self_: *mut c_void,
            src: u64,
            src_offset: u64,
            dst: u64,
            dst_offset: u64,
            bytes: u64,
        ) -> i32,
    >,
    pub supports: Option<unsafe extern "C" fn(self_: *mut c_void, op: *const sd3_op_desc) -> i32>,
    pub execute: Option<unsafe extern "C" fn(self_: *mut c_void, op: *const sd3_op_desc) -> i32>,
    pub synchronize: Option<unsafe extern "C" fn(self_: *mut c_void) -> i32>,
    pub stats: Option<unsafe extern "C" fn(self_: *mut c_void) -> *const c_char>,
    pub last_error: Option<unsafe extern "C" fn(self_: *mut c_void) -> *const c_char>,
    pub destroy: Option<unsafe extern "C" fn(self_: *mut c_void)>,
    // ABI 1.1: optional device timing markers (all three or none); absent in a 1.0 plugin's shorter table.
    pub record_marker: Option<unsafe extern "C" fn(self_: *mut c_void, out_marker: *mut u64) -> i32>,
    pub marker_elapsed:
        Option<unsafe extern "C" fn(self_: *mut c_void, start: u64, end: u64, out_seconds: *mut f64) -> i32>,
    pub release_marker: Option<unsafe extern "C" fn(self_: *mut c_void, marker: u64)>,
}

/// `sd3_plugin`: the table `sd3_backend_entry` returns. Filled by the plugin; `struct_size` is its `sizeof`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct sd3_plugin {
    pub struct_size: u32,
    pub abi_major: u32,
    pub abi_minor: u32,
    pub reserved: u32,
    pub name: *const c_char,
    pub version: *const c_char,
    pub init: Option<unsafe extern "C" fn(options: *const c_char) -> i32>,
    pub device_count: Option<unsafe extern "C" fn() -> u32>,
    pub open_device: Option<unsafe extern "C" fn(index: u32, out_device: *mut *const sd3_device) -> i32>,
    pub last_error: Option<unsafe extern "C" fn() -> *const c_char>,
    pub shutdown: Option<unsafe extern "C" fn()>,
}

/// Size of the ABI 1.0 `sd3_plugin` (everything up to and including `shutdown`): the least the host accepts.
pub const PLUGIN_MIN_SIZE: usize = std::mem::size_of::<sd3_plugin>();
/// Size of the ABI 1.0 `sd3_device` (up to and including `destroy`).
pub const DEVICE_MIN_SIZE: usize = std::mem::offset_of!(sd3_device, record_marker);
/// Size of the ABI 1.1 `sd3_device` (up to and including `release_marker`): the least that has the markers.
pub const DEVICE_MARKERS_SIZE: usize = std::mem::size_of::<sd3_device>();
/// Size of the ABI 1.0 `sd3_device_info` (up to and including `capabilities`).
pub const DEVICE_INFO_MIN_SIZE: usize = std::mem::size_of::<sd3_device_info>();

/// `sizeof` and `offsetof` of every ABI struct and field, as `(name, value)`, in the order the layout test
/// prints them from C. Keep in step with `plugins/include/sd3_plugin.h`.
pub fn layout_table() -> Vec<(&'static str, usize)> {
    use std::mem::{offset_of, size_of};
    vec![
        ("sizeof(sd3_tensor_desc)", size_of::<sd3_tensor_desc>()),
        ("sd3_tensor_desc.buffer", offset_of!(sd3_tensor_desc, buffer)),
        ("sd3_tensor_desc.dtype", offset_of!(sd3_tensor_desc, dtype)),
        ("sd3_tensor_desc.rank", offset_of!(sd3_tensor_desc, rank)),
        ("sd3_tensor_desc.shape", offset_of!(sd3_tensor_desc, shape)),
        ("sd3_tensor_desc.strides", offset_of!(sd3_tensor_desc, strides)),
        ("sd3_tensor_desc.offset", offset_of!(sd3_tensor_desc, offset)),
        ("sizeof(sd3_op_desc)", size_of::<sd3_op_desc>()),
        ("sd3_op_desc.struct_size", offset_of!(sd3_op_desc, struct_size)),
        ("sd3_op_desc.kind", offset_of!(sd3_op_desc, kind)),
        ("sd3_op_desc.sub", offset_of!(sd3_op_desc, sub)),
        ("sd3_op_desc.n_inputs", offset_of!(sd3_op_desc, n_inputs)),
        ("sd3_op_desc.n_outputs", offset_of!(sd3_op_desc, n_outputs)),
        ("sd3_op_desc.iparams", offset_of!(sd3_op_desc, iparams)),
        ("sd3_op_desc.fparams", offset_of!(sd3_op_desc, fparams)),
        ("sd3_op_desc.inputs", offset_of!(sd3_op_desc, inputs)),
        ("sd3_op_desc.outputs", offset_of!(sd3_op_desc, outputs)),
        ("sizeof(sd3_device_info)", size_of::<sd3_device_info>()),
        ("sd3_device_info.struct_size", offset_of!(sd3_device_info, struct_size)),
        ("sd3_device_info.kind", offset_of!(sd3_device_info, kind)),
        ("sd3_device_info.memory_bytes", offset_of!(sd3_device_info, memory_bytes)),
        ("sd3_device_info.free_memory_bytes", offset_of!(sd3_device_info, free_memory_bytes)),
        ("sd3_device_info.name", offset_of!(sd3_device_info, name)),
        ("sd3_device_info.pci_id", offset_of!(sd3_device_info, pci_id)),
        ("sd3_device_info.dtype_mask", offset_of!(sd3_device_info, dtype_mask)),
        ("sd3_device_info.capabilities", offset_of!(sd3_device_info, capabilities)),
        ("sizeof(sd3_device)", size_of::<sd3_device>()),
        ("sd3_device.struct_size", offset_of!(sd3_device, struct_size)),
        ("sd3_device.self", offset_of!(sd3_device, self_)),
        ("sd3_device.get_info", offset_of!(sd3_device, get_info)),
        ("sd3_device.alloc", offset_of!(sd3_device, alloc)),
        ("sd3_device.free", offset_of!(sd3_device, free)),
        ("sd3_device.upload", offset_of!(sd3_device, upload)),
        ("sd3_device.download", offset_of!(sd3_device, download)),
        ("sd3_device.copy", offset_of!(sd3_device, copy)),
        ("sd3_device.supports", offset_of!(sd3_device, supports)),
        ("sd3_device.execute", offset_of!(sd3_device, execute)),
        ("sd3_device.synchronize", offset_of!(sd3_device, synchronize)),
        ("sd3_device.stats", offset_of!(sd3_device, stats)),
        ("sd3_device.last_error", offset_of!(sd3_device, last_error)),
        ("sd3_device.destroy", offset_of!(sd3_device, destroy)),
        ("sd3_device.record_marker", offset_of!(sd3_device, record_marker)),
        ("sd3_device.marker_elapsed", offset_of!(sd3_device, marker_elapsed)),
        ("sd3_device.release_marker", offset_of!(sd3_device, release_marker)),
        ("sizeof(sd3_plugin)", size_of::<sd3_plugin>()),
        ("sd3_plugin.struct_size", offset_of!(sd3_plugin, struct_size)),
        ("sd3_plugin.abi_major", offset_of!(sd3_plugin, abi_major)),
        ("sd3_plugin.abi_minor", offset_of!(sd3_plugin, abi_minor)),
        ("sd3_plugin.name", offset_of!(sd3_plugin, name)),
        ("sd3_plugin.version", offset_of!(sd3_plugin, version)),
        ("sd3_plugin.init", offset_of!(sd3_plugin, init)),
        ("sd3_plugin.device_count", offset_of!(sd3_plugin, device_count)),
        ("sd3_plugin.open_device", offset_of!(sd3_plugin, open_device)),
        ("sd3_plugin.last_error", offset_of!(sd3_plugin, last_error)),
        ("sd3_plugin.shutdown", offset_of!(sd3_plugin, shutdown)),
    ]
}

/// The `SD3_*` integer constants of the header, `(name, value)`, for the same drift test.
pub fn constant_table() -> Vec<(String, i64)> {
    use crate::error::status;
    use crate::op::kind;
    use crate::{BinaryOp, DType, DeviceKind, UnaryOp};
    let mut v: Vec<(String, i64)> = [
        ("SD3_ABI_MAJOR", ABI_MAJOR as i64),
        ("SD3_ABI_MINOR", ABI_MINOR as i64),
        ("SD3_MAX_RANK", crate::MAX_RANK as i64),
        ("SD3_STATUS_OK", status::OK as i64),
        ("SD3_STATUS_ERROR", status::ERROR as i64),
        ("SD3_STATUS_UNSUPPORTED", status::UNSUPPORTED as i64),
        ("SD3_STATUS_OUT_OF_MEMORY", status::OUT_OF_MEMORY as i64),
        ("SD3_STATUS_INVALID_ARGUMENT", status::INVALID_ARGUMENT as i64),
        ("SD3_STATUS_DEVICE_LOST", status::DEVICE_LOST as i64),
        ("SD3_STATUS_PANIC", status::PANIC as i64),
        ("SD3_DTYPE_F32", DType::F32 as i64),
        ("SD3_DTYPE_F16", DType::F16 as i64),
        ("SD3_DTYPE_BF16", DType::BF16 as i64),
        ("SD3_DTYPE_I32", DType::I32 as i64),
        ("SD3_DTYPE_I64", DType::I64 as i64),
        ("SD3_DTYPE_U8", DType::U8 as i64),
        ("SD3_DEVICE_KIND_CPU", DeviceKind::Cpu as i64),
        ("SD3_DEVICE_KIND_GPU", DeviceKind::Gpu as i64),
        ("SD3_DEVICE_KIND_NPU", DeviceKind::Npu as i64),
        ("SD3_DEVICE_KIND_OTHER", DeviceKind::Other as i64),
        ("SD3_OP_COPY", kind::COPY as i64),
        ("SD3_OP_FILL", kind::FILL as i64),
        ("SD3_OP_UNARY", kind::UNARY as i64),
        ("SD3_OP_BINARY", kind::BINARY as i64),
        ("SD3_OP_AFFINE", kind::AFFINE as i64),
        ("SD3_OP_MATMUL", kind::MATMUL as i64),
        ("SD3_OP_SOFTMAX", kind::SOFTMAX as i64),
        ("SD3_OP_LAYER_NORM", kind::LAYER_NORM as i64),
        ("SD3_OP_RMS_NORM", kind::RMS_NORM as i64),
        ("SD3_OP_LAYER_NORM_MODULATE", kind::LAYER_NORM_MODULATE as i64),
        ("SD3_OP_MODULATE", kind::MODULATE as i64),
        ("SD3_OP_GATED_RESIDUAL", kind::GATED_RESIDUAL as i64),
        ("SD3_OP_ATTENTION", kind::ATTENTION as i64),
        ("SD3_OP_CONV2D", kind::CONV2D as i64),
        ("SD3_OP_GROUP_NORM", kind::GROUP_NORM as i64),
        ("SD3_OP_UPSAMPLE_NEAREST2D", kind::UPSAMPLE_NEAREST2D as i64),
        ("SD3_OP_GATHER", kind::GATHER as i64),
        ("SD3_OP_MATMUL_GATED_RESIDUAL", kind::MATMUL_GATED_RESIDUAL as i64),
        ("SD3_OP_ATTENTION_BACKWARD", kind::ATTENTION_BACKWARD as i64),
        ("SD3_OP_COUNT", kind::COUNT as i64),
    ]
    .into_iter()
    .map(|(n, x)| (n.to_string(), x))
    .collect();
    // Sub-kinds: names are `SD3_UNARY_<NAME>` / `SD3_BINARY_<NAME>` with the op's report name upper-cased.
    for u in UnaryOp::ALL {
        v.push((format!("SD3_UNARY_{}", u.name().to_ascii_uppercase()), u as i64));
    }
    for b in BinaryOp::ALL {
        v.push((format!("SD3_BINARY_{}", b.name().to_ascii_uppercase()), b as i64));
    }
    v
}
