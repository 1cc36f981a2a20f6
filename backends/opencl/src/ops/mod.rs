//! Op dispatch: which calls the device takes, and the launch of each op's kernels.

mod args;
mod attention;
mod attention_matmul;
mod elementwise;
mod gemm;
mod reduce;

use crate::device::{Exec, OpenClDevice};
use crate::{cl_error, kernels};
use ocl::core::{self, Event, Kernel, Mem};
use sd3_core::reference::validate;
use sd3_core::{DType, Op, OpCall, Result, TensorDesc};
use std::sync::MutexGuard;

/// Largest head dims the attention kernel is built for (each work-item holds a q row and an output row).
pub const MAX_HEAD_DIM: usize = 256;

/// Whether the device runs `call`: a well-formed call whose element counts and buffer offsets fit the kernels'
/// 32-bit logical indices, and whose op-specific limits hold.
pub fn supports(dev: &OpenClDevice, call: &OpCall) -> bool {
    if validate(call).is_err() {
        return false;
    }
    let operands = call.inputs.iter().chain(call.outputs);
    if operands.clone().any(|t| t.elem_count() > u32::MAX as usize || t.rank() > sd3_core::MAX_RANK) {
        return false;
    }
    let floats = |ts: &[TensorDesc]| ts.iter().all(|t| t.dtype.is_float());
    match call.op {
        Op::Copy | Op::Fill { .. } => true,
        Op::Gather => call.inputs[0].rank() == 2 && call.inputs[1].rank() == 1 && call.outputs[0].rank() == 2,
        Op::UpsampleNearest2d { factor } => {
            factor > 0 && call.inputs[0].rank() == 4 && call.outputs[0].rank() == 4 && floats(call.inputs)
        }
        // Activation epilogues are declined: the core runs the matmul and a unary op.
        Op::Matmul { .. } => dev.tuning.gemm_ok(&dev.cl) && call.outputs[0].rank() >= 2,
        // Not fused here: the core runs the matmul and the gated residual.
        Op::MatmulGatedResidual { .. } => false,
        // No kernel: the training code runs its products as separate ops.
        Op::AttentionBackward { .. } => false,
        Op::Conv2d { .. } => dev.tuning.gemm_ok(&dev.cl) && call.inputs[0].rank() == 4 && call.inputs[1].rank() == 4,
        Op::Attention { .. } => {
            let ok_rank = call.inputs[..3].iter().all(|t| t.rank() == 4);
            let fused = call.inputs[0].shape()[3] <= MAX_HEAD_DIM && call.inputs[2].shape()[3] <= MAX_HEAD_DIM;
            // Wider heads run as matmuls and a softmax (attention_matmul.rs), which needs the GEMM kernel.
            ok_rank && (fused || (attention_matmul::applies(&call.op) && dev.tuning.gemm_ok(&dev.cl)))
        }
        _ => true,
    }
}

pub fn execute(dev: &OpenClDevice, call: &OpCall) -> Result<()> {
    validate(call)?;
    if call.outputs[0].elem_count() == 0 {
        return Ok(());
    }
    let mut cx = Ctx { dev, exec: dev.lock_exec() };
    match call.op {
        Op::Copy => elementwise::copy(&mut cx, &call.inputs[0], &call.outputs[0]),
        Op::Fill { value } => elementwise::fill(&mut cx, value, &call.outputs[0]),
        Op::UpsampleNearest2d { factor } => elementwise::upsample(&mut cx, factor, &call.inputs[0], &call.outputs[0]),
        Op::Gather => elementwise::gather(&mut cx, call),
        Op::Unary(_) | Op::Binary(_) | Op::Affine { .. } | Op::Modulate | Op::GatedResidual => {
            elementwise::map(&mut cx, call)
        }
        Op::Softmax
        | Op::LayerNorm { .. }
        | Op::RmsNorm { .. }
        | Op::LayerNormModulate { .. }
        | Op::GroupNorm { .. } => reduce::run(&mut cx, call),
        Op::Matmul { bias, act } => gemm::matmul(&mut cx, call, bias, act),
        Op::MatmulGatedResidual { .. } | Op::AttentionBackward { .. } => Err(sd3_core::Error::Unsupported {
            backend: "opencl".into(),
            op: call.op.name(),
            detail: "declined in supports()".into(),
        }),
        Op::Conv2d { stride, padding, bias } => gemm::conv2d(&mut cx, call, stride, padding, bias),
        Op::Attention { .. } => attention::run(&mut cx, call),
    }
}

/// One op's launch context: the device and exclusive use of its kernel objects.
pub(crate) struct Ctx<'a> {
    pub dev: &'a OpenClDevice,
    pub exec: MutexGuard<'a, Exec>,
}

impl Ctx<'_> {
    /// Kernel `name` of a program, with `options` appended to the device's build options.
    pub fn kernel(&mut self, program: kernels::ProgramKind, name: &'static str, extra_options: &str) -> Result<Kernel> {
        let source = kernels::source(program);
        let options = format!("{} {extra_options}", kernels::base_options(&self.dev.tuning));
        let p = self.dev.program(program.name(), &source, options.trim())?;
        self.exec.kernel(&p, name)
    }

    /// Whether the tensor-core kernels may be used: the device has them, `SD3_OPENCL_MMA` is not `0`, and none
    /// failed to build here.
    pub fn mma_enabled(&self) -> bool {
        self.dev.cl.tensor_cores
            && std::env::var("SD3_OPENCL_MMA").map_or(true, |v| v != "0")
            && self.dev.mma_failure.lock().unwrap().is_none()
    }

    /// Whether f16 operands may use f16 arithmetic in the elementwise ops that allow it (elementwise_half.cl):
    /// [`half_math_wanted`], and its program did not fail to build here.
    pub fn half_math_enabled(&self) -> bool {
        half_math_wanted(&self.dev.cl) && self.dev.half_math_failure.lock().unwrap().is_none()
    }

    /// Record that the f16-arithmetic program failed to build: from now on f32 arithmetic runs everything.
    pub fn half_math_failed(&self, e: sd3_core::Error) {
        *self.dev.half_math_failure.lock().unwrap() = Some(e.to_string());
    }

    /// Record that a tensor-core kernel failed to build: from now on the SIMT kernels run everything.
    pub fn mma_failed(&self, e: sd3_core::Error) {
        *self.dev.mma_failure.lock().unwrap() = Some(e.to_string());
    }

    pub fn mem(&self, t: &TensorDesc) -> Result<Mem> {
        Ok(self.dev.memory.get(t.buffer)?.0)
    }

    /// Enqueue `kernel` over `global` work-items (rounded up to whole `local` groups).
    pub fn launch(&self, kernel: &Kernel, global: [usize; 3], local: [usize; 3]) -> Result<()> {
        let dims = if global[2] > 1 || local[2] > 1 {
            3
        } else if global[1] > 1 || local[1] > 1 {
            2
        } else {
            1
        };
        let gws = [0, 1, 2].map(|i| global[i].div_ceil(local[i]) * local[i]);
        if gws.contains(&0) {
            return Ok(());
        }
        unsafe {
            core::enqueue_kernel(
                &self.dev.queue,
                kernel,
                dims,
                None,
                &gws,
                Some(local),
                None::<&Event>,
                None::<&mut Event>,
            )
        }
        .map_err(|e| cl_error("clEnqueueNDRangeKernel", e))
    }
}

/// f16 arithmetic where the device's compiler takes it ([`ClDevice::half_math_capable`]); `SD3_OPENCL_HALF_MATH`
/// `0` turns it off, `1` forces it on (to test the kernel on a device that does not claim it).
pub fn half_math_wanted(cl: &crate::platform::ClDevice) -> bool {
    match std::env::var("SD3_OPENCL_HALF_MATH").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => cl.half_math_capable(),
    }
}

/// Whether the dtype is one of the integer types.
pub fn is_int(d: DType) -> bool {
    matches!(d, DType::I32 | DType::I64 | DType::U8)
}
