//! Options shared by every subcommand that opens a backend.

use clap::Args;
use sd3::runtime::BackendRequest;
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Default)]
pub struct BackendArgs {
    /// Backend name: cpu, cuda, vulkan, opencl, npu, or a vendor plugin's name.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Device index within the backend.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Load this plugin library (repeatable).
    #[arg(long = "plugin", value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
    /// Search this directory for plugin libraries (repeatable).
    #[arg(long = "plugin-dir", value_name = "DIR")]
    pub plugin_dirs: Vec<PathBuf>,
    /// Fail instead of running unsupported ops on the host.
    #[arg(long)]
    pub strict: bool,
    /// Options passed to every backend's init, `key=value;key=value` (backends ignore keys they do not know).
    #[arg(long = "backend-options", value_name = "K=V;...", default_value = "")]
    pub backend_options: String,
}

impl BackendArgs {
    /// What `sd3::runtime::open_backend` needs.
    pub fn request(&self) -> BackendRequest {
        BackendRequest {
            backend: self.backend.clone(),
            device: self.device,
            plugins: self.plugins.clone(),
            plugin_dirs: self.plugin_dirs.clone(),
            strict: self.strict,
            options: self.backend_options.clone(),
            search_default_locations: true,
        }
    }
}
