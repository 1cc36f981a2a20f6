//! A copy-me sd3 backend plugin in Rust.
//!
//! To start a backend: copy this folder to `backends/<name>/`, rename the crate `sd3-backend-<name>` (cargo
//! then names the library `libsd3_backend_<name>.so`, which discovery finds), change the name in
//! `export_backend!`, add the folder to the workspace members, and replace the host-memory "device" below with
//! the real one. Implement ops one by one: everything `supports` declines runs on the host CPU (counted, and an
//! error under `--strict`), so the pipeline works from the first op. Check with
//! `sd3 conformance --plugin target/debug/libsd3_backend_<name>.so`.
//!
//! Only sd3-core's public API is used: [`Device`], [`BackendProvider`], the op descriptors, and the
//! `export_backend!` macro that generates the C ABI (see `docs/plugin-abi.md`).

use sd3_core::reference::HostMemory;
use sd3_core::{BackendProvider, BinaryOp, BufferId, DType, Device, DeviceInfo, DeviceKind, Error, Op, OpCall, Result};
use std::sync::Arc;

/// The backend: one device. `options` is the `--backend-options` string (`key=value;...`).
pub struct TemplateProvider {
    /// Example option: `template.fail=1` makes init fail, to see how the host reports it.
    label: String,
}

impl TemplateProvider {
    pub fn new(options: &str) -> Result<TemplateProvider> {
        let opts = parse_options(options);
        if opts.iter().any(|(k, v)| *k == "template.fail" && *v == "1") {
            return Err(Error::backend("template", "init failed because template.fail=1 was given"));
        }
        let label = opts.iter().find(|(k, _)| *k == "template.label").map_or("template device", |(_, v)| v);
        Ok(TemplateProvider { label: label.to_string() })
    }
}

/// `key=value;key=value` → pairs (keys without `=` get an empty value).
pub fn parse_options(options: &str) -> Vec<(&str, &str)> {
    options
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .collect()
}

impl BackendProvider for TemplateProvider {
    fn name(&self) -> &str {
        "template"
    }
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }
    fn device_count(&self) -> usize {
        1
    }
    fn open_device(&self, index: usize) -> Result<Arc<dyn Device>> {
        if index != 0 {
            return Err(Error::InvalidArgument(format!("template has one device, not {}", index + 1)));
        }
        Ok(Arc::new(TemplateDevice { memory: HostMemory::default(), label: self.label.clone() }))
    }
}

/// The "device": host memory. A real backend keeps device buffers and a queue here.
pub struct TemplateDevice {
    memory: HostMemory,
    label: String,
}

impl Device for TemplateDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.label.clone(),
            kind: DeviceKind::Other,
            memory_bytes: 0,
            free_memory_bytes: 0,
            pci_id: None,
            dtypes: vec![DType::F32],
            capabilities: vec!["template=1".into()],
        }
    }
    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        Ok(self.memory.alloc(bytes))
    }
    fn free(&self, buffer: BufferId) {
        self.memory.free(buffer)
    }
    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        self.memory.upload(buffer, offset, data)
    }
    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        self.memory.download(buffer, offset, out)
    }
    fn copy_buffer(
        &self,
        src: BufferId,
        src_offset: usize,
        dst: BufferId,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        self.memory.copy(src, src_offset, dst, dst_offset, bytes)
    }

    /// Accept f32 fill and f32 binary add; decline the rest (it runs on the host).
    fn supports(&self, call: &OpCall) -> bool {
        let f32_only = call.inputs.iter().chain(call.outputs).all(|t| t.dtype == DType::F32);
        f32_only && matches!(call.op, Op::Fill { .. } | Op::Binary(BinaryOp::Add))
    }

    fn execute(&self, call: &OpCall) -> Result<()> {
        let out = &call.outputs[0];
        match call.op {
            Op::Fill { value } => self.memory.write_f64(out, &vec![value as f64; out.elem_count()]),
            Op::Binary(BinaryOp::Add) => {
                // Operands arrive broadcast to the output's shape (stride 0), so an elementwise zip is right.
                let a = self.memory.read_f64(&call.inputs[0])?;
                let b = self.memory.read_f64(&call.inputs[1])?;
                // Round each operand sum in f32, as an f32 kernel would.
                let y: Vec<f64> = a.iter().zip(&b).map(|(x, y)| (*x as f32 + *y as f32) as f64).collect();
                self.memory.write_f64(out, &y)
            }
            op => Err(Error::Unsupported { backend: "template".into(), op: op.name(), detail: "declined".into() }),
        }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn stats(&self) -> Vec<String> {
        vec![format!("bytes_in_use={}", self.memory.bytes_in_use())]
    }
}

sd3_core::export_backend!("template", |options: &str| TemplateProvider::new(options));
