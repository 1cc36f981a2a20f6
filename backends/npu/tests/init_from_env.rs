//! Plugin initialisation reads the real process environment. One test in its own binary (its own process),
//! so that setting variables races with nothing.

use sd3_backend_npu::NpuProvider;
use sd3_core::BackendProvider;

#[test]
fn provider_reads_flags_and_arena_from_the_environment() {
    std::env::set_var("FLAGS_npu_storage_format", "1");
    std::env::set_var("FLAGS_use_stride_kernel", "False");
    std::env::set_var("FLAGS_npu_scale_aclnn", "True");
    std::env::set_var("FLAGS_allocator_strategy", "naive_best_fit");
    std::env::set_var("SD3_NPU_ARENA_MB", "3");
    let provider = NpuProvider::from_env("").unwrap();
    let info = provider.open_device(0).unwrap().info();
    assert_eq!(info.memory_bytes, 3 << 20);
    for line in [
        "FLAGS_npu_storage_format=1",
        "FLAGS_use_stride_kernel=0",
        "FLAGS_npu_scale_aclnn=1",
        "FLAGS_allocator_strategy=naive_best_fit",
    ] {
        assert!(info.capabilities.iter().any(|c| c == line), "{line} missing from {:?}", info.capabilities);
    }
    // naive_best_fit reserved 92% of the 3 MiB arena at creation.
    let stats = provider.open_device(0).unwrap().stats();
    let reserved = ((3u64 << 20) as f64 * 0.92) as u64 / 512 * 512;
    assert!(stats.contains(&format!("alloc.reserved_bytes={reserved}")), "{stats:?}");

    std::env::set_var("FLAGS_allocator_strategy", "foo");
    let err = NpuProvider::from_env("").err().expect("invalid strategy rejected").to_string();
    assert!(err.contains("FLAGS_allocator_strategy=`foo`") && err.contains("auto_growth, naive_best_fit"), "{err}");
    std::env::set_var("FLAGS_allocator_strategy", "auto_growth");
    let err = NpuProvider::from_env("arena_mb=many").err().expect("bad option rejected").to_string();
    assert!(err.contains("arena_mb=`many`"), "{err}");
}
