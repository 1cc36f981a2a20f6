//! The Rust export shim (`export_backend!`) called through its C table, in-process: errors become status codes
//! plus messages, and panics become `SD3_STATUS_PANIC` plus the panic message instead of unwinding.

use sd3_core::error::status;
use sd3_core::plugin::abi::{self, sd3_device, sd3_op_desc};
use sd3_core::plugin::host::tensor_to_abi;
use sd3_core::reference::ReferenceDevice;
use sd3_core::{
    BackendProvider, BufferId, DType, Device, DeviceInfo, Error, Layout, MarkerId, Op, OpCall, Result, TensorDesc,
};
use std::ffi::{CStr, CString};
use std::sync::{Arc, Mutex};

struct Provider;
impl Provider {
    fn new(options: &str) -> Result<Provider> {
        if options.contains("fail=1") {
            return Err(Error::backend("shimtest", "refusing to start: fail=1"));
        }
        if options.contains("panic=1") {
            panic!("init exploded");
        }
        Ok(Provider)
    }
}
impl BackendProvider for Provider {
    fn name(&self) -> &str {
        "shimtest"
    }
    fn device_count(&self) -> usize {
        1
    }
    fn open_device(&self, _index: usize) -> Result<Arc<dyn Device>> {
        Ok(Arc::new(Panicky(ReferenceDevice::new(), Mutex::default())))
    }
}

/// The reference device, except that unary ops panic, allocations over 1 MiB fail, and timing markers read a
/// fake clock of 0.5 s per executed op (marker 13 panics, to show the shim catches it).
struct Panicky(ReferenceDevice, Mutex<Clock>);
#[derive(Default)]
struct Clock {
    now: f64,
    markers: Vec<Option<f64>>,
}
impl Device for Panicky {
    fn info(&self) -> DeviceInfo {
        self.0.info()
    }
    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        if bytes > 1 << 20 {
            return Err(Error::OutOfMemory {
                backend: "shimtest".into(),
                requested: bytes as u64,
                available: 1 << 20,
                detail: String::new(),
            });
        }
        self.0.alloc(bytes)
    }
    fn free(&self, b: BufferId) {
        self.0.free(b)
    }
    fn upload(&self, b: BufferId, o: usize, d: &[u8]) -> Result<()> {
        self.0.upload(b, o, d)
    }
    fn download(&self, b: BufferId, o: usize, d: &mut [u8]) -> Result<()> {
        self.0.download(b, o, d)
    }
    fn copy_buffer(&self, s: BufferId, so: usize, d: BufferId, d_o: usize, n: usize) -> Result<()> {
        self.0.copy_buffer(s, so, d, d_o, n)
    }
    fn supports(&self, call: &OpCall) -> bool {
        self.0.supports(call)
    }
    fn execute(&self, call: &OpCall) -> Result<()> {
        self.1.lock().unwrap().now += 0.5;
        if let Op::Unary(u) = call.op {
            panic!("kernel for {} exploded", u.name());
        }
        self.0.execute(call)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn record_marker(&self) -> Result<Option<MarkerId>> {
        let mut c = self.1.lock().unwrap();
        let now = c.now;
        c.markers.push(Some(now));
        Ok(Some(MarkerId(c.markers.len() as u64 - 1)))
    }
    fn marker_elapsed(&self, start: MarkerId, end: MarkerId) -> Result<f64> {
        if end.0 == 13 {
            panic!("marker 13");
        }
        let c = self.1.lock().unwrap();
        let at = |m: MarkerId| c.markers[m.0 as usize].ok_or_else(|| Error::msg(format!("marker {} released", m.0)));
        Ok(at(end)? - at(start)?)
    }
    fn release_marker(&self, m: MarkerId) {
        self.1.lock().unwrap().markers[m.0 as usize] = None;
    }
}

sd3_core::export_backend!("shimtest", |options: &str| Provider::new(options));

fn text(p: *const std::ffi::c_char) -> String {
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[test]
fn the_shim_reports_errors_and_catches_panics() {
    let table = unsafe { &*sd3_backend_entry(abi::ABI_MAJOR, abi::ABI_MINOR) };
    assert_eq!((table.abi_major, table.abi_minor), (abi::ABI_MAJOR, abi::ABI_MINOR));
    assert_eq!(table.struct_size as usize, std::mem::size_of::<abi::sd3_plugin>());
    assert_eq!(text(table.name), "shimtest");
    let last_error = || text(unsafe { table.last_error.unwrap()() });

    // init: an error with its message, then a panic caught, then success.
    let init = |o: &str| unsafe { table.init.unwrap()(CString::new(o).unwrap().as_ptr()) };
    assert_eq!(init("fail=1"), status::ERROR);
    assert!(last_error().contains("refusing to start: fail=1"), "{}", last_error());
    assert_eq!(init("panic=1"), status::PANIC);
    assert!(last_error().contains("panic: init exploded"), "{}", last_error());
    assert_eq!(init(""), status::OK);
    assert_eq!(unsafe { table.device_count.unwrap()() }, 1);

    let mut dev: *const sd3_device = std::ptr::null();
    assert_eq!(unsafe { table.open_device.unwrap()(0, &mut dev) }, status::OK);
    let d = unsafe { &*dev };
    let err = || text(unsafe { d.last_error.unwrap()(d.self_) });

    // Out of memory comes back as its status.
    let mut buf = 0u64;
    assert_eq!(unsafe { d.alloc.unwrap()(d.self_, 2 << 20, &mut buf) }, status::OUT_OF_MEMORY);
    assert!(err().contains("out of device memory"), "{}", err());

    // A real op through the descriptor: fill then exp-by-panic.
    assert_eq!(unsafe { d.alloc.unwrap()(d.self_, 16, &mut buf) }, status::OK);
    let t = tensor_to_abi(&TensorDesc { buffer: BufferId(buf), dtype: DType::F32, layout: Layout::contiguous(&[4]) })
        .unwrap();
    let op = |op: Op, ins: &[abi::sd3_tensor_desc]| {
        let e = op.encode();
        sd3_op_desc {
            struct_size: std::mem::size_of::<sd3_op_desc>() as u32,
            kind: e.kind,
            sub: e.sub,
            n_inputs: ins.len() as u32,
            n_outputs: 1,
            reserved: 0,
            iparams: e.iparams,
            fparams: e.fparams,
            inputs: ins.as_ptr(),
            outputs: &t,
        }
    };
    let fill = op(Op::Fill { value: 2.5 }, &[]);
    assert_eq!(unsafe { d.supports.unwrap()(d.self_, &fill) }, 1);
    assert_eq!(unsafe { d.execute.unwrap()(d.self_, &fill) }, status::OK);
    let mut out = [0u8; 16];
    assert_eq!(unsafe { d.download.unwrap()(d.self_, buf, 0, out.as_mut_ptr().cast(), 16) }, status::OK);
    assert_eq!(DType::F32.bytes_to_f32(&out), vec![2.5; 4]);

    let exp = op(Op::Unary(sd3_core::UnaryOp::Exp), &[t]);
    assert_eq!(unsafe { d.execute.unwrap()(d.self_, &exp) }, status::PANIC);
    assert!(err().contains("panic: kernel for exp exploded"), "{}", err());

    // An op kind from a newer host is declined, not misread.
    let mut future = fill;
    future.kind = sd3_core::op::kind::COUNT + 5;
    assert_eq!(unsafe { d.supports.unwrap()(d.self_, &future) }, 0);
    assert_eq!(unsafe { d.execute.unwrap()(d.self_, &future) }, status::UNSUPPORTED);

    let info = unsafe { &*d.get_info.unwrap()(d.self_) };
    assert_eq!(info.dtype_mask & DType::F32.mask_bit(), DType::F32.mask_bit());
    // ABI 1.1 timing markers through the table: two executes between the markers are 1 s on the fake clock.
    assert_eq!(d.struct_size as usize, abi::DEVICE_MARKERS_SIZE);
    let (record, elapsed, release) = (d.record_marker.unwrap(), d.marker_elapsed.unwrap(), d.release_marker.unwrap());
    let (mut m0, mut m1, mut secs) = (0u64, 0u64, 0f64);
    assert_eq!(unsafe { record(d.self_, &mut m0) }, status::OK);
    assert_eq!(unsafe { d.execute.unwrap()(d.self_, &fill) }, status::OK);
    assert_eq!(unsafe { d.execute.unwrap()(d.self_, &fill) }, status::OK);
    assert_eq!(unsafe { record(d.self_, &mut m1) }, status::OK);
    assert_eq!(unsafe { elapsed(d.self_, m0, m1, &mut secs) }, status::OK);
    assert_eq!(secs, 1.0);
    unsafe { release(d.self_, m1) };
    assert_eq!(unsafe { elapsed(d.self_, m0, m1, &mut secs) }, status::ERROR);
    assert!(err().contains(&format!("marker {m1} released")), "{}", err());
    assert_eq!(unsafe { elapsed(d.self_, m0, 13, &mut secs) }, status::PANIC);
    assert!(err().contains("panic: marker 13"), "{}", err());
    assert_eq!(unsafe { record(d.self_, std::ptr::null_mut()) }, status::INVALID_ARGUMENT);
    unsafe { release(d.self_, m0) };

    unsafe { d.free.unwrap()(d.self_, buf) };
    unsafe { d.destroy.unwrap()(d.self_) };
    unsafe { table.shutdown.unwrap()() };
}
