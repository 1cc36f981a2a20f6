//! The plugin side of the ABI for backends written in Rust: [`export_backend!`](crate::export_backend) turns a
//! [`BackendProvider`] into a library the host can load, with every shim wrapped in `catch_unwind` so a panic
//! becomes `SD3_STATUS_PANIC` plus a message and never unwinds into the host.
//!
//! ```ignore
//! // In a crate `sd3-backend-mine` with `crate-type = ["cdylib", "rlib"]`:
//! sd3_core::export_backend!("mine", |options: &str| MineProvider::new(options));
//! ```
//!
//! The first argument is the backend name (a string literal: it is the `--backend` name and is read before
//! `init`); the second is called by `init` with the `key=value;...` options string and returns
//! `sd3_core::Result<P>` for any `P: BackendProvider`. The macro defines the `sd3_backend_entry` symbol, so a
//! library exports at most one backend, and one binary can link the rlib of at most one crate using the macro
//! (two are a duplicate-symbol link error; load several plugins as cdylibs instead). Build with `panic = "unwind"` (the default): with `panic = "abort"` a
//! panic ends the host process.

use super::abi::{self, sd3_device, sd3_device_info, sd3_op_desc, sd3_plugin, sd3_tensor_desc};
use crate::error::status;
use crate::{
    BackendProvider, BufferId, DType, Device, EncodedOp, Error, Layout, MarkerId, Op, OpCall, Result, TensorDesc,
};
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Export a [`BackendProvider`] through the C ABI. See the [module docs](crate::plugin::export).
#[macro_export]
macro_rules! export_backend {
    ($name:literal, $create:expr) => {
        /// The sd3 plugin entry point (see `plugins/include/sd3_plugin.h`).
        #[unsafe(no_mangle)]
        pub extern "C" fn sd3_backend_entry(
            host_abi_major: u32,
            host_abi_minor: u32,
        ) -> *const $crate::plugin::abi::sd3_plugin {
            $crate::plugin::export::entry(
                host_abi_major,
                host_abi_minor,
                concat!($name, "\0"),
                concat!(env!("CARGO_PKG_VERSION"), "\0"),
                |options: &str| $crate::plugin::export::boxed(options, $create),
            )
        }
    };
}

/// Creates the provider from the options string; what `export_backend!` registers.
pub type CreateFn = fn(&str) -> Result<Box<dyn BackendProvider>>;

/// Box the provider a user's constructor returns (lets the macro accept a closure with an inferred argument).
pub fn boxed<P: BackendProvider + 'static>(
    options: &str,
    create: impl FnOnce(&str) -> Result<P>,
) -> Result<Box<dyn BackendProvider>> {
    Ok(Box::new(create(options)?))
}

struct Exported {
    table: sd3_plugin,
    create: CreateFn,
}
// SAFETY: the table points only at `'static` strings and functions.
unsafe impl Send for Exported {}
unsafe impl Sync for Exported {}

static EXPORTED: OnceLock<Exported> = OnceLock::new();
static PROVIDER: Mutex<Option<Arc<dyn BackendProvider>>> = Mutex::new(None);
static LAST_ERROR: Mutex<Option<CString>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a shim is caught; the data behind these locks is always left consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `sd3_backend_entry` does: build the plugin table once and return it. `name` and `version` must end
/// in NUL. The host's ABI version is not checked here: the host compares majors and reports a mismatch itself.
pub fn entry(
    _host_major: u32,
    _host_minor: u32,
    name: &'static str,
    version: &'static str,
    create: CreateFn,
) -> *const sd3_plugin {
    let exported = EXPORTED.get_or_init(|| Exported {
        table: sd3_plugin {
            struct_size: std::mem::size_of::<sd3_plugin>() as u32,
            abi_major: abi::ABI_MAJOR,
            abi_minor: abi::ABI_MINOR,
            reserved: 0,
            name: static_c_str(name),
            version: static_c_str(version),
            init: Some(shim_init),
            device_count: Some(shim_device_count),
            open_device: Some(shim_open_device),
            last_error: Some(shim_last_error),
            shutdown: Some(shim_shutdown),
        },
        create,
    });
    &exported.table
}

fn static_c_str(s: &'static str) -> *const c_char {
    match CStr::from_bytes_with_nul(s.as_bytes()) {
        Ok(c) => c.as_ptr(),
        Err(_) => c"invalid-name".as_ptr(),
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into());
    format!("panic: {what}")
}

fn to_c_string(s: String) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// Run `f`, catching errors and panics: the status to return, with the message stored in `slot`.
fn guarded(slot: &Mutex<Option<CString>>, f: impl FnOnce() -> Result<()>) -> i32 {
    let (code, msg) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return status::OK,
        Ok(Err(e)) => (e.code(), e.to_string()),
        Err(p) => (status::PANIC, panic_message(p)),
    };
    *lock(slot) = Some(to_c_string(msg));
    code
}

fn provider() -> Result<Arc<dyn BackendProvider>> {
    lock(&PROVIDER).clone().ok_or_else(|| Error::msg("the plugin is not initialised (init not called or failed)"))
}

unsafe extern "C" fn shim_init(options: *const c_char) -> i32 {
    guarded(&LAST_ERROR, || {
        let options =
            if options.is_null() { String::new() } else { CStr::from_ptr(options).to_string_lossy().into_owned() };
        let create = EXPORTED.get().ok_or_else(|| Error::msg("init called before sd3_backend_entry"))?.create;
        let p = create(&options)?;
        *lock(&PROVIDER) = Some(Arc::from(p));
        Ok(())
    })
}

unsafe extern "C" fn shim_device_count() -> u32 {
    let mut n = 0;
    let rc = guarded(&LAST_ERROR, || {
        n = provider()?.device_count() as u32;
        Ok(())
    });
    if rc == status::OK {
        n
    } else {
        0
    }
}

unsafe extern "C" fn shim_open_device(index: u32, out: *mut *const sd3_device) -> i32 {
    guarded(&LAST_ERROR, || {
        if out.is_null() {
            return Err(Error::InvalidArgument("open_device: null out pointer".into()));
        }
        let device = provider()?.open_device(index as usize)?;
        let shim = DeviceShim::new(device);
        *out = &shim.table;
        Ok(())
    })
}

unsafe extern "C" fn shim_last_error() -> *const c_char {
    lock(&LAST_ERROR).as_ref().map_or(c"".as_ptr(), |s| s.as_ptr())
}

unsafe extern "C" fn shim_shutdown() {
    let _ = catch_unwind(|| lock(&PROVIDER).take());
}

// ------------------------------------------------------------------------------------------------ devices

/// One opened device: its C table (whose `self` points back here) and the strings it hands out.
struct DeviceShim {
    table: sd3_device,
    device: Arc<dyn Device>,
    state: Mutex<ShimState>,
}

/// Strings and structs returned to the host stay valid until the next call on this device.
#[derive(Default)]
struct ShimState {
    last_error: Option<CString>,
    stats: Option<CString>,
    info_strings: Vec<CString>,
    info: Option<sd3_device_info>,
}

impl DeviceShim {
    /// Leak a shim for `device`; `destroy` frees it.
    fn new(device: Arc<dyn Device>) -> &'static DeviceShim {
        let shim = Box::leak(Box::new(DeviceShim {
            table: sd3_device {
                struct_size: std::mem::size_of::<sd3_device>() as u32,
                reserved: 0,
                self_: std::ptr::null_mut(),
                get_info: Some(dev_get_info),
                alloc: Some(dev_alloc),
                free: Some(dev_free),
                upload: Some(dev_upload),
                download: Some(dev_download),
                copy: Some(dev_copy),
                supports: Some(dev_supports),
                execute: Some(dev_execute),
                synchronize: Some(dev_synchronize),
                stats: Some(dev_stats),
                last_error: Some(dev_last_error),
                destroy: Some(dev_destroy),
                record_marker: Some(dev_record_marker),
                marker_elapsed: Some(dev_marker_elapsed),
                release_marker: Some(dev_release_marker),
            },
            device,
            state: Mutex::new(ShimState::default()),
        }));
        shim.table.self_ = shim as *mut DeviceShim as *mut c_void;
        shim
    }

    fn run(&self, f: impl FnOnce(&dyn Device) -> Result<()>) -> i32 {
        let (code, msg) = match catch_unwind(AssertUnwindSafe(|| f(self.device.as_ref()))) {
            Ok(Ok(())) => return status::OK,
            Ok(Err(e)) => (e.code(), e.to_string()),
            Err(p) => (status::PANIC, panic_message(p)),
        };
        lock(&self.state).last_error = Some(to_c_string(msg));
        code
    }

    fn set_error(&self, msg: String) {
        lock(&self.state).last_error = Some(to_c_string(msg));
    }
}

/// # Safety
/// `p` must be a `self` handed out by [`DeviceShim::new`] and not yet destroyed.
unsafe fn shim<'a>(p: *mut c_void) -> &'a DeviceShim {
    &*(p as *const DeviceShim)
}

fn usize_of(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} {v} does not fit in usize")))
}

unsafe extern "C" fn dev_get_info(p: *mut c_void) -> *const sd3_device_info {
    let s = shim(p);
    let r = catch_unwind(AssertUnwindSafe(|| {
        let info = s.device.info();
        let mut st = lock(&s.state);
        let name = to_c_string(info.name);
        let pci = info.pci_id.map(to_c_string);
        let caps = to_c_string(info.capabilities.join(";"));
        let c = sd3_device_info {
            struct_size: std::mem::size_of::<sd3_device_info>() as u32,
            kind: info.kind as u32,
            memory_bytes: info.memory_bytes,
            free_memory_bytes: info.free_memory_bytes,
            name: name.as_ptr(),
            pci_id: pci.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            dtype_mask: info.dtypes.iter().fold(0, |m, d| m | d.mask_bit()),
            reserved: 0,
            capabilities: caps.as_ptr(),
        };
        // Moving a CString does not move its heap buffer, so the pointers above stay valid.
        st.info_strings = [Some(name), pci, Some(caps)].into_iter().flatten().collect();
        st.info = Some(c);
        st.info.as_ref().map_or(std::ptr::null(), |i| i as *const sd3_device_info)
    }));
    r.unwrap_or_else(|p| {
        s.set_error(panic_message(p));
        std::ptr::null()
    })
}

unsafe extern "C" fn dev_alloc(p: *mut c_void, bytes: u64, out: *mut u64) -> i32 {
    shim(p).run(|d| {
        let b = d.alloc(usize_of(bytes, "alloc size")?)?;
        if out.is_null() {
            d.free(b);
            return Err(Error::InvalidArgument("alloc: null out pointer".into()));
        }
        *out = b.0;
        Ok(())
    })
}

unsafe extern "C" fn dev_free(p: *mut c_void, buffer: u64) {
    shim(p).run(|d| {
        d.free(BufferId(buffer));
        Ok(())
    });
}

unsafe extern "C" fn dev_upload(p: *mut c_void, buffer: u64, offset: u64, data: *const c_void, bytes: u64) -> i32 {
    shim(p).run(|d| {
        let n = usize_of(bytes, "upload size")?;
        let src: &[u8] = if n == 0 { &[] } else { std::slice::from_raw_parts(data as *const u8, n) };
        d.upload(BufferId(buffer), usize_of(offset, "offset")?, src)
    })
}

unsafe extern "C" fn dev_download(p: *mut c_void, buffer: u64, offset: u64, out: *mut c_void, bytes: u64) -> i32 {
    shim(p).run(|d| {
        let n = usize_of(bytes, "download size")?;
        let dst: &mut [u8] = if n == 0 { &mut [] } else { std::slice::from_raw_parts_mut(out as *mut u8, n) };
        d.download(BufferId(buffer), usize_of(offset, "offset")?, dst)
    })
}

unsafe extern "C" fn dev_copy(p: *mut c_void, src: u64, src_offset: u64, dst: u64, dst_offset: u64, bytes: u64) -> i32 {
    shim(p).run(|d| {
        d.copy_buffer(
            BufferId(src),
            usize_of(src_offset, "offset")?,
            BufferId(dst),
            usize_of(dst_offset, "offset")?,
            usize_of(bytes, "copy size")?,
        )
    })
}

/// An op descriptor from the host, as the core's types. Unknown kinds and dtypes are `Unsupported`.
///
/// # Safety
/// `op` must point to a descriptor whose operand arrays hold `n_inputs` / `n_outputs` entries.
pub unsafe fn decode_op_desc(op: *const sd3_op_desc) -> Result<(Op, Vec<TensorDesc>, Vec<TensorDesc>)> {
    if op.is_null() {
        return Err(Error::InvalidArgument("null op descriptor".into()));
    }
    let mut d: sd3_op_desc = std::mem::zeroed();
    let n = ((*op).struct_size as usize).min(std::mem::size_of::<sd3_op_desc>());
    std::ptr::copy_nonoverlapping(op as *const u8, &mut d as *mut sd3_op_desc as *mut u8, n);
    let e = EncodedOp { kind: d.kind, sub: d.sub, iparams: d.iparams, fparams: d.fparams };
    let unsupported =
        |detail: String| Error::Unsupported { backend: "plugin".into(), op: format!("kind {}", d.kind), detail };
    let op = Op::decode(&e).ok_or_else(|| unsupported(format!("unknown op kind {} / sub {}", d.kind, d.sub)))?;
    if d.n_inputs as usize != op.n_inputs() {
        return Err(Error::InvalidArgument(format!(
            "{}: {} inputs given, {} expected",
            op.name(),
            d.n_inputs,
            op.n_inputs()
        )));
    }
    let tensors = |p: *const sd3_tensor_desc, n: u32| -> Result<Vec<TensorDesc>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        if p.is_null() {
            return Err(Error::InvalidArgument("null operand array".into()));
        }
        std::slice::from_raw_parts(p, n as usize).iter().map(tensor_from_abi).collect()
    };
    Ok((op, tensors(d.inputs, d.n_inputs)?, tensors(d.outputs, d.n_outputs)?))
}

/// An operand from the host, as a [`TensorDesc`].
pub fn tensor_from_abi(t: &sd3_tensor_desc) -> Result<TensorDesc> {
    let dtype = DType::from_id(t.dtype).ok_or_else(|| Error::Unsupported {
        backend: "plugin".into(),
        op: "operand".into(),
        detail: format!("unknown dtype id {}", t.dtype),
    })?;
    let rank = t.rank as usize;
    if rank > crate::MAX_RANK {
        return Err(Error::InvalidArgument(format!("rank {rank} exceeds {}", crate::MAX_RANK)));
    }
    let dims = |v: &[u64]| v[..rank].iter().map(|&x| usize_of(x, "dimension")).collect::<Result<Vec<_>>>();
    let layout = Layout { shape: dims(&t.shape)?, strides: dims(&t.strides)?, offset: usize_of(t.offset, "offset")? };
    Ok(TensorDesc { buffer: BufferId(t.buffer), dtype, layout })
}

unsafe extern "C" fn dev_supports(p: *mut c_void, op: *const sd3_op_desc) -> i32 {
    let s = shim(p);
    let r = catch_unwind(AssertUnwindSafe(|| match decode_op_desc(op) {
        Ok((op, ins, outs)) => s.device.supports(&OpCall { op, inputs: &ins, outputs: &outs }),
        Err(_) => false,
    }));
    r.unwrap_or_else(|p| {
        s.set_error(panic_message(p));
        false
    }) as i32
}

unsafe extern "C" fn dev_execute(p: *mut c_void, op: *const sd3_op_desc) -> i32 {
    shim(p).run(|d| {
        let (op, ins, outs) = decode_op_desc(op)?;
        d.execute(&OpCall { op, inputs: &ins, outputs: &outs })
    })
}

unsafe extern "C" fn dev_synchronize(p: *mut c_void) -> i32 {
    shim(p).run(|d| d.synchronize())
}

unsafe extern "C" fn dev_stats(p: *mut c_void) -> *const c_char {
    let s = shim(p);
    let r = catch_unwind(AssertUnwindSafe(|| {
        let text = to_c_string(s.device.stats().join("\n"));
        let mut st = lock(&s.state);
        st.stats = Some(text);
        st.stats.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
    }));
    r.unwrap_or_else(|p| {
        s.set_error(panic_message(p));
        std::ptr::null()
    })
}

unsafe extern "C" fn dev_last_error(p: *mut c_void) -> *const c_char {
    let st = lock(&shim(p).state);
    st.last_error.as_ref().map_or(c"".as_ptr(), |c| c.as_ptr())
}

/// `Ok(None)` from the device (no markers) is `SD3_STATUS_UNSUPPORTED`, which the host reads as "no markers".
unsafe extern "C" fn dev_record_marker(p: *mut c_void, out: *mut u64) -> i32 {
    shim(p).run(|d| {
        if out.is_null() {
            return Err(Error::InvalidArgument("record_marker: null out pointer".into()));
        }
        match d.record_marker()? {
            Some(m) => {
                *out = m.0;
                Ok(())
            }
            None => Err(Error::Unsupported {
                backend: d.info().name,
                op: "record_marker".into(),
                detail: "this device records no timing markers".into(),
            }),
        }
    })
}

unsafe extern "C" fn dev_marker_elapsed(p: *mut c_void, start: u64, end: u64, out: *mut f64) -> i32 {
    shim(p).run(|d| {
        if out.is_null() {
            return Err(Error::InvalidArgument("marker_elapsed: null out pointer".into()));
        }
        *out = d.marker_elapsed(MarkerId(start), MarkerId(end))?;
        Ok(())
    })
}

unsafe extern "C" fn dev_release_marker(p: *mut c_void, marker: u64) {
    shim(p).run(|d| {
        d.release_marker(MarkerId(marker));
        Ok(())
    });
}

unsafe extern "C" fn dev_destroy(p: *mut c_void) {
    // SAFETY: `p` came from `Box::leak` in DeviceShim::new and the host calls destroy once.
    let b = Box::from_raw(p as *mut DeviceShim);
    let _ = catch_unwind(AssertUnwindSafe(move || drop(b)));
}
