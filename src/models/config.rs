//! Reading a component's `config.json` (transformers / diffusers layout) into a serde struct.
//!
//! Fields the published configs always carry are required (a missing one is an error naming the file and the
//! field); fields that transformers / diffusers may omit because they equal the class default take that default.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// serde's message names the missing or mistyped field (e.g. "missing field `hidden_size`").
    #[error("{}: {source}", path.display())]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },
}

/// Parse `dir/config.json`.
pub fn read_config<T: DeserializeOwned>(dir: &Path) -> Result<T, ConfigError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path, source })
}

/// A semantic problem in `dir/config.json` (e.g. an unsupported activation).
pub fn invalid(dir: &Path, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { path: dir.join("config.json"), msg: msg.into() }
}
