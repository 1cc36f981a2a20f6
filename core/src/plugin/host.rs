//! The host side of the plugin ABI: load a library, check it, and wrap its C tables as a [`BackendProvider`]
//! and [`Device`]s.
//!
//! Loading is two steps so the registry can skip a library whose name is already taken before initialising it:
//! [`PluginLibrary::open`] (dlopen, entry symbol, table checks) then [`PluginLibrary::init`].
//!
//! Lifetimes: every [`PluginDevice`] holds the provider's shared state, and every tensor holds its device, so
//! `shutdown` runs only after the last device and buffer from the library is gone. A library whose `init` was
//! called is never unloaded (threads it started may outlive `shutdown`, as in ggml); one rejected before `init`
//! is unloaded at once. A library is initialised once per process while any provider or device from it lives
//! (a second discovery shares it); after its `shutdown`, a later discovery may call `init` again.
//!
//! Threading: the host never calls into one device from two threads at once, and never runs two plugin-level
//! functions (`init`, `device_count`, `open_device`, `last_error`, `shutdown`) at once. It reads `last_error`
//! under the same lock as the failed call, so the message belongs to that call.

use super::abi::{self, sd3_device, sd3_device_info, sd3_op_desc, sd3_plugin, sd3_tensor_desc};
use crate::error::status;
use crate::{
    BackendProvider, BufferId, DType, Device, DeviceInfo, DeviceKind, Error, MarkerId, Op, OpCall, Result, TensorDesc,
};
use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Read the first `size` bytes of a plugin-filled struct into a zeroed `T`: fields the plugin's (older, smaller)
/// struct lacks read as 0 / null / `None`, so optional entries past its end are never called.
///
/// # Safety
/// `ptr` must point to at least `min(size, size_of::<T>())` readable bytes, and `T` must be valid when zeroed.
unsafe fn read_prefix<T: Copy>(ptr: *const T, size: u32) -> T {
    let mut out: T = std::mem::zeroed();
    let n = (size as usize).min(std::mem::size_of::<T>());
    std::ptr::copy_nonoverlapping(ptr as *const u8, &mut out as *mut T as *mut u8, n);
    out
}

/// A C string from the plugin, or `""` for null. Invalid UTF-8 is replaced, never trusted.
///
/// # Safety
/// `p` must be null or a NUL-terminated string valid for the duration of the call.
unsafe fn c_str(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

fn reject(path: &Path, reason: impl Into<String>) -> Error {
    Error::Plugin { path: path.display().to_string(), reason: reason.into() }
}

/// Open a shared library the way plugins are opened: `RTLD_NOW | RTLD_LOCAL` on Unix, so a missing runtime
/// dependency fails here rather than at first use, and plugins cannot see each other's symbols.
fn open_library(path: &Path) -> std::result::Result<libloading::Library, libloading::Error> {
    #[cfg(unix)]
    {
        use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
        // SAFETY: loading a library runs its initialisers; plugins are trusted code the user asked to load.
        unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map(Into::into)
    }
    #[cfg(not(unix))]
    {
        // SAFETY: as above.
        unsafe { libloading::Library::new(path) }
    }
}

/// A plugin library opened and checked, but not initialised yet.
pub struct PluginLibrary {
    path: PathBuf,
    lib: libloading::Library,
    table_ptr: *const sd3_plugin,
    table: sd3_plugin,
    name: String,
    version: String,
}

impl PluginLibrary {
    /// dlopen the library, call its entry symbol and check the table (ABI major, size, required entries, name).
    pub fn open(path: &Path) -> Result<PluginLibrary> {
        let lib = open_library(path).map_err(|e| {
            reject(path, format!("cannot load the library (a runtime library or driver it needs may be missing): {e}"))
        })?;
        // SAFETY: the symbol's type is fixed by the ABI (`sd3_backend_entry` in sd3_plugin.h).
        let entry: abi::EntryFn = match unsafe { lib.get::<abi::EntryFn>(abi::ENTRY_SYMBOL.as_bytes()) } {
            Ok(sym) => *sym,
            Err(_) => {
                return Err(reject(
                    path,
                    format!(
                        "no `{}` symbol: not an sd3 backend plugin (or not built with export_backend!)",
                        abi::ENTRY_SYMBOL
                    ),
                ))
            }
        };
        // SAFETY: calling the plugin's entry as the ABI defines it.
        let table_ptr = unsafe { entry(abi::ABI_MAJOR, abi::ABI_MINOR) };
        if table_ptr.is_null() {
            return Err(reject(
                path,
                format!(
                    "{} returned NULL: the plugin declined host ABI {}.{}",
                    abi::ENTRY_SYMBOL,
                    abi::ABI_MAJOR,
                    abi::ABI_MINOR
                ),
            ));
        }
        // SAFETY: struct_size is the first field of every version of the table.
        let size = unsafe { (*table_ptr).struct_size };
        // Check the major before the size: a table from another major may have any layout after its header.
        let header_fits = size as usize >= 3 * std::mem::size_of::<u32>();
        // SAFETY: the table is at least `size` bytes long (the plugin says so).
        let table = unsafe { read_prefix(table_ptr, size) };
        if header_fits && table.abi_major != abi::ABI_MAJOR {
            return Err(reject(
                path,
                format!(
                    "ABI major version mismatch: the plugin was built for sd3 plugin ABI {}.{}, this host speaks {}.{}; \
                     rebuild the plugin against this host's sd3_plugin.h",
                    table.abi_major,
                    table.abi_minor,
                    abi::ABI_MAJOR,
                    abi::ABI_MINOR
                ),
            ));
        }
        if (size as usize) < abi::PLUGIN_MIN_SIZE {
            return Err(reject(
                path,
                format!(
                    "plugin table too small: struct_size {size}, ABI {}.0 needs at least {}",
                    abi::ABI_MAJOR,
                    abi::PLUGIN_MIN_SIZE
                ),
            ));
        }
        let missing: Vec<&str> = [
            ("init", table.init.is_none()),
            ("device_count", table.device_count.is_none()),
            ("open_device", table.open_device.is_none()),
            ("last_error", table.last_error.is_none()),
        ]
        .into_iter()
        .filter_map(|(n, m)| m.then_some(n))
        .collect();
        if !missing.is_empty() {
            return Err(reject(path, format!("plugin table lacks required functions: {}", missing.join(", "))));
        }
        // SAFETY: the ABI says name and version are NUL-terminated strings owned by the plugin.
        let name = unsafe { c_str(table.name) };
        let version = unsafe { c_str(table.version) };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(reject(path, format!("invalid backend name {name:?} (expected [A-Za-z0-9_-]+)")));
        }
        Ok(PluginLibrary { path: path.to_path_buf(), lib, table_ptr, table, name, version })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn version(&self) -> &str {
        &self.version
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// ABI version the plugin was built for, `(major, minor)`.
    pub fn abi_version(&self) -> (u32, u32) {
        (self.table.abi_major, self.table.abi_minor)
    }
    /// Address of the plugin's table: the same library reached by two paths returns the same table.
    pub fn table_address(&self) -> usize {
        self.table_ptr as usize
    }

    /// Call `init(options)` and count devices. Rejected (with the plugin's message) when init fails or the plugin
    /// has no device. From here on the library stays loaded for the life of the process.
    ///
    /// A library is initialised once per process while any provider or device from it lives: a second `init` of
    /// the same library (another discovery, another thread) shares the first, provided the options are the same.
    pub fn init(self, options: &str) -> Result<PluginProvider> {
        let c_options =
            CString::new(options).map_err(|_| reject(&self.path, "backend options contain a NUL byte".to_string()))?;
        let address = self.table_address();
        loop {
            let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
            let existing = live.iter().find(|e| e.address == address).map(|e| (e.plugin.upgrade(), e.options.clone()));
            match existing {
                Some((Some(shared), first_options)) => {
                    drop(live);
                    if first_options != options {
                        return Err(reject(
                            &self.path,
                            format!(
                                "already initialised in this process with options {first_options:?}; it cannot be \
                                 initialised again with {options:?} while its devices are in use"
                            ),
                        ));
                    }
                    let guard = shared.lock.lock().unwrap();
                    // SAFETY: device_count is required.
                    let count = unsafe { (shared.table.device_count.unwrap())() } as usize;
                    drop(guard);
                    return Ok(PluginProvider { shared, device_count: count });
                }
                // Its last user is being dropped: wait until its shutdown has run.
                Some((None, _)) => {
                    drop(live);
                    std::thread::yield_now();
                }
                None => {
                    let (result, shared) = self.init_locked(&c_options);
                    if let Ok(p) = &result {
                        live.push(Live { address, options: options.to_string(), plugin: Arc::downgrade(&p.shared) });
                    }
                    // Dropping a failed plugin takes LIVE in its Drop: release it first.
                    drop(live);
                    drop(shared);
                    return result;
                }
            }
        }
    }

    /// The first `init` of this library in the process; called with [`LIVE`] held. Returns the shared state
    /// separately on failure so the caller can drop it after releasing the lock.
    fn init_locked(self, c_options: &CString) -> (Result<PluginProvider>, Option<Arc<LoadedPlugin>>) {
        let PluginLibrary { path, lib, table, name, version, .. } = self;
        let shared = Arc::new(LoadedPlugin {
            path: path.clone(),
            name,
            version,
            table,
            initialised: false.into(),
            lock: Mutex::new(()),
            _lib: ManuallyDrop::new(lib),
        });
        let guard = shared.lock.lock().unwrap();
        // SAFETY: init is required (checked in open); the options string lives across the call.
        let rc = unsafe { (table.init.unwrap())(c_options.as_ptr()) };
        if rc != status::OK {
            let msg = shared.last_error_locked();
            drop(guard);
            return (Err(reject(&path, format!("init failed (status {}): {msg}", status_name(rc)))), Some(shared));
        }
        *shared.initialised.lock().unwrap() = true;
        // SAFETY: device_count is required.
        let count = unsafe { (table.device_count.unwrap())() } as usize;
        if count == 0 {
            let msg = shared.last_error_locked();
            let why = if msg.is_empty() { String::new() } else { format!(": {msg}") };
            drop(guard);
            return (Err(reject(&path, format!("no devices{why}"))), Some(shared));
        }
        drop(guard);
        (Ok(PluginProvider { shared, device_count: count }), None)
    }
}

/// An initialised plugin of this process.
struct Live {
    /// Address of its `sd3_plugin` table: one per loaded library.
    address: usize,
    options: String,
    plugin: std::sync::Weak<LoadedPlugin>,
}

/// Every initialised plugin, so one library is initialised once; `init` and `shutdown` of any plugin run under
/// this lock, so a library's `shutdown` always finishes before it is initialised again.
static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

/// State shared by a provider and every device opened from it.
struct LoadedPlugin {
    path: PathBuf,
    name: String,
    version: String,
    table: sd3_plugin,
    initialised: Mutex<bool>,
    /// Serialises plugin-level calls.
    lock: Mutex<()>,
    /// Never dropped: see the module docs.
    _lib: ManuallyDrop<libloading::Library>,
}

// SAFETY: the table holds function pointers and pointers to plugin-owned constant strings; calls through it are
// serialised by `lock` as the ABI's threading rules require.
unsafe impl Send for LoadedPlugin {}
unsafe impl Sync for LoadedPlugin {}

impl LoadedPlugin {
    /// The plugin-level last error; call with `lock` held.
    fn last_error_locked(&self) -> String {
        // SAFETY: last_error is required; the string is valid until the next plugin-level call.
        unsafe { c_str((self.table.last_error.unwrap())()) }
    }
}

impl Drop for LoadedPlugin {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        if *self.initialised.lock().unwrap() {
            if let Some(shutdown) = self.table.shutdown {
                let _guard = self.lock.lock().unwrap();
                // SAFETY: the last device of this plugin is gone; shutdown is called once per successful init.
                unsafe { shutdown() };
            }
        }
        let me = self as *const LoadedPlugin;
        live.retain(|e| e.plugin.as_ptr() != me);
    }
}

/// A loaded, initialised plugin as a [`BackendProvider`].
pub struct PluginProvider {
    shared: Arc<LoadedPlugin>,
    device_count: usize,
}

impl PluginProvider {
    pub fn path(&self) -> &Path {
        &self.shared.path
    }
    pub fn abi_version(&self) -> (u32, u32) {
        (self.shared.table.abi_major, self.shared.table.abi_minor)
    }
    /// Open a device as the concrete [`PluginDevice`] type.
    pub fn open_plugin_device(&self, index: usize) -> Result<PluginDevice> {
        let p = &self.shared;
        if index >= self.device_count {
            return Err(Error::InvalidArgument(format!(
                "{}: no device {index} ({} device(s))",
                p.name, self.device_count
            )));
        }
        let guard = p.lock.lock().unwrap();
        let mut out: *const sd3_device = std::ptr::null();
        // SAFETY: open_device is required; `out` is a valid place for the result.
        let rc = unsafe { (p.table.open_device.unwrap())(index as u32, &mut out) };
        if rc != status::OK || out.is_null() {
            let msg = p.last_error_locked();
            return Err(Error::backend(
                &p.name,
                format!("open_device({index}) failed (status {}): {msg}", status_name(rc)),
            ));
        }
        drop(guard);
        // SAFETY: the plugin returned a device table whose first field is its size.
        let table = unsafe { read_prefix(out, (*out).struct_size) };
        let size = table.struct_size as usize;
        let required = [
            ("get_info", table.get_info.is_none()),
            ("alloc", table.alloc.is_none()),
            ("free", table.free.is_none()),
            ("upload", table.upload.is_none()),
            ("download", table.download.is_none()),
            ("supports", table.supports.is_none()),
            ("execute", table.execute.is_none()),
            ("synchronize", table.synchronize.is_none()),
            ("last_error", table.last_error.is_none()),
            ("destroy", table.destroy.is_none()),
        ];
        let missing: Vec<&str> = required.into_iter().filter_map(|(n, m)| m.then_some(n)).collect();
        if size < abi::DEVICE_MIN_SIZE || !missing.is_empty() {
            if let Some(destroy) = table.destroy {
                // SAFETY: hand the device back to the plugin before refusing it.
                unsafe { destroy(table.self_) };
            }
            return Err(Error::backend(
                &p.name,
                format!(
                    "device {index}: invalid device table (struct_size {size}, at least {} needed; missing: {})",
                    abi::DEVICE_MIN_SIZE,
                    if missing.is_empty() { "none".to_string() } else { missing.join(", ") }
                ),
            ));
        }
        // ABI 1.1 markers: only when the table is long enough for them and all three are there.
        let markers = size >= abi::DEVICE_MARKERS_SIZE
            && table.record_marker.is_some()
            && table.marker_elapsed.is_some()
            && table.release_marker.is_some();
        Ok(PluginDevice {
            plugin: p.clone(),
            table,
            markers,
            markers_declined: false.into(),
            lock: Mutex::new(()),
            label: format!("{}:{index}", p.name),
        })
    }
}

impl BackendProvider for PluginProvider {
    fn name(&self) -> &str {
        &self.shared.name
    }
    fn version(&self) -> String {
        self.shared.version.clone()
    }
    fn device_count(&self) -> usize {
        self.device_count
    }
    fn open_device(&self, index: usize) -> Result<Arc<dyn Device>> {
        Ok(Arc::new(self.open_plugin_device(index)?))
    }
}

/// Whether `op` uses a parameter that a plugin built for ABI minor `minor` does not know, and so would silently
/// ignore: such a call is declined (the core then decomposes it, see [`crate::legalize`]) and never sent.
/// ABI 1.1 added the matmul activation epilogue (`iparams[1]`), ABI 1.2 the matmul with a gated residual, ABI 1.3
/// the attention backward.
pub fn needs_newer_minor(op: &Op, minor: u32) -> bool {
    match op {
        Op::Matmul { act: Some(_), .. } => minor < 1,
        Op::MatmulGatedResidual { .. } => minor < 2,
        Op::AttentionBackward { .. } => minor < 3,
        _ => false,
    }
}

/// A plugin device as a [`Device`].
pub struct PluginDevice {
    /// Keeps the plugin initialised (and loaded) while this device lives.
    plugin: Arc<LoadedPlugin>,
    table: sd3_device,
    /// Whether the table has the ABI 1.1 timing markers (long enough, all three entries present).
    markers: bool,
    /// Set when `record_marker` answered UNSUPPORTED: the host stops asking.
    markers_declined: std::sync::atomic::AtomicBool,
    /// Serialises calls into this device, and ties `last_error` to the call that failed.
    lock: Mutex<()>,
    label: String,
}

// SAFETY: `self_` is the plugin's handle for this device; every call through it holds `lock`.
unsafe impl Send for PluginDevice {}
unsafe impl Sync for PluginDevice {}

/// Name of a status code, for messages.
pub fn status_name(code: i32) -> String {
    let name = match code {
        status::OK => "OK",
        status::ERROR => "ERROR",
        status::UNSUPPORTED => "UNSUPPORTED",
        status::OUT_OF_MEMORY => "OUT_OF_MEMORY",
        status::INVALID_ARGUMENT => "INVALID_ARGUMENT",
        status::DEVICE_LOST => "DEVICE_LOST",
        status::PANIC => "PANIC",
        _ => return format!("{code}"),
    };
    name.to_string()
}

/// The ABI form of an operand. Fails only for a rank above [`crate::MAX_RANK`].
pub fn tensor_to_abi(t: &TensorDesc) -> Result<sd3_tensor_desc> {
    if t.rank() > crate::MAX_RANK {
        return Err(Error::InvalidArgument(format!("rank {} exceeds {}", t.rank(), crate::MAX_RANK)));
    }
    let mut d = sd3_tensor_desc {
        buffer: t.buffer.0,
        dtype: t.dtype as u32,
        rank: t.rank() as u32,
        offset: t.layout.offset as u64,
        ..Default::default()
    };
    for (i, (&n, &s)) in t.layout.shape.iter().zip(&t.layout.strides).enumerate() {
        d.shape[i] = n as u64;
        d.strides[i] = s as u64;
    }
    Ok(d)
}

/// An op call in ABI form; the descriptor points into the returned vectors, so keep them together.
struct AbiCall {
    desc: sd3_op_desc,
    _inputs: Vec<sd3_tensor_desc>,
    _outputs: Vec<sd3_tensor_desc>,
}

fn call_to_abi(call: &OpCall) -> Result<AbiCall> {
    let inputs = call.inputs.iter().map(tensor_to_abi).collect::<Result<Vec<_>>>()?;
    let outputs = call.outputs.iter().map(tensor_to_abi).collect::<Result<Vec<_>>>()?;
    let e = call.op.encode();
    let desc = sd3_op_desc {
        struct_size: std::mem::size_of::<sd3_op_desc>() as u32,
        kind: e.kind,
        sub: e.sub,
        n_inputs: inputs.len() as u32,
        n_outputs: outputs.len() as u32,
        reserved: 0,
        iparams: e.iparams,
        fparams: e.fparams,
        inputs: inputs.as_ptr(),
        outputs: outputs.as_ptr(),
    };
    Ok(AbiCall { desc, _inputs: inputs, _outputs: outputs })
}

impl PluginDevice {
    /// The device's last error; call with `lock` held.
    fn last_error_locked(&self) -> String {
        // SAFETY: last_error is required (checked at open).
        unsafe { c_str((self.table.last_error.unwrap())(self.table.self_)) }
    }

    /// Turn a status into a `Result`, reading the plugin's message for failures (with `lock` held).
    fn check(&self, rc: i32, what: &str, requested: u64) -> Result<()> {
        if rc == status::OK {
            return Ok(());
        }
        let msg = self.last_error_locked();
        let backend = self.label.clone();
        Err(match rc {
            status::UNSUPPORTED => Error::Unsupported { backend, op: what.to_string(), detail: msg },
            status::OUT_OF_MEMORY => {
                let available = self.info_locked().free_memory_bytes;
                Error::OutOfMemory { backend, requested, available, detail: msg }
            }
            status::INVALID_ARGUMENT => Error::InvalidArgument(format!("{backend}: {what}: {msg}")),
            status::DEVICE_LOST => Error::DeviceLost { backend, msg: format!("{what}: {msg}") },
            status::PANIC => Error::Backend { backend, msg: format!("{what}: the plugin panicked: {msg}") },
            code => Error::Backend { backend, msg: format!("{what} failed (status {}): {msg}", status_name(code)) },
        })
    }

    fn info_locked(&self) -> DeviceInfo {
        // SAFETY: get_info is required; the returned struct is valid until the next call on this device.
        let p = unsafe { (self.table.get_info.unwrap())(self.table.self_) };
        if p.is_null() {
            let msg = self.last_error_locked();
            return DeviceInfo {
                name: format!("{} (get_info failed: {msg})", self.label),
                kind: DeviceKind::Other,
                memory_bytes: 0,
                free_memory_bytes: 0,
                pci_id: None,
                dtypes: Vec::new(),
                capabilities: Vec::new(),
            };
        }
        // SAFETY: the plugin's info struct is `struct_size` bytes long; its strings are valid until the next call.
        let info: sd3_device_info = unsafe { read_prefix(p, (*p).struct_size) };
        let name = unsafe { c_str(info.name) };
        let pci = unsafe { c_str(info.pci_id) };
        let caps = unsafe { c_str(info.capabilities) };
        DeviceInfo {
            name: if name.is_empty() { self.label.clone() } else { name },
            kind: DeviceKind::from_id(info.kind),
            memory_bytes: info.memory_bytes,
            free_memory_bytes: info.free_memory_bytes,
            pci_id: (!pci.is_empty()).then_some(pci),
            dtypes: DType::ALL.into_iter().filter(|d| info.dtype_mask & d.mask_bit() != 0).collect(),
            capabilities: caps.split(';').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
        }
    }

    /// The backend name and device index, `name:index`.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl Device for PluginDevice {
    fn info(&self) -> DeviceInfo {
        let _g = self.lock.lock().unwrap();
        self.info_locked()
    }

    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        let _g = self.lock.lock().unwrap();
        let mut id = 0u64;
        // SAFETY: required entry; `id` is a valid out-pointer.
        let rc = unsafe { (self.table.alloc.unwrap())(self.table.self_, bytes as u64, &mut id) };
        self.check(rc, "alloc", bytes as u64)?;
        if id == 0 {
            return Err(Error::backend(&self.label, "alloc returned buffer handle 0 (0 is never a valid handle)"));
        }
        Ok(BufferId(id))
    }

    fn free(&self, buffer: BufferId) {
        let _g = self.lock.lock().unwrap();
        // SAFETY: required entry.
        unsafe { (self.table.free.unwrap())(self.table.self_, buffer.0) }
    }

    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        let _g = self.lock.lock().unwrap();
        // SAFETY: `data` is valid for `data.len()` bytes for the duration of the call (the plugin must copy or
        // finish with it before returning).
        let rc = unsafe {
            (self.table.upload.unwrap())(
                self.table.self_,
                buffer.0,
                offset as u64,
                data.as_ptr() as *const c_void,
                data.len() as u64,
            )
        };
        self.check(rc, "upload", 0)
    }

    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        let _g = self.lock.lock().unwrap();
        // SAFETY: `out` is valid for writes of `out.len()` bytes.
        let rc = unsafe {
            (self.table.download.unwrap())(
                self.table.self_,
                buffer.0,
                offset as u64,
                out.as_mut_ptr() as *mut c_void,
                out.len() as u64,
            )
        };
        self.check(rc, "download", 0)
    }

    fn copy_buffer(
        &self,
        src: BufferId,
        src_offset: usize,
        dst: BufferId,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        if self.table.copy.is_none() {
            // Optional entry: go through the host.
            let mut tmp = vec![0u8; bytes];
            self.download(src, src_offset, &mut tmp)?;
            return self.upload(dst, dst_offset, &tmp);
        }
        let _g = self.lock.lock().unwrap();
        // SAFETY: present (checked above) and within the plugin's table.
        let rc = unsafe {
            (self.table.copy.unwrap())(
                self.table.self_,
                src.0,
                src_offset as u64,
                dst.0,
                dst_offset as u64,
                bytes as u64,
            )
        };
        self.check(rc, "copy", 0)
    }

    fn supports(&self, call: &OpCall) -> bool {
        if needs_newer_minor(&call.op, self.plugin.table.abi_minor) {
            return false;
        }
        let Ok(c) = call_to_abi(call) else { return false };
        let _g = self.lock.lock().unwrap();
        // SAFETY: required entry; the descriptor and its operand arrays live across the call.
        unsafe { (self.table.supports.unwrap())(self.table.self_, &c.desc) != 0 }
    }

    fn execute(&self, call: &OpCall) -> Result<()> {
        if needs_newer_minor(&call.op, self.plugin.table.abi_minor) {
            return Err(Error::Unsupported {
                backend: self.label.clone(),
                op: call.op.name(),
                detail: format!("the plugin's ABI 1.{} predates this op's parameters", self.plugin.table.abi_minor),
            });
        }
        let c = call_to_abi(call)?;
        let _g = self.lock.lock().unwrap();
        // SAFETY: as for supports.
        let rc = unsafe { (self.table.execute.unwrap())(self.table.self_, &c.desc) };
        self.check(rc, &call.op.name(), 0)
    }

    fn synchronize(&self) -> Result<()> {
        let _g = self.lock.lock().unwrap();
        // SAFETY: required entry.
        let rc = unsafe { (self.table.synchronize.unwrap())(self.table.self_) };
        self.check(rc, "synchronize", 0)
    }

    fn stats(&self) -> Vec<String> {
        let Some(stats) = self.table.stats else { return Vec::new() };
        let _g = self.lock.lock().unwrap();
        // SAFETY: present and within the table; the string is valid until the next call on this device.
        let s = unsafe { c_str(stats(self.table.self_)) };
        s.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect()
    }

    fn record_marker(&self) -> Result<Option<MarkerId>> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(record) = self.table.record_marker.filter(|_| self.markers && !self.markers_declined.load(Relaxed))
        else {
            return Ok(None);
        };
        let _g = self.lock.lock().unwrap();
        let mut marker = 0u64;
        // SAFETY: present and within the plugin's table (checked at open); `marker` is a valid out-pointer.
        let rc = unsafe { record(self.table.self_, &mut marker) };
        if rc == status::UNSUPPORTED {
            self.markers_declined.store(true, Relaxed);
            return Ok(None);
        }
        self.check(rc, "record_marker", 0)?;
        Ok(Some(MarkerId(marker)))
    }

    fn marker_elapsed(&self, start: MarkerId, end: MarkerId) -> Result<f64> {
        let Some(elapsed) = self.table.marker_elapsed.filter(|_| self.markers) else {
            return Err(Error::Unsupported {
                backend: self.label.clone(),
                op: "marker_elapsed".into(),
                detail: "the plugin has no timing markers".into(),
            });
        };
        let _g = self.lock.lock().unwrap();
        let mut seconds = 0f64;
        // SAFETY: present and within the table; `seconds` is a valid out-pointer.
        let rc = unsafe { elapsed(self.table.self_, start.0, end.0, &mut seconds) };
        self.check(rc, "marker_elapsed", 0)?;
        Ok(seconds)
    }

    fn release_marker(&self, marker: MarkerId) {
        let Some(release) = self.table.release_marker.filter(|_| self.markers) else { return };
        let _g = self.lock.lock().unwrap();
        // SAFETY: present and within the table; the marker came from this device's record_marker.
        unsafe { release(self.table.self_, marker.0) }
    }
}

impl Drop for PluginDevice {
    fn drop(&mut self) {
        let _g = self.lock.lock().unwrap();
        // SAFETY: required entry; nothing uses this device after destroy. The plugin stays loaded (self.plugin).
        unsafe { (self.table.destroy.unwrap())(self.table.self_) };
        let _ = &self.plugin;
    }
}

#[cfg(test)]
mod tests {
    use super::needs_newer_minor;
    use crate::{Op, UnaryOp};

    #[test]
    fn an_abi_1_0_plugin_is_never_sent_a_matmul_activation() {
        let fused = Op::Matmul { bias: true, act: Some(UnaryOp::GeluTanh) };
        assert!(needs_newer_minor(&fused, 0));
        assert!(!needs_newer_minor(&fused, 1));
        assert!(!needs_newer_minor(&Op::matmul(true), 0));
        assert!(!needs_newer_minor(&Op::Softmax, 0));
    }
}
