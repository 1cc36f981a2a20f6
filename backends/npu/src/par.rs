//! Light multi-threading for kernels: split a range of work items over the host's cores.

use std::ops::Range;
use std::sync::OnceLock;

/// Worker threads a kernel may use: `SD3_NPU_THREADS` if set, else the host's available parallelism.
pub fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("SD3_NPU_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .min(64)
    })
}

/// Run `f` over `0..n` split into contiguous ranges of at least `grain` items, one per thread.
pub fn par_for(n: usize, grain: usize, f: impl Fn(Range<usize>) + Sync) {
    let parts = threads().min(n.div_ceil(grain.max(1))).max(1);
    if parts <= 1 {
        f(0..n);
        return;
    }
    let per = n.div_ceil(parts);
    std::thread::scope(|s| {
        for t in 1..parts {
            let f = &f;
            let range = (t * per).min(n)..((t + 1) * per).min(n);
            s.spawn(move || f(range));
        }
        f(0..per.min(n));
    });
}
