//! Flag parsing as Paddle does it, the defaults, invalid values, and the plugin options.

use sd3_backend_npu::config::{NpuConfig, ARENA_ENV, DEFAULT_ARENA_MB};
use sd3_backend_npu::flags::{env_to_bool, ALLOCATOR_STRATEGY, SCALE_ACLNN, STORAGE_FORMAT, USE_STRIDE_KERNEL};
use sd3_backend_npu::{AllocatorStrategy, NpuFlags, NpuProvider};
use sd3_core::{BackendProvider, DeviceKind};
use std::collections::HashMap;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |name| map.get(name).cloned()
}

#[test]
fn booleans_follow_env_to_bool() {
    for v in ["True", "true", "TRUE", "t", "T", "1", "yes", "Y", "y", "1000", "tomato", ""] {
        assert!(env_to_bool(v), "`{v}` is true");
    }
    for v in ["0", "False", "false", "f", "no", "N", "off", "on", "2", " true", "-1", "enable"] {
        assert!(!env_to_bool(v), "`{v}` is false");
    }
}

#[test]
fn defaults_are_paddles() {
    let f = NpuFlags::from_lookup(env(&[])).unwrap();
    assert_eq!(f, NpuFlags::default());
    assert!(!f.storage_format);
    assert!(f.use_stride_kernel);
    assert!(!f.scale_aclnn);
    assert_eq!(f.allocator_strategy, AllocatorStrategy::AutoGrowth);
}

#[test]
fn the_seeds_values_parse() {
    let f = NpuFlags::from_lookup(env(&[
        (STORAGE_FORMAT, "0"),
        (USE_STRIDE_KERNEL, "0"),
        (SCALE_ACLNN, "True"),
        (ALLOCATOR_STRATEGY, "auto_growth"),
    ]))
    .unwrap();
    assert_eq!(f, NpuFlags::seed());
    let g = NpuFlags::from_lookup(env(&[
        (STORAGE_FORMAT, "yes"),
        (USE_STRIDE_KERNEL, "false"),
        (SCALE_ACLNN, "no"),
        (ALLOCATOR_STRATEGY, "naive_best_fit"),
    ]))
    .unwrap();
    assert_eq!(
        g,
        NpuFlags {
            storage_format: true,
            use_stride_kernel: false,
            scale_aclnn: false,
            allocator_strategy: AllocatorStrategy::NaiveBestFit
        }
    );
    // An empty value is true (EnvToBool's memchr matches the terminating NUL).
    assert!(NpuFlags::from_lookup(env(&[(STORAGE_FORMAT, "")])).unwrap().storage_format);
}

#[test]
fn invalid_allocator_strategy_lists_the_valid_ones() {
    for bad in ["foo", "AUTO_GROWTH", "thread_local", "", "auto_growth "] {
        let err = NpuFlags::from_lookup(env(&[(ALLOCATOR_STRATEGY, bad)])).unwrap_err().to_string();
        assert!(err.contains(ALLOCATOR_STRATEGY), "{err}");
        assert!(err.contains(&format!("`{bad}`")), "{err}");
        assert!(err.contains("auto_growth") && err.contains("naive_best_fit"), "{err}");
    }
}

#[test]
fn flags_are_listed_as_seen_in_sd3_devices() {
    assert_eq!(
        NpuFlags::seed().to_lines(),
        [
            "FLAGS_npu_storage_format=0",
            "FLAGS_use_stride_kernel=0",
            "FLAGS_npu_scale_aclnn=1",
            "FLAGS_allocator_strategy=auto_growth"
        ]
    );
}

#[test]
fn arena_size_from_option_env_or_default() {
    assert_eq!(NpuConfig::from_lookup("", env(&[])).unwrap().arena_bytes, DEFAULT_ARENA_MB << 20);
    assert_eq!(NpuConfig::from_lookup("", env(&[(ARENA_ENV, "12")])).unwrap().arena_bytes, 12 << 20);
    let c = NpuConfig::from_lookup("arena_mb=5", env(&[(ARENA_ENV, "12")])).unwrap();
    assert_eq!(c.arena_bytes, 5 << 20, "the option wins over the environment");
    assert_eq!(NpuConfig::from_lookup(" arena_mb = 7 ; ", env(&[])).unwrap().arena_bytes, 7 << 20);
    assert_eq!(NpuConfig::from_lookup("npu.arena_mb=9", env(&[])).unwrap().arena_bytes, 9 << 20);
}

#[test]
fn bad_options_are_clear_errors() {
    for (options, needle) in [
        ("arena_mb=abc", "arena_mb=`abc`: expected a positive integer"),
        ("arena_mb=1.5", "arena_mb=`1.5`: expected a positive integer"),
        ("arena_mb=0", "arena_mb=`0`: expected a positive integer"),
        ("arena_mb=-3", "arena_mb=`-3`"),
        ("arena_mb=1099511627777", "arena_mb=`1099511627777`"),
        ("npu.arena_mb=x", "npu.arena_mb=`x`: expected a positive integer"),
        ("arena_mb", "`arena_mb` is not of the form key=value"),
    ] {
        let err = NpuConfig::from_lookup(options, env(&[])).unwrap_err().to_string();
        assert!(err.contains(needle), "{options}: {err}");
    }
    // Keys for other backends are not ours: ignored.
    assert_eq!(NpuConfig::from_lookup("device_mem=4;arena_mb=3", env(&[])).unwrap().arena_bytes, 3 << 20);
    let err = NpuConfig::from_lookup("", env(&[(ARENA_ENV, "lots")])).unwrap_err().to_string();
    assert!(err.contains("SD3_NPU_ARENA_MB=`lots`"), "{err}");
    // An invalid flag fails initialisation too.
    let err = NpuConfig::from_lookup("", env(&[(ALLOCATOR_STRATEGY, "foo")])).unwrap_err().to_string();
    assert!(err.contains("naive_best_fit"), "{err}");
}

#[test]
fn device_shows_flags_and_arena() {
    let config = NpuConfig::from_lookup("arena_mb=8", env(&[(USE_STRIDE_KERNEL, "0"), (SCALE_ACLNN, "True")])).unwrap();
    let provider = NpuProvider::new(config);
    assert_eq!((provider.name(), provider.device_count()), ("npu", 1));
    let dev = provider.open_device(0).unwrap();
    let info = dev.info();
    assert_eq!(info.kind, DeviceKind::Npu);
    assert_eq!(info.memory_bytes, 8 << 20);
    for line in [
        "FLAGS_npu_storage_format=0",
        "FLAGS_use_stride_kernel=0",
        "FLAGS_npu_scale_aclnn=1",
        "FLAGS_allocator_strategy=auto_growth",
        "arena_mb=8",
    ] {
        assert!(info.capabilities.iter().any(|c| c == line), "{line} missing from {:?}", info.capabilities);
        assert!(dev.stats().iter().any(|c| c == line) || line.starts_with("arena"), "{line} missing from stats");
    }
    assert!(provider.open_device(1).is_err());
    // Every open is the same card.
    let again = provider.open_device(0).unwrap();
    let b = again.alloc(1000).unwrap();
    assert!(dev.stats().iter().any(|l| l == "alloc.in_use_bytes=1536"), "{:?}", dev.stats());
    again.free(b);
}

#[test]
fn an_arena_the_host_cannot_provide_is_an_error_not_an_abort() {
    // 1 EiB: beyond any machine's virtual address space, whatever its overcommit policy.
    let config = NpuConfig::from_lookup("arena_mb=1099511627776", env(&[])).unwrap();
    let err = sd3_backend_npu::NpuDevice::new(config).err().expect("cannot reserve 1 EiB").to_string();
    assert!(err.contains("could not reserve the device arena"), "{err}");
}
