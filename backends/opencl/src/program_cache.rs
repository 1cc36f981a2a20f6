//! OpenCL programs, built per device at first use and cached in memory and on disk.
//!
//! Disk entries live under `$SD3_OPENCL_CACHE_DIR`, else `$XDG_CACHE_HOME/sd3/opencl`, else
//! `$HOME/.cache/sd3/opencl` (an empty `SD3_OPENCL_CACHE_DIR` turns the disk cache off). An entry is named by
//! the device and a hash of (platform, device, driver version, source, build options), and framed with a magic,
//! the payload length and a checksum, so a truncated or corrupt entry is detected and rebuilt from source.

use crate::platform::ClDevice;
use ocl::core::{
    self, Context, DeviceId, Program, ProgramBuildInfo, ProgramBuildInfoResult, ProgramInfo, ProgramInfoResult,
};
use sd3_core::{Error, Result};
use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"SD3CLBIN";

pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for &b in *part {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x100000001b3);
    }
    h
}

/// The directory of the disk cache, or `None` when it is turned off or no home is known.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SD3_OPENCL_CACHE_DIR") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("sd3/opencl"));
    }
    std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".cache/sd3/opencl"))
}

#[derive(Default)]
pub struct CacheStats {
    pub built: AtomicU64,
    pub loaded: AtomicU64,
    pub rebuilt_corrupt: AtomicU64,
}

pub struct ProgramCache {
    programs: Mutex<HashMap<u64, Program>>,
    dir: Option<PathBuf>,
    pub stats: CacheStats,
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).take(48).collect()
}

impl ProgramCache {
    pub fn new(dir: Option<PathBuf>) -> ProgramCache {
        ProgramCache { programs: Mutex::default(), dir, stats: CacheStats::default() }
    }

    /// The program built from `source` with `options` for `dev`, building (or loading) it on first use.
    pub fn get(&self, ctx: &Context, dev: &ClDevice, name: &str, source: &str, options: &str) -> Result<Program> {
        let key = fnv1a(&[
            dev.platform_name.as_bytes(),
            dev.name.as_bytes(),
            dev.driver_version.as_bytes(),
            source.as_bytes(),
            options.as_bytes(),
        ]);
        let mut programs = self.programs.lock().unwrap();
        if let Some(p) = programs.get(&key) {
            return Ok(p.clone());
        }
        let device = unsafe { DeviceId::from_raw(dev.device) };
        let path = self.dir.as_ref().map(|d| d.join(format!("{}-{key:016x}.bin", sanitize(&dev.name))));
        let cached = path.as_deref().and_then(|p| self.load(ctx, device, p));
        let program = match cached {
            Some(p) => p,
            None => {
                let p = build_from_source(ctx, device, dev, name, source, options)?;
                self.stats.built.fetch_add(1, Ordering::Relaxed);
                if let Some(path) = &path {
                    store(&p, path);
                }
                p
            }
        };
        programs.insert(key, program.clone());
        Ok(program)
    }

    /// A program from a disk entry; `None` (and the entry is counted as rebuilt) if it is missing or unusable.
    fn load(&self, ctx: &Context, device: DeviceId, path: &Path) -> Option<Program> {
        let bytes = std::fs::read(path).ok()?;
        let program = unframe(&bytes).and_then(|bin| {
            let p = core::create_program_with_binary(ctx, &[device], &[bin]).ok()?;
            core::build_program(&p, Some(&[device]), &CString::default(), None, None).ok()?;
            Some(p)
        });
        match &program {
            Some(_) => self.stats.loaded.fetch_add(1, Ordering::Relaxed),
            None => self.stats.rebuilt_corrupt.fetch_add(1, Ordering::Relaxed),
        };
        program
    }
}

fn unframe(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < 24 || &bytes[..8] != MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
    let payload = bytes.get(24..)?;
    (payload.len() == len && len > 0 && fnv1a(&[payload]) == sum).then_some(payload)
}

/// Write the program's binary to `path` (through a temporary file and a rename). Failures only cost a
/// rebuild next time, so they are ignored.
fn store(program: &Program, path: &Path) {
    let Ok(ProgramInfoResult::Binaries(bins)) = core::get_program_info(program, ProgramInfo::Binaries) else {
        return;
    };
    let Some(bin) = bins.into_iter().next().filter(|b| !b.is_empty()) else { return };
    let mut framed = Vec::with_capacity(bin.len() + 24);
    framed.extend_from_slice(MAGIC);
    framed.extend_from_slice(&(bin.len() as u64).to_le_bytes());
    framed.extend_from_slice(&fnv1a(&[&bin]).to_le_bytes());
    framed.extend_from_slice(&bin);
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, &framed).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

fn build_from_source(
    ctx: &Context,
    device: DeviceId,
    dev: &ClDevice,
    name: &str,
    source: &str,
    options: &str,
) -> Result<Program> {
    let fail = |what: String| {
        Error::backend("opencl", format!("building kernels `{name}` for {}: {what}", dev.display_name()))
    };
    let src = CString::new(source).map_err(|_| fail("source contains a NUL byte".into()))?;
    let opts = CString::new(options).map_err(|_| fail("options contain a NUL byte".into()))?;
    let program = core::create_program_with_source(ctx, &[src]).map_err(|e| fail(e.to_string()))?;
    if let Err(e) = core::build_program(&program, Some(&[device]), &opts, None, None) {
        let log = match core::get_program_build_info(&program, device, ProgramBuildInfo::BuildLog) {
            Ok(ProgramBuildInfoResult::BuildLog(log)) if !log.trim().is_empty() => log,
            _ => e.to_string(),
        };
        return Err(fail(format!("build failed (options `{options}`); build log:\n{}", log.trim())));
    }
    Ok(program)
}
