//! The error type shared by the core, the backends and (through status codes) the plugin ABI.

use crate::DType;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Status codes as they cross the plugin ABI (`SD3_STATUS_*`); [`Error::code`] maps each error to one.
pub mod status {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const UNSUPPORTED: i32 = 2;
    pub const OUT_OF_MEMORY: i32 = 3;
    pub const INVALID_ARGUMENT: i32 = 4;
    pub const DEVICE_LOST: i32 = 5;
    pub const PANIC: i32 = 6;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shape error in {op}: {msg}")]
    Shape { op: String, msg: String },
    #[error("dtype error in {op}: expected {expected}, found {found}")]
    DType { op: String, expected: String, found: DType },
    #[error("{backend}: op {op} is not supported{}", if .detail.is_empty() { String::new() } else { format!(" ({})", .detail) })]
    Unsupported { backend: String, op: String, detail: String },
    #[error("{backend}: out of device memory: requested {requested} bytes, {available} bytes available{}", if .detail.is_empty() { String::new() } else { format!(" ({})", .detail) })]
    OutOfMemory { backend: String, requested: u64, available: u64, detail: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{backend}: device lost: {msg}")]
    DeviceLost { backend: String, msg: String },
    #[error("{backend}: {msg}")]
    Backend { backend: String, msg: String },
    #[error("plugin {path}: {reason}")]
    Plugin { path: String, reason: String },
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn msg(s: impl Into<String>) -> Error {
        Error::Msg(s.into())
    }
    pub fn shape(op: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Shape { op: op.into(), msg: msg.into() }
    }
    pub fn backend(backend: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Backend { backend: backend.into(), msg: msg.into() }
    }

    /// The ABI status code of this error.
    pub fn code(&self) -> i32 {
        match self {
            Error::Unsupported { .. } => status::UNSUPPORTED,
            Error::OutOfMemory { .. } => status::OUT_OF_MEMORY,
            Error::InvalidArgument(_) | Error::Shape { .. } | Error::DType { .. } => status::INVALID_ARGUMENT,
            Error::DeviceLost { .. } => status::DEVICE_LOST,
            _ => status::ERROR,
        }
    }
}
