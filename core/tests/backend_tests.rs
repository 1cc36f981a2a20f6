//! The op test cases every backend runs (`sd3_core::testing::cases`, through `sd3_core::backend_tests!`) fail on
//! faulty devices: the reference device with one fault injected. The cases themselves run on real backends in
//! `backends/*/tests/`.

use sd3_core::reference::ReferenceDevice;
use sd3_core::testing::cases;
use sd3_core::{BufferId, Device, DeviceInfo, Op, OpCall, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};

#[derive(Clone, Copy)]
enum Fault {
    /// Gather does nothing and reports nothing, whatever the ids.
    SilentGather,
    /// The first element of every output view is off by 0.01 after the op.
    FirstElementOff,
}

struct Faulty {
    inner: ReferenceDevice,
    fault: Fault,
}

impl Device for Faulty {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        self.inner.alloc(bytes)
    }
    fn free(&self, buffer: BufferId) {
        self.inner.free(buffer)
    }
    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        self.inner.upload(buffer, offset, data)
    }
    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        self.inner.download(buffer, offset, out)
    }
    fn copy_buffer(&self, src: BufferId, so: usize, dst: BufferId, d_o: usize, n: usize) -> Result<()> {
        self.inner.copy_buffer(src, so, dst, d_o, n)
    }
    fn supports(&self, call: &OpCall) -> bool {
        self.inner.supports(call)
    }
    fn execute(&self, call: &OpCall) -> Result<()> {
        match self.fault {
            Fault::SilentGather if matches!(call.op, Op::Gather) => Ok(()),
            Fault::SilentGather => self.inner.execute(call),
            Fault::FirstElementOff => {
                self.inner.execute(call)?;
                let out = &call.outputs[0];
                let size = out.dtype.size_in_bytes();
                let mut bytes = vec![0u8; size];
                self.inner.download(out.buffer, out.layout.offset * size, &mut bytes)?;
                let v = out.dtype.bytes_to_f32(&bytes)[0] + 0.01;
                self.inner.upload(out.buffer, out.layout.offset * size, &out.dtype.f32_to_bytes(&[v]))
            }
        }
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

fn fails(case: fn(&dyn Device), fault: Fault) -> bool {
    let dev = Faulty { inner: ReferenceDevice::new(), fault };
    catch_unwind(AssertUnwindSafe(|| case(&dev))).is_err()
}

/// Every case on the reference device itself: the cases are well-formed (bad ids are the reference's own error too)
/// and the macro expands outside a backend.
mod on_the_reference {
    sd3_core::backend_tests!(Some(std::sync::Arc::new(sd3_core::reference::ReferenceDevice::new())));
}

#[test]
fn a_gather_that_ignores_bad_ids_fails() {
    // Before `run_on`, the reference's own error on the bad ids was enough to pass this case.
    assert!(fails(cases::gather_bad_ids, Fault::SilentGather));
    assert!(fails(cases::gather_rows, Fault::SilentGather));
}

#[test]
fn a_wrong_element_fails() {
    for case in [cases::fill, cases::binary_broadcast_and_maps, cases::softmax_and_norms, cases::conv2d_and_upsample] {
        assert!(fails(case, Fault::FirstElementOff));
    }
}
