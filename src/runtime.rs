//! Opening the backend the user asked for: discover every backend ([`sd3_core::plugin::Registry`]), pick
//! `--backend NAME` and `--device N`, and wrap the device with the CPU as host fallback (unless `--strict`).
//!
//! The CLI fills a [`BackendRequest`] from its `BackendArgs` (`src/cli/common.rs`); tests and other callers
//! fill one directly.

use anyhow::{bail, Context};
use sd3_core::plugin::{Discovery, Origin, RegisteredBackend, Registry};
use sd3_core::Backend;
use std::path::PathBuf;

/// Which backend and device to open, and where to look for plugins. Mirrors the CLI's `BackendArgs`.
#[derive(Clone, Debug)]
pub struct BackendRequest {
    /// Backend name: `cpu`, `cuda`, `vulkan`, `opencl`, `npu`, or a vendor plugin's name.
    pub backend: String,
    /// Device index within the backend.
    pub device: usize,
    /// Plugin libraries to load (`--plugin`).
    pub plugins: Vec<PathBuf>,
    /// Directories to search for plugins (`--plugin-dir`).
    pub plugin_dirs: Vec<PathBuf>,
    /// Make host fallback an error.
    pub strict: bool,
    /// `key=value;...` options passed to every backend's init.
    pub options: String,
    /// Also search `SD3_PLUGIN_PATH` and the executable's folder (true for the CLI).
    pub search_default_locations: bool,
}

impl Default for BackendRequest {
    fn default() -> Self {
        BackendRequest {
            backend: "cpu".into(),
            device: 0,
            plugins: Vec::new(),
            plugin_dirs: Vec::new(),
            strict: false,
            options: String::new(),
            search_default_locations: true,
        }
    }
}

impl BackendRequest {
    /// The CPU backend, with the default plugin search.
    pub fn cpu() -> Self {
        Self::default()
    }

    /// Backend `name`, device 0, with the default plugin search.
    pub fn named(name: &str) -> Self {
        BackendRequest { backend: name.into(), ..Self::default() }
    }

    pub fn discovery(&self) -> Discovery {
        Discovery {
            plugins: self.plugins.clone(),
            plugin_dirs: self.plugin_dirs.clone(),
            search_default_locations: self.search_default_locations,
            options: self.options.clone(),
        }
    }
}

/// Discover every backend the request can see.
pub fn discover(req: &BackendRequest) -> Registry {
    Registry::discover(&req.discovery())
}

/// Discover, then open the requested backend and device.
pub fn open_backend(req: &BackendRequest) -> anyhow::Result<Backend> {
    open_backend_in(&discover(req), req)
}

/// Open the requested backend and device from an existing registry.
///
/// The backend is named `name` (device 0) or `name:N`. Ops the device declines run on the CPU backend and are
/// counted ([`Backend::fallback_counts`]); with `strict` they are errors. The CPU backend itself has no fallback.
pub fn open_backend_in(registry: &Registry, req: &BackendRequest) -> anyhow::Result<Backend> {
    let entry = find_backend(registry, &req.backend)?;
    let count = entry.provider.device_count();
    if req.device >= count {
        bail!(
            "backend `{}` has {count} device(s); --device {} is out of range (run `sd3 devices`)",
            entry.name,
            req.device
        );
    }
    let device = entry
        .provider
        .open_device(req.device)
        .with_context(|| format!("opening device {} of backend `{}` ({})", req.device, entry.name, entry.origin))?;
    let label = if req.device == 0 { entry.name.clone() } else { format!("{}:{}", entry.name, req.device) };
    if entry.name == "cpu" && entry.origin == Origin::Builtin {
        return Ok(Backend::new(label, device));
    }
    Ok(Backend::with_fallback(label, device, sd3_backend_cpu::cpu_device(), req.strict))
}

/// The registered backend called `name`, or an error listing what is available and what was rejected.
pub fn find_backend<'r>(registry: &'r Registry, name: &str) -> anyhow::Result<&'r RegisteredBackend> {
    if let Some(b) = registry.get(name) {
        return Ok(b);
    }
    let mut msg = format!("no backend named `{name}`. Available: {}.", registry.names().join(", "));
    let related: Vec<_> = registry.rejected.iter().filter(|r| r.name.as_deref() == Some(name)).collect();
    let others: Vec<_> = registry.rejected.iter().filter(|r| r.name.as_deref() != Some(name)).collect();
    for r in related {
        msg.push_str(&format!("\n  `{name}` from {} was rejected: {}", r.origin, r.reason));
    }
    for r in others {
        let who = r.name.as_deref().map(|n| format!("`{n}` from ")).unwrap_or_default();
        msg.push_str(&format!("\n  rejected: {who}{}: {}", r.origin, r.reason));
    }
    if registry.rejected.is_empty() {
        msg.push_str(&format!(
            "\n  No plugin library was found: pass --plugin PATH or --plugin-dir DIR, set {}, or put \
             {} beside the sd3 executable.",
            sd3_core::plugin::PLUGIN_PATH_ENV,
            sd3_core::plugin::registry::plugin_file_name(name)
        ));
    }
    bail!(msg)
}
