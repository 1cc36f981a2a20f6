//! The plugin boundary: the versioned C ABI ([`abi`], mirror of `plugins/include/sd3_plugin.h`), the loader
//! ([`host`]), discovery ([`registry`]) and the plugin-side export macro ([`export`], `export_backend!`).
//! The contract in prose is `docs/plugin-abi.md`.

pub mod abi;
pub mod export;
pub mod host;
pub mod registry;

pub use host::{PluginDevice, PluginLibrary, PluginProvider};
pub use registry::{Discovery, Origin, RegisteredBackend, Registry, Rejected, PLUGIN_PATH_ENV};
