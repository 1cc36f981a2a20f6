//! [`VulkanDevice`]: one logical device with one compute queue. Ops are recorded into a command buffer (one
//! dispatch each) and submitted as a batch when the host needs results (`download`, `synchronize`, `upload`) or
//! when the batch's descriptor pool or parameter ring is full. A memory barrier goes before a dispatch only where
//! it touches bytes that a dispatch recorded since the last barrier writes, or writes bytes one reads (see
//! [`Access`]), so independent dispatches (the image and text streams' linears) may run at the same time.

use crate::coop::CoopKernels;
use crate::instance::{PhysicalDevice, VkInstance};
use crate::markers::Markers;
use crate::memory::{Allocator, HostBuffer};
use crate::pipelines::{Kernel, Pipelines, BINDINGS};
use crate::{ops, vk_error};
use ash::vk;
use sd3_core::{BufferId, Device, DeviceInfo, Error, MarkerId, OpCall, Result, TensorDesc};
use std::sync::{Arc, Mutex, MutexGuard};

/// Descriptor sets (= dispatches) per batch. A full batch is submitted without waiting and recording goes on into
/// the other of [`FRAMES`] command buffers, so the device runs one batch while the host records the next.
const SETS_PER_BATCH: u32 = 256;
/// The first batch after the queue went idle (a flush) is submitted at this many dispatches, and each next one at
/// twice as many up to [`SETS_PER_BATCH`], so that the device starts while the host records the rest instead of
/// waiting for a whole batch. `SD3_VULKAN_FIRST_BATCH` overrides it (256: the old behaviour, for comparisons).
const FIRST_BATCH: u32 = 16;
pub const FIRST_BATCH_ENV: &str = "SD3_VULKAN_FIRST_BATCH";
const FRAMES: usize = 2;
const PARAM_RING_BYTES: u64 = 1 << 20;
/// Retired (freed, maybe still in use) dedicated blocks above this size make a full batch wait for the queue.
const RETIRED_FLUSH_BYTES: u64 = 1 << 30;
const STAGING_BYTES: u64 = 32 << 20;

pub struct VulkanDevice {
    pub phys: PhysicalDevice,
    /// Matmul and attention on cooperative matrices, where the device has them (see [`crate::coop`]).
    pub coop: Option<CoopKernels>,
    /// Which path convolutions take (`SD3_VULKAN_CONV`, read at open).
    pub(crate) conv_path: crate::conv_im2col::ConvPath,
    device: ash::Device,
    queue: vk::Queue,
    state: Mutex<State>,
    // Declared last: the instance outlives the device (fields drop in order, after `Drop::drop`).
    _instance: Arc<VkInstance>,
}

/// One batch's command buffer with what its dispatches use: descriptor sets and a parameter ring.
struct Frame {
    cmd: vk::CommandBuffer,
    fence: vk::Fence,
    desc_pool: vk::DescriptorPool,
    sets: u32,
    params: HostBuffer,
    params_used: u64,
    /// Submitted and not yet waited for.
    in_flight: bool,
}

/// Bytes of one buffer that a recorded dispatch reads or writes (whole 16-byte units: shaders store 16-bit
/// elements as 32-bit words and load 16-byte vectors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Access {
    pub buffer: vk::Buffer,
    pub start: u64,
    pub end: u64,
}

impl Access {
    fn overlaps(&self, o: &Access) -> bool {
        self.buffer == o.buffer && self.start < o.end && o.start < self.end
    }
}

/// Environment switch: `SD3_VULKAN_BARRIERS=all` puts a barrier after every dispatch (the behaviour before
/// hazard tracking), for comparisons.
pub const BARRIERS_ENV: &str = "SD3_VULKAN_BARRIERS";

pub(crate) struct State {
    pub alloc: Allocator,
    /// What the dispatches recorded since the last barrier read and write.
    pending_reads: Vec<Access>,
    pending_writes: Vec<Access>,
    /// `SD3_VULKAN_BARRIERS=all`.
    barrier_every_dispatch: bool,
    /// Barriers recorded (device stats).
    pub barriers: u64,
    pipelines: Pipelines,
    cmd_pool: vk::CommandPool,
    frames: Vec<Frame>,
    /// The frame being recorded (or to be recorded next).
    cur: usize,
    param_align: u64,
    staging: Option<HostBuffer>,
    recording: bool,
    /// Bound to the bindings a dispatch does not use (every binding of the layout must be valid).
    dummy: BufferId,
    max_range: u64,
    mem_props: vk::PhysicalDeviceMemoryProperties,
    pub dispatches: u64,
    submits: u64,
    /// Dispatches at which the current batch is submitted (see [`FIRST_BATCH`]).
    batch_limit: u32,
    first_batch: u32,
    /// Two timestamps bracketing each submitted batch, per frame (None where the queue has no timestamps).
    timestamps: Option<vk::QueryPool>,
    timestamp_mask: u64,
    timestamp_period_ns: f64,
    /// Device time of all submitted batches, from the timestamps.
    gpu_ns: f64,
    /// `--benchmark` timing markers (None where the queue has no timestamps).
    pub(crate) markers: Option<Markers>,
}

/// A tensor as a shader sees it: the buffer range bound and the view's element offset inside that range, and the
/// bytes the view spans (for hazard tracking).
#[derive(Clone, Copy)]
pub(crate) struct Bound {
    pub info: vk::DescriptorBufferInfo,
    pub elem_offset: u32,
    pub span: Access,
}

impl VulkanDevice {
    pub fn open(instance: Arc<VkInstance>, phys: PhysicalDevice) -> Result<VulkanDevice> {
        VulkanDevice::open_with(instance, phys, false)
    }

    /// Open with `unmapped_memory`: tensors in a device-local memory type that is not host-visible where one exists
    /// (discrete GPUs), and never mapped, so uploads and downloads take the staging path
    /// that devices without host-visible device-local memory (discrete GPUs) use. For tests on lavapipe.
    pub fn open_with(instance: Arc<VkInstance>, phys: PhysicalDevice, unmapped_memory: bool) -> Result<VulkanDevice> {
        let family = phys
            .compute_family
            .ok_or_else(|| Error::backend("vulkan", format!("{}: no queue family supports compute", phys.name)))?;
        let l = &phys.limits;
        if l.max_per_stage_descriptor_storage_buffers < BINDINGS || l.max_compute_shared_memory_size < 16384 {
            return Err(Error::backend(
                "vulkan",
                format!(
                    "{}: needs {BINDINGS} storage buffers per stage and 16 KiB of shared memory; the device has {} and {}",
                    phys.name, l.max_per_stage_descriptor_storage_buffers, l.max_compute_shared_memory_size
                ),
            ));
        }
        let i = &instance.instance;
        let prio = [1.0f32];
        let qinfo = [vk::DeviceQueueCreateInfo::default().queue_family_index(family).queue_priorities(&prio)];
        // The cooperative-matrix shaders need their extension, f16 arithmetic and the Vulkan memory model.
        let coop = crate::coop::select_for(&phys);
        let mut extensions = Vec::new();
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default().shader_float16(true).vulkan_memory_model(true);
        let mut fcoop = vk::PhysicalDeviceCooperativeMatrixFeaturesNV::default().cooperative_matrix(true);
        let mut fstats =
            vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default().pipeline_executable_info(true);
        let mut f11 = vk::PhysicalDeviceVulkan11Features::default().storage_buffer16_bit_access(true);
        let mut fkhr = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default().cooperative_matrix(true);
        let mut fcm2 = crate::cm2::Features::needed();
        let mut create = vk::DeviceCreateInfo::default().queue_create_infos(&qinfo);
        if coop.is_some() {
            extensions.push(vk::NV_COOPERATIVE_MATRIX_NAME.as_ptr());
            create = create.push_next(&mut f12).push_next(&mut fcoop);
        }
        // The KHR cooperative matrices: the matmuls' KHR form, and what the workgroup-scope shaders build on.
        if coop.is_some_and(|c| c.cm2 || c.khr) {
            extensions.push(vk::KHR_COOPERATIVE_MATRIX_NAME.as_ptr());
            create = create.push_next(&mut fkhr);
        }
        // The workgroup-scope shaders: the extension's features, and 16-bit storage (they bind f16 tensors as f16
        // arrays). The KHR form of the subgroup-scope attention (a variant, `attention_coop16_khr.comp`) needs the
        // extension's conversions too, so KHR mode enables it wherever the device has it.
        let cm2_offered = crate::coop::CoopSupport::of(&phys).cm2;
        if coop.is_some_and(|c| c.cm2 || (c.khr && cm2_offered)) {
            extensions.push(crate::cm2::EXTENSION.as_ptr());
            create = create.push_next(&mut f11);
            // SAFETY: `fcm2` lives until `create_device` below returns.
            create.p_next = unsafe { fcm2.chain(create.p_next) };
        }
        // Debug: the driver's per-pipeline statistics (registers, spills), where asked for and offered.
        let stats = crate::stats::requested() && unsafe { crate::stats::offered(i, phys.handle) };
        if stats {
            extensions.push(vk::KHR_PIPELINE_EXECUTABLE_PROPERTIES_NAME.as_ptr());
            create = create.push_next(&mut fstats);
        } else if crate::stats::requested() {
            eprintln!("{}: {} lacks VK_KHR_pipeline_executable_properties", crate::stats::STATS_ENV, phys.name);
        }
        create = create.enabled_extension_names(&extensions);
        // SAFETY: valid physical device of this instance; every object is destroyed in `Drop`.
        let device = unsafe { i.create_device(phys.handle, &create, None) }
            .map_err(|e| vk_error(&format!("vkCreateDevice on {}", phys.name), e))?;
        let state = unsafe { Self::create_state(i, &device, &phys, family, unmapped_memory) };
        let state = match state {
            Ok(mut s) => {
                if stats {
                    s.pipelines.stats = Some(ash::khr::pipeline_executable_properties::Device::new(i, &device));
                }
                s
            }
            Err(e) => {
                // SAFETY: nothing else uses the device yet. (Objects created before the failure are reclaimed
                // with the device.)
                unsafe { device.destroy_device(None) };
                return Err(e);
            }
        };
        // SAFETY: the queue was requested at creation.
        let queue = unsafe { device.get_device_queue(family, 0) };
        let conv_path = crate::conv_im2col::ConvPath::from_env();
        Ok(VulkanDevice { phys, coop, conv_path, device, queue, state: Mutex::new(state), _instance: instance })
    }

    unsafe fn create_state(
        i: &ash::Instance,
        d: &ash::Device,
        phys: &PhysicalDevice,
        family: u32,
        unmapped_memory: bool,
    ) -> Result<State> {
        let mem_props = i.get_physical_device_memory_properties(phys.handle);
        let align = phys.limits.min_storage_buffer_offset_alignment;
        let mut alloc = Allocator::new(d, &mem_props, align, phys.max_memory_allocation, !unmapped_memory)?;
        if unmapped_memory {
            // Also where the only device-local type is host-visible (lavapipe): the staging path, for tests.
            alloc.host_visible = false;
        }
        let pipelines = Pipelines::new(d)?;
        let cmd_pool = d
            .create_command_pool(
                &vk::CommandPoolCreateInfo::default()
                    .queue_family_index(family)
                    .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                None,
            )
            .map_err(|e| vk_error("vkCreateCommandPool", e))?;
        let mut frames = Vec::with_capacity(FRAMES);
        for _ in 0..FRAMES {
            let cmd = d
                .allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default().command_pool(cmd_pool).command_buffer_count(1),
                )
                .map_err(|e| vk_error("vkAllocateCommandBuffers", e))?[0];
            let fence =
                d.create_fence(&vk::FenceCreateInfo::default(), None).map_err(|e| vk_error("vkCreateFence", e))?;
            let sizes = [vk::DescriptorPoolSize::default()
                .ty(vk::DescriptorType::STORAGE_BUFFER)
                .descriptor_count(SETS_PER_BATCH * BINDINGS)];
            let desc_pool = d
                .create_descriptor_pool(
                    &vk::DescriptorPoolCreateInfo::default().max_sets(SETS_PER_BATCH).pool_sizes(&sizes),
                    None,
                )
                .map_err(|e| vk_error("vkCreateDescriptorPool", e))?;
            let params = HostBuffer::new(d, &mem_props, PARAM_RING_BYTES, vk::MemoryPropertyFlags::DEVICE_LOCAL)?;
            frames.push(Frame { cmd, fence, desc_pool, sets: 0, params, params_used: 0, in_flight: false });
        }
        let timestamps = if phys.timestamp_bits > 0 {
            let info =
                vk::QueryPoolCreateInfo::default().query_type(vk::QueryType::TIMESTAMP).query_count(2 * FRAMES as u32);
            Some(d.create_query_pool(&info, None).map_err(|e| vk_error("vkCreateQueryPool", e))?)
        } else {
            None
        };
        let markers = match phys.timestamp_bits {
            0 => None,
            bits => Some(Markers::new(d, bits, phys.limits.timestamp_period)?),
        };
        let dummy = alloc.alloc(d, 16)?;
        let first_batch = std::env::var(FIRST_BATCH_ENV)
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .map_or(FIRST_BATCH, |n| n.clamp(1, SETS_PER_BATCH));
        Ok(State {
            alloc,
            pipelines,
            cmd_pool,
            frames,
            cur: 0,
            param_align: align.max(16),
            staging: None,
            recording: false,
            dummy,
            max_range: phys.limits.max_storage_buffer_range as u64,
            mem_props,
            dispatches: 0,
            pending_reads: Vec::new(),
            pending_writes: Vec::new(),
            barrier_every_dispatch: std::env::var(BARRIERS_ENV).is_ok_and(|v| v == "all"),
            barriers: 0,
            submits: 0,
            batch_limit: first_batch,
            first_batch,
            timestamps,
            timestamp_mask: if phys.timestamp_bits >= 64 { u64::MAX } else { (1u64 << phys.timestamp_bits) - 1 },
            timestamp_period_ns: phys.limits.timestamp_period as f64,
            gpu_ns: 0.0,
            markers,
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn raw(&self) -> &ash::Device {
        &self.device
    }

    /// Check `bytes` at `offset` lie inside `buffer`; returns its allocation.
    fn checked(
        &self,
        st: &State,
        buffer: BufferId,
        offset: usize,
        bytes: usize,
        what: &str,
    ) -> Result<crate::memory::Allocation> {
        let a = st.alloc.get(buffer)?;
        if offset.checked_add(bytes).is_none_or(|end| end as u64 > a.size) {
            return Err(Error::InvalidArgument(format!(
                "vulkan: {what} of {bytes} bytes at offset {offset} overflows buffer {} ({} bytes)",
                buffer.0, a.size
            )));
        }
        Ok(a)
    }

    fn staging<'a>(&self, st: &'a mut State) -> Result<&'a HostBuffer> {
        if st.staging.is_none() {
            st.staging = Some(HostBuffer::new(
                &self.device,
                &st.mem_props,
                STAGING_BYTES,
                vk::MemoryPropertyFlags::HOST_CACHED,
            )?);
        }
        Ok(st.staging.as_ref().expect("just created"))
    }
}

impl State {
    /// The command buffer being recorded.
    pub(crate) fn cmd(&self) -> vk::CommandBuffer {
        self.frames[self.cur].cmd
    }

    pub(crate) fn begin(&mut self, d: &ash::Device) -> Result<()> {
        if !self.recording {
            let (cmd, q) = (self.cmd(), 2 * self.cur as u32);
            // SAFETY: the frame's command buffer is not pending (its last submit was waited for).
            unsafe {
                d.reset_command_buffer(cmd, vk::CommandBufferResetFlags::empty())
                    .and_then(|_| {
                        d.begin_command_buffer(
                            cmd,
                            &vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
                        )
                    })
                    .map_err(|e| vk_error("vkBeginCommandBuffer", e))?;
                if let Some(pool) = self.timestamps {
                    d.cmd_reset_query_pool(cmd, pool, q, 2);
                    d.cmd_write_timestamp(cmd, vk::PipelineStageFlags::TOP_OF_PIPE, pool, q);
                }
            }
            self.recording = true;
            // The other frame's batch may still run: order this one's work after it.
            self.barrier_device(d);
        }
        Ok(())
    }

    /// A barrier after everything recorded so far: nothing is pending after it.
    fn barrier(&mut self, d: &ash::Device, dst_stage: vk::PipelineStageFlags, dst_access: vk::AccessFlags) {
        self.pending_reads.clear();
        self.pending_writes.clear();
        self.barriers += 1;
        let b = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(dst_access)];
        // SAFETY: recording.
        unsafe {
            d.cmd_pipeline_barrier(
                self.cmd(),
                vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
                dst_stage,
                vk::DependencyFlags::empty(),
                &b,
                &[],
                &[],
            )
        }
    }

    fn barrier_device(&mut self, d: &ash::Device) {
        self.barrier(
            d,
            vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
            vk::AccessFlags::SHADER_READ
                | vk::AccessFlags::SHADER_WRITE
                | vk::AccessFlags::TRANSFER_READ
                | vk::AccessFlags::TRANSFER_WRITE,
        );
    }

    /// Submit what is recorded, without waiting.
    fn submit(&mut self, d: &ash::Device, queue: vk::Queue) -> Result<()> {
        if !self.recording {
            return Ok(());
        }
        self.barrier(d, vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ);
        let (cmd, q) = (self.cmd(), 2 * self.cur as u32);
        if let Some(pool) = self.timestamps {
            // SAFETY: recording; the query was reset at the start of this command buffer.
            unsafe { d.cmd_write_timestamp(cmd, vk::PipelineStageFlags::BOTTOM_OF_PIPE, pool, q + 1) };
        }
        self.recording = false;
        let cmds = [cmd];
        let submit = [vk::SubmitInfo::default().command_buffers(&cmds)];
        let frame = &mut self.frames[self.cur];
        // SAFETY: the command buffer is fully recorded; the frame's fence is unsignalled.
        unsafe {
            d.end_command_buffer(cmd).map_err(|e| vk_error("vkEndCommandBuffer", e))?;
            d.queue_submit(queue, &submit, frame.fence).map_err(|e| vk_error("vkQueueSubmit", e))?;
        }
        frame.in_flight = true;
        self.submits += 1;
        Ok(())
    }

    /// Wait for frame `i`'s batch if it is in flight, add its device time, and make its descriptor pool and
    /// parameter ring reusable.
    fn retire(&mut self, d: &ash::Device, i: usize) -> Result<()> {
        let frame = &mut self.frames[i];
        if frame.in_flight {
            // SAFETY: the fence belongs to the frame's last submit.
            unsafe {
                let waited = d.wait_for_fences(&[frame.fence], true, u64::MAX);
                let reset = d.reset_fences(&[frame.fence]);
                frame.in_flight = false;
                waited.map_err(|e| vk_error("waiting for the queue", e))?;
                reset.map_err(|e| vk_error("vkResetFences", e))?;
            }
            if let Some(pool) = self.timestamps {
                let mut t = [0u64; 2];
                // SAFETY: both queries were written by the completed batch.
                if unsafe { d.get_query_pool_results(pool, 2 * i as u32, &mut t, vk::QueryResultFlags::TYPE_64) }
                    .is_ok()
                {
                    let ticks =
                        (t[1] & self.timestamp_mask).wrapping_sub(t[0] & self.timestamp_mask) & self.timestamp_mask;
                    self.gpu_ns += ticks as f64 * self.timestamp_period_ns;
                }
            }
        }
        let frame = &mut self.frames[i];
        if frame.sets > 0 {
            // SAFETY: nothing pending uses the frame's descriptor sets.
            unsafe { d.reset_descriptor_pool(frame.desc_pool, vk::DescriptorPoolResetFlags::empty()) }
                .map_err(|e| vk_error("vkResetDescriptorPool", e))?;
        }
        frame.sets = 0;
        frame.params_used = 0;
        Ok(())
    }

    /// Submit what is recorded and wait for everything submitted.
    pub fn flush(&mut self, d: &ash::Device, queue: vk::Queue) -> Result<()> {
        self.submit(d, queue)?;
        for i in 0..FRAMES {
            self.retire(d, i)?;
        }
        self.batch_limit = self.first_batch;
        // Nothing is pending: retired blocks are no longer used.
        self.alloc.release_retired(d);
        Ok(())
    }

    /// Bind the buffer range a view touches. The whole buffer is bound when it fits `maxStorageBufferRange`;
    /// otherwise only the view's span (from an aligned start), which must itself fit.
    pub fn bind(&self, t: &TensorDesc) -> Result<Bound> {
        let a = self.alloc.get(t.buffer)?;
        let es = t.dtype.size_in_bytes() as u64;
        let span = t.byte_span();
        if span.end as u64 > a.size {
            return Err(Error::InvalidArgument(format!(
                "vulkan: tensor view {:?} ({}) overflows buffer {} of {} bytes",
                t.layout, t.dtype, t.buffer.0, a.size
            )));
        }
        let buffer = self.alloc.block(a.block).buffer;
        let span = Access {
            buffer,
            start: (a.offset + span.start as u64) / 16 * 16,
            end: (a.offset + span.end as u64).div_ceil(16) * 16,
        };
        if a.size <= self.max_range {
            let elem_offset = u32::try_from(t.layout.offset)
                .map_err(|_| Error::InvalidArgument("vulkan: tensor offset beyond 2^32 elements".into()))?;
            return Ok(Bound {
                info: vk::DescriptorBufferInfo { buffer, offset: a.offset, range: a.size },
                elem_offset,
                span,
            });
        }
        let align = self.param_align.max(es);
        let start = (t.byte_span().start as u64 / align) * align;
        let end = (t.byte_span().end as u64).div_ceil(4) * 4;
        let range = end - start;
        if range > self.max_range {
            return Err(Error::Unsupported {
                backend: "vulkan".into(),
                op: "binding".into(),
                detail: format!(
                    "a tensor view spanning {range} bytes exceeds maxStorageBufferRange ({} bytes)",
                    self.max_range
                ),
            });
        }
        Ok(Bound {
            info: vk::DescriptorBufferInfo { buffer, offset: a.offset + start, range },
            elem_offset: (t.layout.offset as u64 - start / es) as u32,
            span,
        })
    }

    /// Record one dispatch of `kernel` with parameter words `params` and tensors `bound` (binding, tensor; binding
    /// 1 is the output, written, the others are read). A barrier goes first where the dispatch reads bytes that a
    /// pending dispatch writes, or writes bytes that one reads or writes.
    pub fn dispatch(
        &mut self,
        d: &ash::Device,
        queue: vk::Queue,
        kernel: Kernel,
        params: &[u32],
        bound: &[(u32, Bound)],
        groups: [u32; 3],
    ) -> Result<()> {
        let pbytes = (params.len() * 4) as u64;
        let f = &self.frames[self.cur];
        if f.sets >= self.batch_limit || f.params_used + pbytes > f.params.size {
            self.batch_limit = (2 * self.batch_limit).min(SETS_PER_BATCH);
            if self.alloc.retired_bytes() > RETIRED_FLUSH_BYTES {
                // Freed dedicated blocks are only destroyed once the queue is idle: wait now and then, so that
                // a long sequence of large temporaries (the VAE's activations) does not pile up.
                self.flush(d, queue)?;
            } else {
                // Submit this batch and go on in the other frame once its previous batch has finished.
                self.submit(d, queue)?;
                self.cur = (self.cur + 1) % FRAMES;
                self.retire(d, self.cur)?;
            }
        }
        let pipeline = self.pipelines.get(d, kernel)?;
        self.begin(d)?;
        let align = self.param_align;
        let frame = &mut self.frames[self.cur];
        let poff = frame.params_used;
        // SAFETY: the ring region [poff, poff + pbytes) is inside the mapping and not used by pending work.
        unsafe {
            std::ptr::copy_nonoverlapping(
                params.as_ptr().cast::<u8>(),
                frame.params.ptr.add(poff as usize),
                pbytes as usize,
            )
        };
        frame.params_used = (poff + pbytes).div_ceil(align) * align;
        let (params_buffer, desc_pool, cmd) = (frame.params.buffer, frame.desc_pool, frame.cmd);
        let dummy = self.alloc.get(self.dummy)?;
        let dummy = vk::DescriptorBufferInfo {
            buffer: self.alloc.block(dummy.block).buffer,
            offset: dummy.offset,
            range: dummy.size,
        };
        let mut infos = [dummy; BINDINGS as usize];
        infos[0] = vk::DescriptorBufferInfo { buffer: params_buffer, offset: poff, range: pbytes };
        for &(b, t) in bound {
            infos[b as usize] = t.info;
        }
        let writes = |a: &Access| self.pending_writes.iter().any(|w| w.overlaps(a));
        let hazard = bound
            .iter()
            .any(|(b, t)| writes(&t.span) || (*b == 1 && self.pending_reads.iter().any(|r| r.overlaps(&t.span))));
        if hazard || self.barrier_every_dispatch {
            self.barrier_device(d);
        }
        let layouts = [self.pipelines.set_layout];
        // SAFETY: the pool has room (checked above); the set is written before use and freed by the pool reset.
        unsafe {
            let set = d
                .allocate_descriptor_sets(
                    &vk::DescriptorSetAllocateInfo::default().descriptor_pool(desc_pool).set_layouts(&layouts),
                )
                .map_err(|e| vk_error("vkAllocateDescriptorSets", e))?[0];
            let writes: Vec<vk::WriteDescriptorSet> = (0..BINDINGS as usize)
                .map(|b| {
                    vk::WriteDescriptorSet::default()
                        .dst_set(set)
                        .dst_binding(b as u32)
                        .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                        .buffer_info(std::slice::from_ref(&infos[b]))
                })
                .collect();
            d.update_descriptor_sets(&writes, &[]);
            d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, pipeline);
            d.cmd_bind_descriptor_sets(cmd, vk::PipelineBindPoint::COMPUTE, self.pipelines.layout, 0, &[set], &[]);
            d.cmd_dispatch(cmd, groups[0], groups[1], groups[2]);
        }
        for &(b, t) in bound {
            if b == 1 {
                self.pending_writes.push(t.span);
            } else {
                self.pending_reads.push(t.span);
            }
        }
        self.frames[self.cur].sets += 1;
        self.dispatches += 1;
        Ok(())
    }
}

impl Device for VulkanDevice {
    fn info(&self) -> DeviceInfo {
        self.phys.info()
    }

    fn alloc(&self, bytes: usize) -> Result<BufferId> {
        self.lock().alloc.alloc(&self.device, bytes)
    }

    fn free(&self, buffer: BufferId) {
        // Safe while queued work still uses it: a later dispatch that writes its bytes gets a barrier first (the
        // pending reads), and dedicated blocks are only destroyed after the next wait.
        self.lock().alloc.free(buffer)
    }

    fn upload(&self, buffer: BufferId, offset: usize, data: &[u8]) -> Result<()> {
        let mut st = self.lock();
        let a = self.checked(&st, buffer, offset, data.len(), "upload")?;
        st.flush(&self.device, self.queue)?;
        if let Some(base) = st.alloc.block(a.block).mapped {
            // SAFETY: in bounds (checked) and the queue is idle.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(a.offset as usize + offset), data.len()) };
            return Ok(());
        }
        let dst = st.alloc.block(a.block).buffer;
        for (i, chunk) in data.chunks(STAGING_BYTES as usize).enumerate() {
            let staging = self.staging(&mut st)?;
            let (sbuf, sptr) = (staging.buffer, staging.ptr);
            // SAFETY: the staging buffer is idle and large enough for a chunk.
            unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), sptr, chunk.len()) };
            st.begin(&self.device)?;
            let region = vk::BufferCopy {
                src_offset: 0,
                dst_offset: a.offset + (offset + i * STAGING_BYTES as usize) as u64,
                size: chunk.len() as u64,
            };
            // SAFETY: recording; both ranges are in bounds.
            unsafe { self.device.cmd_copy_buffer(st.cmd(), sbuf, dst, &[region]) };
            st.flush(&self.device, self.queue)?;
        }
        Ok(())
    }

    fn download(&self, buffer: BufferId, offset: usize, out: &mut [u8]) -> Result<()> {
        let mut st = self.lock();
        let a = self.checked(&st, buffer, offset, out.len(), "download")?;
        st.flush(&self.device, self.queue)?;
        if let Some(base) = st.alloc.block(a.block).mapped {
            // SAFETY: in bounds (checked) and the queue is idle.
            unsafe { std::ptr::copy_nonoverlapping(base.add(a.offset as usize + offset), out.as_mut_ptr(), out.len()) };
            return Ok(());
        }
        let src = st.alloc.block(a.block).buffer;
        for (i, chunk) in out.chunks_mut(STAGING_BYTES as usize).enumerate() {
            let sbuf = self.staging(&mut st)?.buffer;
            st.begin(&self.device)?;
            let region = vk::BufferCopy {
                src_offset: a.offset + (offset + i * STAGING_BYTES as usize) as u64,
                dst_offset: 0,
                size: chunk.len() as u64,
            };
            // SAFETY: recording; both ranges are in bounds.
            unsafe { self.device.cmd_copy_buffer(st.cmd(), src, sbuf, &[region]) };
            st.flush(&self.device, self.queue)?;
            let sptr = self.staging(&mut st)?.ptr;
            // SAFETY: the copy finished (flush waited).
            unsafe { std::ptr::copy_nonoverlapping(sptr, chunk.as_mut_ptr(), chunk.len()) };
        }
        Ok(())
    }

    fn copy_buffer(&self, src: BufferId, so: usize, dst: BufferId, d_o: usize, bytes: usize) -> Result<()> {
        let mut st = self.lock();
        let sa = self.checked(&st, src, so, bytes, "copy (source)")?;
        let da = self.checked(&st, dst, d_o, bytes, "copy (destination)")?;
        if bytes == 0 {
            return Ok(());
        }
        st.begin(&self.device)?;
        // The copy is not tracked: order it after every pending dispatch.
        if !(st.pending_reads.is_empty() && st.pending_writes.is_empty()) {
            st.barrier_device(&self.device);
        }
        let region = vk::BufferCopy {
            src_offset: sa.offset + so as u64,
            dst_offset: da.offset + d_o as u64,
            size: bytes as u64,
        };
        let (sb, db) = (st.alloc.block(sa.block).buffer, st.alloc.block(da.block).buffer);
        // SAFETY: recording; both ranges are in bounds.
        unsafe { self.device.cmd_copy_buffer(st.cmd(), sb, db, &[region]) };
        st.barrier_device(&self.device);
        Ok(())
    }

    fn supports(&self, call: &OpCall) -> bool {
        ops::supports(call, self.coop.is_some())
            && ops::bindable(call, self.phys.limits.max_storage_buffer_range as u64)
    }

    fn execute(&self, call: &OpCall) -> Result<()> {
        ops::execute(self, call)
    }

    fn synchronize(&self) -> Result<()> {
        self.lock().flush(&self.device, self.queue)
    }

    fn record_marker(&self) -> Result<Option<MarkerId>> {
        let mut st = self.lock();
        if st.markers.is_none() {
            return Ok(None);
        }
        st.begin(&self.device)?;
        let cmd = st.cmd();
        let markers = st.markers.as_mut().expect("checked above");
        markers.record(&self.device, cmd).map(Some)
    }

    fn marker_elapsed(&self, start: MarkerId, end: MarkerId) -> Result<f64> {
        let mut st = self.lock();
        // Markers still in the open command buffer are submitted first (the flush waits for the queue).
        st.flush(&self.device, self.queue)?;
        match &st.markers {
            Some(m) => m.elapsed(&self.device, start, end),
            None => Err(Error::InvalidArgument("vulkan: this device records no timing markers".into())),
        }
    }

    fn release_marker(&self, marker: MarkerId) {
        if let Some(m) = self.lock().markers.as_mut() {
            m.release(marker);
        }
    }

    fn stats(&self) -> Vec<String> {
        let st = self.lock();
        vec![
            format!("vulkan.bytes_in_use={}", st.alloc.bytes_in_use),
            format!("vulkan.bytes_reserved={}", st.alloc.bytes_reserved),
            format!("vulkan.memory_blocks={}", st.alloc.block_count()),
            format!("vulkan.retired_bytes={}", st.alloc.retired_bytes()),
            format!("vulkan.host_visible_memory={}", st.alloc.host_visible),
            format!("vulkan.pipelines_created={}", st.pipelines.created),
            match self.coop {
                Some(k) => format!(
                    "vulkan.cooperative_matrix={}x{}x{} (f16 matmul and attention){}{}",
                    k.shape.0,
                    k.shape.1,
                    k.shape.2,
                    if k.cm2 { ", attention on workgroup scope (VK_NV_cooperative_matrix2)" } else { "" },
                    if k.khr { ", matmul in the KHR form" } else { "" }
                ),
                None => "vulkan.cooperative_matrix=off (scalar shaders)".to_string(),
            },
            format!("vulkan.dispatches={}", st.dispatches),
            format!("vulkan.barriers={}", st.barriers),
            format!("vulkan.markers_live={}", st.markers.as_ref().map_or(0, |m| m.live())),
            format!("vulkan.submits={}", st.submits),
            match st.timestamps {
                Some(_) => format!("vulkan.gpu_time_ms={:.3}", st.gpu_ns / 1e6),
                None => "vulkan.gpu_time_ms=unavailable (no timestamp queries on the compute queue)".to_string(),
            },
        ]
    }
}

impl VulkanDevice {
    pub(crate) fn queue(&self) -> vk::Queue {
        self.queue
    }
}

impl Drop for VulkanDevice {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let d = &self.device;
        // SAFETY: waiting for idle first; then every object of this device is destroyed exactly once.
        unsafe {
            let _ = st.flush(d, self.queue);
            let _ = d.device_wait_idle();
            st.alloc.destroy_all(d);
            st.pipelines.destroy(d);
            for f in &st.frames {
                f.params.destroy(d);
                d.destroy_descriptor_pool(f.desc_pool, None);
                d.destroy_fence(f.fence, None);
            }
            if let Some(s) = st.staging.take() {
                s.destroy(d);
            }
            if let Some(pool) = st.timestamps {
                d.destroy_query_pool(pool, None);
            }
            if let Some(m) = st.markers.take() {
                m.destroy(d);
            }
            d.destroy_command_pool(st.cmd_pool, None);
            d.destroy_device(None);
        }
    }
}
