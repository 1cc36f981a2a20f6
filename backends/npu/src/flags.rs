//! The four Paddle flags the NPU stub honours, read from the environment at plugin initialisation.
//!
//! Parsing follows Paddle (`../shared/reference/paddle.md` §2.3):
//! - booleans go through `EnvToBool` (PaddleCustomDevice `backends/npu/runtime/flags.h`): true iff the value's
//!   first character is one of `t T y Y 1`, or the value is empty (`memchr` also matches the terminating NUL);
//!   anything else is false. An unset variable takes the default.
//! - `FLAGS_allocator_strategy` is a string flag with a closed set of values; anything else is rejected.
//!
//! Defaults are Paddle's: storage format off, stride kernels on, aclnn scale off, `auto_growth`.

use sd3_core::{Error, Result};

pub const STORAGE_FORMAT: &str = "FLAGS_npu_storage_format";
pub const USE_STRIDE_KERNEL: &str = "FLAGS_use_stride_kernel";
pub const SCALE_ACLNN: &str = "FLAGS_npu_scale_aclnn";
pub const ALLOCATOR_STRATEGY: &str = "FLAGS_allocator_strategy";

/// Every flag name, in the order they are reported.
pub const ALL: [&str; 4] = [STORAGE_FORMAT, USE_STRIDE_KERNEL, SCALE_ACLNN, ALLOCATOR_STRATEGY];

/// How device memory is handed out (Paddle `FLAGS_allocator_strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocatorStrategy {
    /// Grow on demand in chunks; best fit inside them; idle chunks released only when an allocation fails.
    AutoGrowth,
    /// Reserve most of the arena up front and best-fit inside it; chunks are never released.
    NaiveBestFit,
}

impl AllocatorStrategy {
    pub const ALL: [AllocatorStrategy; 2] = [AllocatorStrategy::AutoGrowth, AllocatorStrategy::NaiveBestFit];

    pub fn name(self) -> &'static str {
        match self {
            AllocatorStrategy::AutoGrowth => "auto_growth",
            AllocatorStrategy::NaiveBestFit => "naive_best_fit",
        }
    }

    pub fn parse(value: &str) -> Result<AllocatorStrategy> {
        AllocatorStrategy::ALL.into_iter().find(|s| s.name() == value).ok_or_else(|| {
            let valid: Vec<&str> = AllocatorStrategy::ALL.iter().map(|s| s.name()).collect();
            Error::InvalidArgument(format!(
                "{ALLOCATOR_STRATEGY}=`{value}` is not a valid allocator strategy (valid: {})",
                valid.join(", ")
            ))
        })
    }
}

/// Paddle's `EnvToBool` on a present value: true iff the first char is `t`, `T`, `y`, `Y` or `1`, or the value is
/// empty.
pub fn env_to_bool(value: &str) -> bool {
    match value.bytes().next() {
        None => true,
        Some(c) => b"tTyY1".contains(&c),
    }
}

/// The flag values in effect on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NpuFlags {
    /// `FLAGS_npu_storage_format`: matmul weights in FRACTAL_NZ, conv activations in NC1HWC0.
    pub storage_format: bool,
    /// `FLAGS_use_stride_kernel`: kernels read views through their strides; off: views are made contiguous first.
    pub use_stride_kernel: bool,
    /// `FLAGS_npu_scale_aclnn`: the scale op runs as multiply-then-add (aclnn) instead of the fused legacy op.
    pub scale_aclnn: bool,
    /// `FLAGS_allocator_strategy`.
    pub allocator_strategy: AllocatorStrategy,
}

impl Default for NpuFlags {
    /// Paddle's defaults.
    fn default() -> Self {
        NpuFlags {
            storage_format: false,
            use_stride_kernel: true,
            scale_aclnn: false,
            allocator_strategy: AllocatorStrategy::AutoGrowth,
        }
    }
}

impl NpuFlags {
    /// Read the flags from the process environment.
    pub fn from_env() -> Result<NpuFlags> {
        NpuFlags::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Read the flags through `lookup` (name → value, `None` when unset): the environment, or a map in tests.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<NpuFlags> {
        let d = NpuFlags::default();
        let boolean = |name: &str, default: bool| lookup(name).map_or(default, |v| env_to_bool(&v));
        Ok(NpuFlags {
            storage_format: boolean(STORAGE_FORMAT, d.storage_format),
            use_stride_kernel: boolean(USE_STRIDE_KERNEL, d.use_stride_kernel),
            scale_aclnn: boolean(SCALE_ACLNN, d.scale_aclnn),
            allocator_strategy: match lookup(ALLOCATOR_STRATEGY) {
                None => d.allocator_strategy,
                Some(v) => AllocatorStrategy::parse(&v)?,
            },
        })
    }

    /// The values as `FLAGS_name=value` lines (booleans as 0/1), as shown by `sd3 devices` and `--benchmark`.
    pub fn to_lines(&self) -> Vec<String> {
        let b = |v: bool| if v { 1 } else { 0 };
        vec![
            format!("{STORAGE_FORMAT}={}", b(self.storage_format)),
            format!("{USE_STRIDE_KERNEL}={}", b(self.use_stride_kernel)),
            format!("{SCALE_ACLNN}={}", b(self.scale_aclnn)),
            format!("{ALLOCATOR_STRATEGY}={}", self.allocator_strategy.name()),
        ]
    }

    /// The values the PaddleMIX SD3 NPU guide runs with: storage format 0, stride kernels 0, aclnn scale True,
    /// auto_growth.
    pub fn seed() -> NpuFlags {
        NpuFlags {
            storage_format: false,
            use_stride_kernel: false,
            scale_aclnn: true,
            allocator_strategy: AllocatorStrategy::AutoGrowth,
        }
    }

    /// Every flag flipped relative to [`NpuFlags::seed`].
    pub fn seed_opposite() -> NpuFlags {
        NpuFlags {
            storage_format: true,
            use_stride_kernel: true,
            scale_aclnn: false,
            allocator_strategy: AllocatorStrategy::NaiveBestFit,
        }
    }
}
