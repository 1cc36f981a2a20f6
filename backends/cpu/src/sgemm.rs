//! An AVX-512 f32 GEMM (`C (+)= A·B`, any strides), used where the CPU has AVX-512F: the `gemm` crate only
//! reaches AVX-512 on nightly Rust, and its AVX2 kernels get half of such a CPU's peak.
//!
//! BLIS structure: the work is cut into a grid of (row group × column group) tasks, one per thread; each task
//! packs a `KC×cols` slice of B into `NR`-wide panels and `MC×KC` blocks of A into `MR`-tall panels, then runs a
//! `MR×NR` register-blocked micro-kernel (24 accumulators, A broadcast, B loaded as two vectors).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

/// Rows of the micro-kernel's C tile.
pub(crate) const MR: usize = 12;
/// Columns of the micro-kernel's C tile: two 16-lane vectors.
pub(crate) const NR: usize = 32;
/// Depth of one packed block: the B micro-panel (KC×NR) stays in L1. `SD3_CPU_SGEMM_KC` overrides (tuning).
const KC_DEFAULT: usize = 256;
/// Rows of one packed A block (MC×KC stays in L2). `SD3_CPU_SGEMM_MC` overrides (tuning; rounded to MR).
const MC_DEFAULT: usize = 192;

/// The blocking in force: `(KC, MC)`.
fn blocking() -> (usize, usize) {
    static B: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    *B.get_or_init(|| {
        let var = |name: &str, default: usize| {
            std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok()).filter(|&v| v > 0).unwrap_or(default)
        };
        (var("SD3_CPU_SGEMM_KC", KC_DEFAULT), var("SD3_CPU_SGEMM_MC", MC_DEFAULT).next_multiple_of(MR))
    })
}

/// Whether this CPU can run the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the kernels use this module: [`available`], unless `SD3_CPU_SGEMM=0` asks for the portable
/// paths (the `gemm` crate), e.g. to compare or to test them on an AVX-512 machine.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| available() && std::env::var("SD3_CPU_SGEMM").map_or(true, |v| v != "0"))
}

/// A strided f32 matrix: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Strided {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: plain addresses; tasks write disjoint tiles of C and only read A and B.
unsafe impl Send for Strided {}
unsafe impl Sync for Strided {}

impl Strided {
    #[inline(always)]
    pub(crate) unsafe fn at(&self, i: usize, j: usize) -> *mut f32 {
        unsafe { self.ptr.offset(i as isize * self.rs + j as isize * self.cs) }
    }
}

/// `c = a·b` (or `c += a·b` when `accumulate`), `a` m×k, `b` k×n, split over `threads` tasks.
///
/// # Safety
/// [`available`] must be true; the matrices must be valid for their shapes and strides; `c` must not
/// overlap `a` or `b`, and its elements must be distinct.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    c: Strided,
    accumulate: bool,
    a: Strided,
    b: Strided,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Task grid: split columns first, so each task's packed slice of B stays small enough for L2 (A's rows are
    // packed by every column group, which is cheap next to the products); rows when columns run out.
    let col_groups = threads.min(n.div_ceil(4 * NR)).max(1);
    let row_groups = threads.div_ceil(col_groups).min(m.div_ceil(MR)).max(1);
    let cols = n.div_ceil(col_groups).next_multiple_of(NR);
    let rows = m.div_ceil(row_groups).next_multiple_of(MR);
    let tasks: Vec<(usize, usize)> = (0..row_groups)
        .flat_map(|r| (0..col_groups).map(move |g| (r * rows, g * cols)))
        .filter(|&(r0, c0)| r0 < m && c0 < n)
        .collect();
    let run = |&(r0, c0): &(usize, usize)| {
        // SAFETY: forwarded from the caller; tasks cover disjoint tiles of c.
        unsafe { tile(r0, rows.min(m - r0), c0, cols.min(n - c0), k, c, accumulate, a, b) }
    };
    if tasks.len() == 1 {
        run(&tasks[0]);
    } else {
        tasks.par_iter().for_each(run);
    }
}

/// One task: rows `r0..r0+mt`, columns `c0..c0+nt` of C.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(r0: usize, mt: usize, c0: usize, nt: usize, k: usize, c: Strided, acc: bool, a: Strided, b: Strided) {
    let (kc_max, mc_max) = blocking();
    let n_panels = nt.div_ceil(NR);
    let mut bp = vec![0f32; kc_max * NR * n_panels];
    let mut ap = vec![0f32; mc_max * kc_max];
    if k == 0 {
        if !acc {
            for i in 0..mt {
                for j in 0..nt {
                    unsafe { *c.at(r0 + i, c0 + j) = 0.0 };
                }
            }
        }
        return;
    }
    for pc in (0..k).step_by(kc_max) {
        let kc = kc_max.min(k - pc);
        unsafe { pack_b(&mut bp, b, pc, kc, c0, nt) };
        let overwrite = pc == 0 && !acc;
        for ic in (0..mt).step_by(mc_max) {
            let mc = mc_max.min(mt - ic);
            unsafe { pack_a(&mut ap, a, r0 + ic, mc, pc, kc) };
            for jp in 0..n_panels {
                let nr = NR.min(nt - jp * NR);
                let bpanel = &bp[jp * kc * NR..];
                for ip in 0..mc.div_ceil(MR) {
                    let mr = MR.min(mc - ip * MR);
                    let cptr = unsafe { c.at(r0 + ic + ip * MR, c0 + jp * NR) };
                    let ct = Strided { ptr: cptr, rs: c.rs, cs: c.cs };
                    unsafe { kernel(kc, ap[ip * kc * MR..].as_ptr(), bpanel.as_ptr(), ct, overwrite, mr, nr) };
                }
            }
        }
    }
}

/// B rows `pc..pc+kc`, columns `c0..c0+nt` into NR-wide panels (row p of a panel: NR floats), zero-padded.
unsafe fn pack_b(bp: &mut [f32], b: Strided, pc: usize, kc: usize, c0: usize, nt: usize) {
    for (jp, panel) in bp.chunks_exact_mut(kc * NR).enumerate().take(nt.div_ceil(NR)) {
        let nr = NR.min(nt - jp * NR);
        let col0 = c0 + jp * NR;
        if b.cs == 1 {
            for p in 0..kc {
                let src = unsafe { std::slice::from_raw_parts(b.at(pc + p, col0), nr) };
                panel[p * NR..p * NR + nr].copy_from_slice(src);
                panel[p * NR + nr..(p + 1) * NR].fill(0.0);
            }
        } else {
            for j in 0..NR {
                if j < nr {
                    for p in 0..kc {
                        panel[p * NR + j] = unsafe { *b.at(pc + p, col0 + j) };
                    }
                } else {
                    (0..kc).for_each(|p| panel[p * NR + j] = 0.0);
                }
            }
        }
    }
}

/// A rows `r0..r0+mc`, columns `pc..pc+kc` into MR-tall panels (column p of a panel: MR floats), zero-padded.
unsafe fn pack_a(ap: &mut [f32], a: Strided, r0: usize, mc: usize, pc: usize, kc: usize) {
    for (ip, panel) in ap.chunks_exact_mut(kc * MR).enumerate().take(mc.div_ceil(MR)) {
        let mr = MR.min(mc - ip * MR);
        for i in 0..MR {
            if i < mr {
                let row = r0 + ip * MR + i;
                for p in 0..kc {
                    panel[p * MR + i] = unsafe { *a.at(row, pc + p) };
                }
            } else {
                (0..kc).for_each(|p| panel[p * MR + i] = 0.0);
            }
        }
    }
}

/// The `MR×NR` micro-kernel: `C[..mr, ..nr] (+)= Apanel·Bpanel` over depth `kc`. A panel: `kc` columns of
/// `MR` floats; B panel: `kc` rows of `NR` floats.
///
/// # Safety
/// [`available`] must be true; the panels must hold `kc` steps; C must be valid for `mr×nr` with its strides.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: Strided,
    overwrite: bool,
    mr: usize,
    nr: usize,
) {
    unsafe {
        // The C tile is read only after the k loop: fetch it now so that read never waits on memory.
        if !overwrite && c.cs == 1 {
            for i in 0..mr {
                let cp = c.ptr.offset(i as isize * c.rs) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(cp);
                _mm_prefetch::<_MM_HINT_T0>(cp.add(64));
            }
        }
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kc {
            let b0 = _mm512_loadu_ps(b.add(p * NR));
            let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
            let ap = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i));
                row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
            }
        }
        if mr == MR && nr == NR && c.cs == 1 {
            for (i, row) in acc.iter().enumerate() {
                let cp = c.ptr.offset(i as isize * c.rs);
                if overwrite {
                    _mm512_storeu_ps(cp, row[0]);
                    _mm512_storeu_ps(cp.add(16), row[1]);
                } else {
                    _mm512_storeu_ps(cp, _mm512_add_ps(_mm512_loadu_ps(cp), row[0]));
                    _mm512_storeu_ps(cp.add(16), _mm512_add_ps(_mm512_loadu_ps(cp.add(16)), row[1]));
                }
            }
        } else {
            let mut tmp = [0f32; MR * NR];
            for (i, row) in acc.iter().enumerate() {
                _mm512_storeu_ps(tmp.as_mut_ptr().add(i * NR), row[0]);
                _mm512_storeu_ps(tmp.as_mut_ptr().add(i * NR + 16), row[1]);
            }
            for i in 0..mr {
                for j in 0..nr {
                    let cp = c.at(i, j);
                    *cp = if overwrite { tmp[i * NR + j] } else { *cp + tmp[i * NR + j] };
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn kernel(_: usize, _: *const f32, _: *const f32, _: Strided, _: bool, _: usize, _: usize) {
    unreachable!("sgemm::available() is false off x86-64")
}
