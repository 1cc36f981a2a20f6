//! `sd3-core`: the hardware abstraction of the sd3 engine.
//!
//! - [`DType`], [`Layout`], [`TensorDesc`]: what a tensor is, as a backend sees it.
//! - [`Op`] / [`OpCall`]: the op set, as data (semantics in `docs/ops.md`, reference in [`reference`]).
//! - [`Device`] / [`BackendProvider`]: what a backend implements; built-ins register with `inventory`.
//! - [`Backend`] / [`Tensor`]: what models are written in; calls a device declines are rewritten into calls it
//!   accepts ([`legalize`]) or, failing that, run on the host.
//! - [`plugin`]: the versioned C ABI, the loader (host side) and the export macro (plugin side).
//! - [`conformance`]: the suite every backend must pass; [`testing`]: op-by-op differential tests for backends.
//! - [`timing`]: [`DeviceTimer`], device time from the device's own timestamps (`--benchmark`).

pub mod backend;
pub mod conformance;
pub mod device;
pub mod dtype;
pub mod error;
pub mod layout;
pub mod legalize;
pub mod op;
pub mod plugin;
pub mod reference;
pub mod tensor;
pub mod testing;
pub mod timing;

pub use backend::Backend;
pub use device::{builtin_backends, BackendProvider, BuiltinBackend, Device, DeviceInfo, DeviceKind, MarkerId};
pub use dtype::DType;
pub use error::{Error, Result};
pub use layout::{BufferId, Layout, TensorDesc, MAX_RANK};
pub use legalize::LegalizeStats;
pub use op::{BinaryOp, EncodedOp, Op, OpCall, UnaryOp};
pub use tensor::{broadcast_shape, AttentionParams, PreparedCall, Tensor};
pub use timing::DeviceTimer;

/// Re-exported so backends register built-ins without depending on `inventory` themselves.
pub use inventory;
