//! Discovery: every backend this process can use, and every plugin library found but rejected, with why.
//!
//! Order (first wins for a name; a later provider with the same name is reported as shadowed):
//! 1. built-in backends ([`crate::builtin_backends`], sorted by name),
//! 2. explicit `--plugin PATH`s, in the order given,
//! 3. `--plugin-dir DIR`s, in the order given,
//! 4. the directories of the `SD3_PLUGIN_PATH` environment variable (separated like `PATH`),
//! 5. the directory of the running executable.
//!
//! In directories, a plugin is a file named `libsd3_backend_<name>.so` (Linux), `libsd3_backend_<name>.dylib`
//! (macOS) or `sd3_backend_<name>.dll` (Windows): what cargo names the cdylib of a crate `sd3-backend-<name>`.
//! The same file reached twice (two paths, or a hard link) is loaded once and not reported.

use super::host::{PluginLibrary, PluginProvider};
use crate::{BackendProvider, Error};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The environment variable holding extra plugin directories.
pub const PLUGIN_PATH_ENV: &str = "SD3_PLUGIN_PATH";

/// Where to look, and the options every backend is initialised with.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    /// Libraries to load, in order (`--plugin`).
    pub plugins: Vec<PathBuf>,
    /// Directories to scan, in order (`--plugin-dir`).
    pub plugin_dirs: Vec<PathBuf>,
    /// Also scan `SD3_PLUGIN_PATH` and the executable's directory (on by [`Discovery::new`]).
    pub search_default_locations: bool,
    /// `key=value;...` passed to every backend's init; backends ignore keys they do not know.
    pub options: String,
}

impl Discovery {
    /// Built-ins plus the default locations, no explicit paths.
    pub fn new() -> Discovery {
        Discovery { search_default_locations: true, ..Default::default() }
    }
}

/// Where a backend or a rejected candidate came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Compiled into this binary.
    Builtin,
    /// Loaded from this library.
    Library(PathBuf),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Builtin => f.write_str("built-in"),
            Origin::Library(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A usable backend.
#[derive(Clone)]
pub struct RegisteredBackend {
    pub name: String,
    pub version: String,
    pub origin: Origin,
    /// ABI version `(major, minor)` the plugin was built for; `None` for built-ins.
    pub abi_version: Option<(u32, u32)>,
    pub provider: Arc<dyn BackendProvider>,
}

/// A candidate that was found but cannot be used.
#[derive(Clone, Debug)]
pub struct Rejected {
    pub origin: Origin,
    /// The backend name, when it got far enough to say.
    pub name: Option<String>,
    pub reason: String,
}

/// The result of discovery.
#[derive(Default)]
pub struct Registry {
    pub backends: Vec<RegisteredBackend>,
    pub rejected: Vec<Rejected>,
}

impl Registry {
    /// Find every backend (see the module docs for the order).
    pub fn discover(d: &Discovery) -> Registry {
        let mut reg = Registry::default();
        let mut builtins: Vec<_> = crate::builtin_backends().collect();
        builtins.sort_by_key(|b| b.name);
        for b in builtins {
            match (b.create)(&d.options) {
                Ok(provider) => reg.add(provider.into(), Origin::Builtin, None),
                Err(e) => reg.rejected.push(Rejected {
                    origin: Origin::Builtin,
                    name: Some(b.name.into()),
                    reason: e.to_string(),
                }),
            }
        }
        let mut seen_files = HashSet::new();
        let mut seen_tables = HashSet::new();
        for path in candidate_libraries(d, &mut reg.rejected) {
            if let Some(id) = file_identity(&path) {
                if !seen_files.insert(id) {
                    continue;
                }
            }
            reg.load(&path, &d.options, &mut seen_tables);
        }
        reg
    }

    fn add(&mut self, provider: Arc<dyn BackendProvider>, origin: Origin, abi_version: Option<(u32, u32)>) {
        let name = provider.name().to_string();
        if let Some(first) = self.backends.iter().find(|b| b.name == name) {
            let reason = format!("shadowed: a backend named `{name}` was already found ({})", first.origin);
            self.rejected.push(Rejected { origin, name: Some(name), reason });
            return;
        }
        let version = provider.version();
        self.backends.push(RegisteredBackend { name, version, origin, abi_version, provider });
    }

    fn load(&mut self, path: &Path, options: &str, seen_tables: &mut HashSet<usize>) {
        let origin = Origin::Library(path.to_path_buf());
        let lib = match PluginLibrary::open(path) {
            Ok(lib) => lib,
            Err(e) => return self.rejected.push(Rejected { origin, name: None, reason: reason_of(e) }),
        };
        // The same library loaded through another path: dlopen handed back the same image.
        if !seen_tables.insert(lib.table_address()) {
            return;
        }
        let name = lib.name().to_string();
        if let Some(first) = self.backends.iter().find(|b| b.name == name) {
            let reason = format!("shadowed: a backend named `{name}` was already found ({})", first.origin);
            return self.rejected.push(Rejected { origin, name: Some(name), reason });
        }
        match lib.init(options) {
            Ok(p) => {
                let abi = p.abi_version();
                let provider: Arc<PluginProvider> = Arc::new(p);
                self.add(provider, origin, Some(abi));
            }
            Err(e) => self.rejected.push(Rejected { origin, name: Some(name), reason: reason_of(e) }),
        }
    }

    /// The backend called `name`.
    pub fn get(&self, name: &str) -> Option<&RegisteredBackend> {
        self.backends.iter().find(|b| b.name == name)
    }

    /// Names of the usable backends, in discovery order.
    pub fn names(&self) -> Vec<&str> {
        self.backends.iter().map(|b| b.name.as_str()).collect()
    }

    /// The backend loaded from this library file (for `--plugin PATH` workflows such as conformance).
    pub fn from_library(&self, path: &Path) -> Option<&RegisteredBackend> {
        let id = file_identity(path)?;
        self.backends.iter().find(|b| matches!(&b.origin, Origin::Library(p) if file_identity(p) == Some(id.clone())))
    }

    /// The rejection of this library file, if it was rejected.
    pub fn rejection_of(&self, path: &Path) -> Option<&Rejected> {
        let id = file_identity(path)?;
        self.rejected.iter().find(|r| matches!(&r.origin, Origin::Library(p) if file_identity(p) == Some(id.clone())))
    }
}

fn reason_of(e: Error) -> String {
    match e {
        Error::Plugin { reason, .. } => reason,
        e => e.to_string(),
    }
}

/// Whether a file name is a plugin library name on this platform: `libsd3_backend_<name>.so` and friends.
pub fn is_plugin_file_name(file_name: &str) -> bool {
    let (prefix, suffix) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    file_name
        .strip_prefix(prefix)
        .and_then(|s| s.strip_prefix("sd3_backend_"))
        .and_then(|s| s.strip_suffix(suffix))
        .is_some_and(|name| !name.is_empty())
}

/// The file name cargo gives the cdylib of the crate `sd3-backend-<name>` on this platform.
pub fn plugin_file_name(name: &str) -> String {
    format!("{}sd3_backend_{}{}", std::env::consts::DLL_PREFIX, name.replace('-', "_"), std::env::consts::DLL_SUFFIX)
}

/// Every candidate path in discovery order. Explicit paths and directories that do not exist are rejections;
/// default locations that do not exist are skipped silently.
fn candidate_libraries(d: &Discovery, rejected: &mut Vec<Rejected>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in &d.plugins {
        if p.is_file() {
            out.push(p.clone());
        } else {
            let reason = if p.exists() { "not a file" } else { "file not found" };
            rejected.push(Rejected {
                origin: Origin::Library(p.clone()),
                name: None,
                reason: format!("--plugin: {reason}"),
            });
        }
    }
    for dir in &d.plugin_dirs {
        match scan_dir(dir) {
            Ok(found) => out.extend(found),
            Err(e) => rejected.push(Rejected {
                origin: Origin::Library(dir.clone()),
                name: None,
                reason: format!("--plugin-dir: cannot read the directory: {e}"),
            }),
        }
    }
    if d.search_default_locations {
        if let Some(paths) = std::env::var_os(PLUGIN_PATH_ENV) {
            for dir in std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()) {
                out.extend(scan_dir(&dir).unwrap_or_default());
            }
        }
        if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
            out.extend(scan_dir(&dir).unwrap_or_default());
        }
    }
    out
}

/// Plugin libraries in one directory, sorted by file name.
fn scan_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(is_plugin_file_name))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    Ok(found)
}

/// What makes two paths the same file: device and inode on Unix, the canonical path elsewhere.
fn file_identity(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(format!("{}:{}", m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        std::fs::canonicalize(path).ok().map(|p| p.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_file_names_follow_cargo_cdylib_names() {
        let name = plugin_file_name("my-vendor");
        assert!(name.contains("sd3_backend_my_vendor"), "{name}");
        assert!(is_plugin_file_name(&name));
        assert!(!is_plugin_file_name(&plugin_file_name("")));
        assert!(!is_plugin_file_name("libsd3_core.so"));
        assert!(!is_plugin_file_name(&format!("{name}.bak")));
        #[cfg(target_os = "linux")]
        assert_eq!(plugin_file_name("cuda"), "libsd3_backend_cuda.so");
    }
}
