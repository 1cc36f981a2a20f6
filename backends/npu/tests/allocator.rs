//! The allocator on its own: padding and alignment, best fit, split and coalesce, fragmentation, out of memory
//! with recovery by releasing idle chunks, and both strategies.

use sd3_backend_npu::alloc::{block_size, Allocator, ALIGNMENT, EXTRA_PADDING, NAIVE_RESERVE_FRACTION};
use sd3_backend_npu::AllocatorStrategy::{AutoGrowth, NaiveBestFit};
use sd3_core::Error;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

#[test]
fn requests_are_padded_and_aligned() {
    assert_eq!((ALIGNMENT, EXTRA_PADDING), (512, 32));
    assert_eq!(block_size(0), 512);
    assert_eq!(block_size(1), 512);
    assert_eq!(block_size(480), 512);
    assert_eq!(block_size(481), 1024);
    assert_eq!(block_size(4096), 4608);
    for strategy in [AutoGrowth, NaiveBestFit] {
        let mut a = Allocator::new(strategy, MIB);
        for bytes in [1, 100, 481, 5000, 12345] {
            let x = a.alloc(bytes).unwrap();
            assert_eq!(x.offset % ALIGNMENT, 0, "{strategy:?}");
            assert_eq!(x.size, block_size(bytes));
        }
        let s = a.stats();
        assert_eq!(s.requested, 1 + 100 + 481 + 5000 + 12345);
        assert_eq!(s.in_use, [1, 100, 481, 5000, 12345].iter().map(|&b| block_size(b)).sum::<usize>());
    }
}

#[test]
fn auto_growth_grows_on_demand_and_caches_chunks() {
    let mut a = Allocator::new(AutoGrowth, 4 * MIB);
    assert_eq!(a.stats().reserved, 0, "auto_growth reserves nothing up front");
    let x = a.alloc(100 * KIB).unwrap();
    let s = a.stats();
    assert_eq!(
        (s.reserved, s.chunks, s.chunk_grows),
        (block_size(100 * KIB), 1, 1),
        "one chunk of exactly the request"
    );
    a.free(x.offset);
    let s = a.stats();
    assert_eq!((s.reserved, s.in_use, s.chunks), (block_size(100 * KIB), 0, 1), "the idle chunk stays cached");
    // A smaller request is served from the cached chunk by splitting it: no growth, taken from its end.
    let y = a.alloc(10 * KIB).unwrap();
    let s = a.stats();
    assert_eq!(s.chunk_grows, 1);
    assert_eq!(y.offset + y.size, x.offset + x.size, "the allocated piece is the end of the free block");
    assert_eq!(s.free_in_chunks, block_size(100 * KIB) - block_size(10 * KIB));
    assert_eq!(s.peak_in_use, block_size(100 * KIB));
    assert_eq!(s.peak_reserved, block_size(100 * KIB));
}

#[test]
fn split_and_coalesce() {
    let mut a = Allocator::new(AutoGrowth, 4 * MIB);
    let big = a.alloc(64 * KIB).unwrap();
    let chunk = big.size;
    a.free(big.offset);
    // Three pieces of the cached chunk: c, b, a from its end, the front still free.
    let p: Vec<_> = (0..3).map(|_| a.alloc(8 * KIB).unwrap()).collect();
    assert_eq!(a.stats().chunks, 1);
    assert!(p[0].offset > p[1].offset && p[1].offset > p[2].offset);
    // Free the middle: not adjacent to another free block, so two free blocks → fragmented.
    a.free(p[1].offset);
    let s = a.stats();
    let front = chunk - 3 * block_size(8 * KIB);
    assert_eq!(s.free_in_chunks, front + block_size(8 * KIB));
    assert_eq!(s.largest_free_block, front);
    let expected = 1.0 - front as f64 / (front + block_size(8 * KIB)) as f64;
    assert!((s.fragmentation - expected).abs() < 1e-12, "{} vs {expected}", s.fragmentation);
    // Free the outer ones: everything coalesces back into one block of the whole chunk.
    a.free(p[0].offset);
    a.free(p[2].offset);
    let s = a.stats();
    assert_eq!((s.free_in_chunks, s.largest_free_block, s.fragmentation), (chunk, chunk, 0.0));
    // And the whole chunk can be handed out again as one block.
    let again = a.alloc(64 * KIB).unwrap();
    assert_eq!(again.offset, big.offset);
    // Freeing twice or an unknown offset changes nothing.
    a.free(again.offset);
    a.free(again.offset);
    a.free(12345);
    assert_eq!(a.stats().in_use, 0);
}

#[test]
fn blocks_of_different_chunks_never_coalesce() {
    let mut a = Allocator::new(AutoGrowth, 4 * MIB);
    // Two chunks, adjacent in the arena.
    let x = a.alloc(16 * KIB).unwrap();
    let y = a.alloc(16 * KIB).unwrap();
    assert_eq!(a.stats().chunks, 2);
    a.free(x.offset);
    a.free(y.offset);
    let s = a.stats();
    assert_eq!(s.largest_free_block, block_size(16 * KIB), "free blocks stay per chunk");
    assert!(s.fragmentation > 0.0);
    // So a request bigger than one chunk needs a third chunk.
    a.alloc(20 * KIB).unwrap();
    assert_eq!(a.stats().chunks, 3);
}

#[test]
fn best_fit_picks_the_smallest_hole_then_the_lowest_offset() {
    let mut a = Allocator::new(NaiveBestFit, 4 * MIB);
    let sizes = [8 * KIB, 2 * KIB, 4 * KIB, 2 * KIB, 16 * KIB];
    let blocks: Vec<_> = sizes.iter().map(|&s| a.alloc(s).unwrap()).collect();
    let _guard = a.alloc(KIB).unwrap();
    // Holes of 8, 2 and 2 KiB (+ padding); the 4 and 16 KiB blocks stay.
    for i in [0, 1, 3] {
        a.free(blocks[i].offset);
    }
    // 1.5 KiB fits the 2 KiB holes best; of the two equal holes the lower offset is chosen.
    let lower = blocks[1].offset.min(blocks[3].offset);
    let hole = blocks.iter().find(|b| b.offset == lower).unwrap();
    let x = a.alloc(1536).unwrap();
    assert!(x.offset >= hole.offset && x.offset + x.size <= hole.offset + hole.size, "{x:?} not in {hole:?}");
    // 6 KiB only fits the 8 KiB hole.
    let y = a.alloc(6 * KIB).unwrap();
    assert!(y.offset >= blocks[0].offset && y.offset + y.size <= blocks[0].offset + blocks[0].size);
}

#[test]
fn auto_growth_recovers_from_oom_by_releasing_idle_chunks() {
    let mut a = Allocator::new(AutoGrowth, MIB);
    let x = a.alloc(600 * KIB).unwrap();
    a.free(x.offset);
    // The 600 KiB chunk is idle and cached; 700 KiB neither fits it nor the rest of the arena (~424 KiB).
    let y = a.alloc(700 * KIB).expect("released the idle chunk and retried");
    let s = a.stats();
    assert_eq!(s.chunks_released, 1);
    assert_eq!((s.chunks, s.reserved, s.in_use), (1, y.size, y.size));
    assert_eq!(s.oom_errors, 0);
    // A chunk in use is never released: now a real out-of-memory error.
    let err = a.alloc(700 * KIB).unwrap_err();
    let msg = err.to_string();
    match err {
        Error::OutOfMemory { requested, available, .. } => {
            assert_eq!(requested, 700 * KIB as u64);
            assert_eq!(available as usize, MIB - y.size);
        }
        e => panic!("expected OutOfMemory, got {e}"),
    }
    assert!(msg.contains("allocator_strategy=auto_growth"), "{msg}");
    assert!(msg.contains(&format!("requested {} bytes", 700 * KIB)), "{msg}");
    assert!(msg.contains(&format!("arena {MIB} bytes")), "{msg}");
    assert_eq!(a.stats().oom_errors, 1);
    // The allocator is still usable after the error.
    a.free(y.offset);
    a.alloc(900 * KIB).unwrap();
}

#[test]
fn naive_best_fit_reserves_up_front_and_never_releases() {
    let cap = 10 * MIB;
    let mut a = Allocator::new(NaiveBestFit, cap);
    let reserved = (cap as f64 * NAIVE_RESERVE_FRACTION) as usize / ALIGNMENT * ALIGNMENT;
    let s = a.stats();
    assert_eq!((s.reserved, s.chunks, s.in_use), (reserved, 1, 0));
    // Allocations inside the reservation do not grow it.
    let xs: Vec<_> = (0..8).map(|_| a.alloc(MIB).unwrap()).collect();
    assert_eq!(a.stats().reserved, reserved);
    for x in &xs {
        a.free(x.offset);
    }
    assert_eq!(a.stats().reserved, reserved, "freed memory stays reserved");
    // Bigger than the reservation: grows by a chunk taken from what is left... which is too little.
    let err = a.alloc(reserved).unwrap_err().to_string();
    assert!(err.contains("allocator_strategy=naive_best_fit"), "{err}");
    assert!(!err.contains("idle chunk"), "naive_best_fit does not release chunks: {err}");
    // A request that fits the unreserved rest grows the pool instead.
    let rest = cap - reserved;
    let mut b = Allocator::new(NaiveBestFit, cap);
    let fill = b.alloc(reserved - EXTRA_PADDING).unwrap();
    assert_eq!(fill.size, reserved);
    b.alloc(rest / 2).unwrap();
    let s = b.stats();
    assert_eq!((s.chunks, s.chunk_grows), (2, 2));
}

#[test]
fn both_strategies_report_oom_with_sizes() {
    for (strategy, name) in [(AutoGrowth, "auto_growth"), (NaiveBestFit, "naive_best_fit")] {
        let mut a = Allocator::new(strategy, MIB);
        let err = a.alloc(2 * MIB).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory { requested, .. } if requested == 2 * MIB as u64));
        let msg = err.to_string();
        assert!(msg.contains(name) && msg.contains("2097152") && msg.contains("available"), "{msg}");
    }
}
