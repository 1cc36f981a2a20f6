//! [`OpenClDevice`]: one OpenCL device with its context, in-order queue, buffers and kernels.

use crate::memory::Memory;
use crate::platform::ClDevice;
use crate::program_cache::{default_cache_dir, ProgramCache};
use crate::{cl_error, ops};
use ocl::core::{self, CommandQueue, Context, DeviceId, Kernel, Program};
use sd3_core::{BufferId, Device, DeviceInfo, DeviceKind, MarkerId, OpCall, Result};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};

/// Work-group shapes, chosen per device class and passed to the kernels as build options.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Work-group size of the reductions (a power of two).
    pub reduce_wg: usize,
    /// Register blocking of the GEMM tiles (a 16x16 work-group computes 16·rm x 16·rn outputs).
    pub gemm_rm: usize,
    pub gemm_rn: usize,
    pub gemm_tk: usize,
    /// Query rows per attention work-group.
    pub attn_bq: usize,
}

impl Tuning {
    fn for_device(d: &ClDevice) -> Tuning {
        let wg = d.max_work_group.max(1);
        let pow2_at_most = |n: usize| if n == 0 { 1 } else { 1usize << (usize::BITS - 1 - n.leading_zeros()) };
        match d.kind {
            // GPUs: wide work-groups to hide memory latency.
            DeviceKind::Gpu => {
                Tuning { reduce_wg: pow2_at_most(wg.min(256)), gemm_rm: 4, gemm_rn: 4, gemm_tk: 16, attn_bq: 64 }
            }
            // CPUs (PoCL and vendors'): a work-group runs as a loop on one core; smaller groups, same tiles.
            _ => Tuning { reduce_wg: pow2_at_most(wg.min(64)), gemm_rm: 4, gemm_rn: 4, gemm_tk: 16, attn_bq: 32 },
        }
    }

    /// Whether the device runs the 16x16 GEMM work-group.
    pub fn gemm_ok(&self, d: &ClDevice) -> bool {
        d.max_work_group >= 256
    }
}

/// What launches need exclusively: cached kernel objects (their arguments are state) and the gather flag.
pub(crate) struct Exec {
    kernels: HashMap<(usize, &'static str), Kernel>,
    pub(crate) error_flag: Option<core::Mem>,
}

pub struct OpenClDevice {
    pub(crate) cl: ClDevice,
    pub(crate) context: Context,
    pub(crate) queue: CommandQueue,
    pub(crate) memory: Memory,
    pub(crate) programs: ProgramCache,
    pub(crate) tuning: Tuning,
    /// Set when the tensor-core GEMM failed to build here (the message is kept for `stats`); the SIMT GEMM
    /// then runs everything.
    pub(crate) mma_failure: Mutex<Option<String>>,
    /// Set when the f16-arithmetic elementwise program failed to build here; f32 arithmetic is used then.
    pub(crate) half_math_failure: Mutex<Option<String>>,
    exec: Mutex<Exec>,
    /// Whether the queue has profiling enabled (timing markers need it).
    pub(crate) queue_profiling: bool,
    pub(crate) markers: Mutex<crate::timing::Markers>,
}

impl OpenClDevice {
    /// Open `cl` with the default program cache directory (see [`crate::program_cache`]).
    pub fn open(cl: ClDevice) -> Result<OpenClDevice> {
        OpenClDevice::open_with_cache_dir(cl, default_cache_dir())
    }

    /// Open `cl` with programs cached on disk under `cache_dir` (`None`: in memory only).
    pub fn open_with_cache_dir(cl: ClDevice, cache_dir: Option<std::path::PathBuf>) -> Result<OpenClDevice> {
        let device = unsafe { DeviceId::from_raw(cl.device) };
        let context = core::create_context(None, &[device], None, None)
            .map_err(|e| cl_error(&format!("creating a context on {}", cl.display_name()), e))?;
        let queue_profiling = crate::timing::queue_profiling_wanted();
        let properties = queue_profiling.then(|| core::CommandQueueProperties::new().profiling());
        let queue = core::create_command_queue(&context, device, properties)
            .map_err(|e| cl_error(&format!("creating a queue on {}", cl.display_name()), e))?;
        Ok(OpenClDevice {
            memory: Memory::new(cl.global_mem, cl.max_alloc),
            programs: ProgramCache::new(cache_dir),
            tuning: Tuning::for_device(&cl),
            exec: Mutex::new(Exec { kernels: HashMap::new(), error_flag: None }),
            mma_failure: Mutex::new(None),
            queue_profiling,
            markers: Mutex::new(Default::default()),
            half_math_failure: Mutex::new(None),
            cl,
            context,
            queue,
        })
    }

    pub fn cl_device(&self) -> &ClDevice {
        &self.cl
    }

    /// Build (or load from the cache) an OpenCL C program for this device. A build failure is an error
    /// carrying the compiler's build log. The backend's own kernels go through here; it is public for tools
    /// and tests.
    pub fn program(&self, name: &str, source: &str, options: &str) -> Result<Program> {
        self.programs.get(&self.context, &self.cl, name, source, options)
    }

    pub(crate) fn lock_exec(&self) -> MutexGuard<'_, Exec> {
        self.exec.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Exec {
    /// The cached kernel object `name` of `program`.
    pub(crate) fn kernel(&mut self, program: &Program, name: &'static str) -> Result<Kernel> {
        let key = (program.as_ptr() as usize, name);
        if let Some(k) = self.kernels.get(&key) {
            return Ok(k.clone());
        }
        let k = core::create_kernel(program, name).map_err(|e| cl_error(&format!("creating kernel {name}"), e))?;
        self.kernels.insert(key, k.clone());
        Ok(k)
    }
}

impl Device for OpenClDevice {
    fn info(&self) -> DeviceInfo {
        self.cl.info()
    }
    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        self.memory.alloc(&self.context, bytes)
    }
    fn free(&self, buffer: BufferId) {
        self.memory.free(buffer)
    }
    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        self.memory.upload(&self.queue, buffer, offset, data)
    }
    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        self.memory.download(&self.queue, buffer, offset, out)
    }
    fn copy_buffer(&self, src: BufferId, so: usize, dst: BufferId, d_o: usize, bytes: usize) -> Result<()> {
        self.memory.copy(&self.queue, src, so, dst, d_o, bytes)
    }
    fn supports(&self, call: &OpCall) -> bool {
        ops::supports(self, call)
    }
    fn execute(&self, call: &OpCall) -> Result<()> {
        ops::execute(self, call)
    }
    fn synchronize(&self) -> Result<()> {
        core::finish(&self.queue).map_err(|e| cl_error("clFinish", e))
    }
    fn record_marker(&self) -> Result<Option<MarkerId>> {
        self.record_marker_event()
    }
    fn marker_elapsed(&self, start: MarkerId, end: MarkerId) -> Result<f64> {
        self.marker_seconds(start, end)
    }
    fn release_marker(&self, marker: MarkerId) {
        self.release_marker_event(marker)
    }
    fn stats(&self) -> Vec<String> {
        let s = &self.programs.stats;
        vec![
            format!("opencl.buffers={}", self.memory.buffer_count()),
            format!("opencl.bytes_in_use={}", self.memory.bytes_in_use()),
            format!("opencl.queue_profiling={}", if self.queue_profiling { "on" } else { "off" }),
            format!("opencl.programs_built={}", s.built.load(Ordering::Relaxed)),
            format!("opencl.programs_loaded_from_cache={}", s.loaded.load(Ordering::Relaxed)),
            format!("opencl.cache_entries_rebuilt={}", s.rebuilt_corrupt.load(Ordering::Relaxed)),
            match (self.cl.tensor_cores, self.mma_failure.lock().unwrap().as_ref()) {
                (false, _) => "opencl.mma=unavailable".to_string(),
                (true, None) => "opencl.mma=on".to_string(),
                (true, Some(e)) => format!("opencl.mma=off (build failed: {})", e.lines().next().unwrap_or("")),
            },
            match (ops::half_math_wanted(&self.cl), self.half_math_failure.lock().unwrap().as_ref()) {
                (false, _) => "opencl.half_math=off".to_string(),
                (true, None) => "opencl.half_math=on".to_string(),
                (true, Some(e)) => format!("opencl.half_math=off (build failed: {})", e.lines().next().unwrap_or("")),
            },
        ]
    }
}
