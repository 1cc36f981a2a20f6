//! Plugin configuration: the flags (environment) plus the options string (`key=value;...`).
//!
//! Options: `arena_mb=N` or `npu.arena_mb=N` (device memory arena in MiB, a positive integer). The arena size is, in order of
//! precedence: the `arena_mb` option, the `SD3_NPU_ARENA_MB` environment variable, [`DEFAULT_ARENA_MB`].
//! The host passes one options string to every backend, so keys this plugin does not know are ignored; a known
//! key with a value of the wrong type is an error.

use crate::flags::NpuFlags;
use sd3_core::{Error, Result};

/// Environment variable giving the arena size in MiB.
pub const ARENA_ENV: &str = "SD3_NPU_ARENA_MB";
/// Arena size when neither the option nor the environment variable is given. The arena is zero-initialised
/// memory that the OS maps lazily, so an unused arena costs address space, not RAM.
pub const DEFAULT_ARENA_MB: u64 = 4096;

/// Everything a device is created from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpuConfig {
    pub flags: NpuFlags,
    /// Size of the device-memory arena in bytes.
    pub arena_bytes: u64,
}

impl NpuConfig {
    pub fn new(flags: NpuFlags, arena_bytes: u64) -> NpuConfig {
        NpuConfig { flags, arena_bytes }
    }

    /// Plugin initialisation: flags from the environment, arena size from `options` or the environment.
    pub fn from_env(options: &str) -> Result<NpuConfig> {
        NpuConfig::from_lookup(options, |name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// As [`NpuConfig::from_env`], with the environment read through `lookup`.
    pub fn from_lookup(options: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<NpuConfig> {
        let flags = NpuFlags::from_lookup(&lookup)?;
        let mut arena_mb = match lookup(ARENA_ENV) {
            Some(v) => parse_mb(&v).map_err(|found| {
                Error::InvalidArgument(format!("{ARENA_ENV}=`{found}`: expected a positive integer (MiB)"))
            })?,
            None => DEFAULT_ARENA_MB,
        };
        // The options string goes to every backend (docs/plugin-abi.md): keys of others are not ours.
        for (key, value) in parse_options(options)? {
            if key == "arena_mb" || key == "npu.arena_mb" {
                arena_mb = parse_mb(&value).map_err(|found| {
                    Error::InvalidArgument(format!(
                        "npu plugin option {key}=`{found}`: expected a positive integer (MiB)"
                    ))
                })?;
            }
        }
        Ok(NpuConfig { flags, arena_bytes: arena_mb << 20 })
    }
}

fn parse_mb(v: &str) -> std::result::Result<u64, String> {
    match v.trim().parse::<u64>() {
        // Up to 2^40 MiB (1 EiB), so that the byte count fits a usize and an isize.
        Ok(n) if n > 0 && n <= (1 << 40) => Ok(n),
        _ => Err(v.to_string()),
    }
}

/// Split `key=value;key=value` (`,` also separates; blanks ignored). A pair without `=` is an error.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>> {
    options
        .split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
            None => Err(Error::InvalidArgument(format!("npu plugin option `{pair}` is not of the form key=value"))),
        })
        .collect()
}
