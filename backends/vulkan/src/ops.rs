//! Which calls the Vulkan device runs (`supports`) and how each becomes a dispatch (`execute`): the parameter
//! words each shader reads (layouts documented at the top of each `shaders/*.comp`) and its buffer bindings.

use crate::device::{Bound, VulkanDevice};
use crate::pipelines::Kernel;
use sd3_core::{DType, Error, Layout, Op, OpCall, Result, TensorDesc, UnaryOp};

const PARAM_WORDS: usize = 72;
/// Grid-stride shaders launch at most this many workgroups along x (the guaranteed minimum of the limit).
const MAX_GROUPS: u32 = 65535;
/// Head dims the attention shaders hold in registers and shared memory (`MAXD` in attention.comp and
/// attention128.comp), and their query rows per workgroup (`WG`).
const ATTN_MAX_D: usize = 128;
const ATTN_SMALL_D: usize = 64;
/// Rows of a the matvec shader takes (`MAXM` in matvec.comp).
const MATVEC_MAX_M: usize = 8;
/// Elements of a group one group-norm workgroup reduces (`group_norm.comp`).
const GN_CHUNK: usize = 8192;

fn is_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16)
}

/// Every element index the shaders compute must fit 32 bits (i64 elements take two words).
fn indexable(t: &TensorDesc) -> bool {
    let words_per = if t.dtype == DType::I64 { 2 } else { 1 };
    t.rank() <= 8
        && (t.layout.span_end() as u64) * words_per < (1u64 << 32)
        && t.strides().iter().all(|&s| s < (1 << 31))
}

/// Whether every view of the call fits one storage-buffer binding (`maxStorageBufferRange`, with room for the
/// aligned start `State::bind` may add). Devices with a small limit (lavapipe: 128 MiB) leave calls on larger
/// views to the core, which runs them on the host (counted as fallbacks; `--strict` makes that an error).
pub fn bindable(call: &OpCall, max_range: u64) -> bool {
    let scratch_fits = !crate::attention_wide::is_wide(call) || {
        let (s, p) = crate::attention_wide::scratch_bytes(call);
        s.max(p) + 256 <= max_range
    };
    scratch_fits && call.inputs.iter().chain(call.outputs).all(|t| t.byte_span().len() as u64 + 256 <= max_range)
}

/// Whether this backend runs `call`; `coop` is whether the device has the cooperative-matrix kernels.
pub fn supports(call: &OpCall, coop: bool) -> bool {
    let all = || call.inputs.iter().chain(call.outputs);
    if call.outputs.len() != 1 || call.inputs.len() != call.op.n_inputs() || !all().all(indexable) {
        return false;
    }
    let y = &call.outputs[0];
    let floats = all().all(|t| is_float(t.dtype));
    let rank = y.rank();
    match call.op {
        Op::Gather => {
            let (table, ids) = (&call.inputs[0], &call.inputs[1]);
            is_float(table.dtype)
                && is_float(y.dtype)
                && matches!(ids.dtype, DType::I32 | DType::I64)
                && table.rank() == 2
                && ids.rank() == 1
                && rank == 2
        }
        // The cooperative kernels' only activation epilogue is the MM-DiT's GELU (tanh form): f16 products on such
        // a device decline the others, and the core runs the matmul and a unary op. matmul.comp and matvec.comp
        // apply any activation before the store.
        Op::Matmul { act: Some(a), .. }
            if coop && a != UnaryOp::GeluTanh && call.inputs[..2].iter().all(|t| t.dtype == DType::F16) =>
        {
            false
        }
        // Only where the whole-tile cooperative shader runs it (its epilogue has the residual), and only with
        // `SD3_VULKAN_FUSED_RESIDUAL=1` until that epilogue has run on a GPU; elsewhere the core runs the matmul and
        // a gated residual.
        Op::MatmulGatedResidual { .. } => coop && fused_residual_enabled() && gated_residual_whole_tiles(call),
        // No kernel yet: the training code runs its products as separate ops.
        Op::AttentionBackward { .. } => false,
        Op::Matmul { .. } => {
            let tiles = |n: usize| n.div_ceil(64) <= MAX_GROUPS as usize;
            floats
                && (2..=8).contains(&rank)
                && call.inputs[..2].iter().all(|t| t.rank() == rank)
                && tiles(y.shape()[rank - 2])
                && tiles(y.shape()[rank - 1])
                && y.shape()[..rank - 2].iter().product::<usize>() <= MAX_GROUPS as usize
        }
        Op::Attention { .. } => {
            let q = &call.inputs[0];
            let v = &call.inputs[2];
            floats
                && rank == 4
                && call.inputs[..3].iter().all(|t| t.rank() == 4)
                && ((q.shape()[3] <= ATTN_MAX_D && v.shape()[3] <= ATTN_MAX_D)
                    || crate::attention_wide::supported(call))
                && q.shape()[0] * q.shape()[1] <= MAX_GROUPS as usize
                && q.shape()[2].div_ceil(32) <= MAX_GROUPS as usize
        }
        Op::Conv2d { .. } => floats && rank == 4 && call.inputs[..2].iter().all(|t| t.rank() == 4),
        Op::GroupNorm { groups, .. } => {
            floats && (2..=8).contains(&rank) && groups > 0 && y.shape()[1].is_multiple_of(groups)
        }
        Op::UpsampleNearest2d { factor } => floats && rank == 4 && call.inputs[0].rank() == 4 && factor > 0,
        Op::Softmax | Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::LayerNormModulate { .. } => {
            floats && rank >= 1 && call.inputs.iter().all(|t| t.rank() >= 1 && t.rank() <= rank)
        }
        // Copies and fills take every dtype (same-dtype copies are bit exact; casts go through f32).
        Op::Copy | Op::Fill { .. } => call.inputs.iter().all(|t| t.rank() == rank),
        Op::Unary(_) | Op::Binary(_) | Op::Affine { .. } | Op::Modulate | Op::GatedResidual => {
            floats && call.inputs.iter().all(|t| t.rank() == rank)
        }
    }
}

/// `SD3_VULKAN_FUSED_RESIDUAL=1`: take `Op::MatmulGatedResidual` on the whole-tile cooperative shader. Off by
/// default: the shader's epilogue compiles and the op passes on every other path, but it has not run on a GPU yet.
pub const FUSED_RESIDUAL_ENV: &str = "SD3_VULKAN_FUSED_RESIDUAL";

fn fused_residual_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(FUSED_RESIDUAL_ENV).is_ok_and(|v| v == "1"))
}

/// Whether the f16 operands of a matmul-shaped call suit the whole-tile cooperative shader: K in whole steps, a and
/// b contiguous along K with 16-byte aligned rows, the given tensors (y, and x for the residual) with unit column
/// stride and 16-byte aligned rows.
fn whole_tile_operands(a: &TensorDesc, b: &TensorDesc, stored: &[&TensorDesc], a_offset: u32, b_offset: u32) -> bool {
    let rank = a.rank();
    let k = a.shape()[rank - 1];
    let aligned = |t: &TensorDesc, offset: u32, other: usize| {
        (offset as usize).is_multiple_of(8)
            && t.strides()[other].is_multiple_of(8)
            && t.strides()[..rank - 2].iter().all(|s| s.is_multiple_of(8))
    };
    [a, b].iter().chain(stored).all(|t| t.dtype == DType::F16 && t.rank() == rank)
        && k.is_multiple_of(crate::coop::TILES_K_STEP)
        && a.strides()[rank - 1] == 1
        && aligned(a, a_offset, rank - 2)
        && b.strides()[rank - 2] == 1
        && aligned(b, b_offset, rank - 1)
        && stored.iter().all(|t| t.strides()[rank - 1] == 1 && aligned(t, t.layout.offset as u32, rank - 2))
}

/// `Op::MatmulGatedResidual` on the whole-tile shader: f16 a, b, x, gate and y; the gate one row per batch
/// element (stride 0 along M), more rows than the matvec shader takes.
fn gated_residual_whole_tiles(call: &OpCall) -> bool {
    let (a, b, y) = (&call.inputs[0], &call.inputs[1], &call.outputs[0]);
    let n_in = call.inputs.len();
    let (x, gate) = (&call.inputs[n_in - 2], &call.inputs[n_in - 1]);
    let rank = y.rank();
    (2..=8).contains(&rank)
        && [x, gate].iter().all(|t| t.dtype == DType::F16 && t.rank() == rank)
        && gate.strides()[rank - 2] == 0
        && y.shape()[..rank - 2].iter().product::<usize>() <= MAX_GROUPS as usize
        && y.shape()[rank - 2] > MATVEC_MAX_M
        && whole_tile_operands(a, b, &[y, x], a.layout.offset as u32, b.layout.offset as u32)
}

/// Whether a 16-bit output can be stored two elements per word by one invocation (the shaders' pair mode): rows of
/// even length along a unit last stride, every row starting on a word (even offset and outer strides).
fn word_pairs(y: &TensorDesc, b: &Bound) -> bool {
    let rank = y.rank();
    matches!(y.dtype, DType::F16 | DType::BF16)
        && rank >= 1
        && y.shape()[rank - 1].is_multiple_of(2)
        && y.strides()[rank - 1] == 1
        && b.elem_offset.is_multiple_of(2)
        && (0..rank - 1).all(|d| y.shape()[d] == 1 || y.strides()[d].is_multiple_of(2))
}

/// Whether an elementwise call runs 8 elements per invocation as 16-byte vectors (the shader's vector mode): f32,
/// f16 or bf16 operands whose last dim is a multiple of 8 and contiguous, and whose every row starts 16 bytes
/// aligned in its binding (outer strides and offsets multiples of 8; zero strides broadcast an input).
fn vector_views(call: &OpCall, by: &Bound, bins: &[Bound]) -> bool {
    let y = &call.outputs[0];
    let rank = y.rank();
    !matches!(call.op, Op::UpsampleNearest2d { .. })
        && rank >= 1
        && y.shape()[rank - 1].is_multiple_of(8)
        && std::iter::once((y, by)).chain(call.inputs.iter().zip(bins)).enumerate().all(|(i, (t, b))| {
            let float = matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16) && t.shape() == y.shape();
            // An input broadcast along the last dim (stride 0) is read one element per 8.
            let row_broadcast = i > 0 && t.strides()[rank - 1] == 0;
            float
                && (row_broadcast
                    || (t.strides()[rank - 1] == 1
                        && (b.elem_offset as usize).is_multiple_of(8)
                        && t.strides()[..rank - 1].iter().all(|s| s.is_multiple_of(8))))
        })
}

/// Parameter words of one dispatch.
struct Params([u32; PARAM_WORDS]);

impl Params {
    fn new() -> Params {
        Params([0; PARAM_WORDS])
    }
    fn u(&mut self, i: usize, v: usize) {
        self.0[i] = v as u32;
    }
    fn f(&mut self, i: usize, v: f32) {
        self.0[i] = v.to_bits();
    }
    /// A view at `at`: offset, then the strides of dims `dims` of `t`.
    fn view(&mut self, at: usize, b: &Bound, t: &TensorDesc, dims: std::ops::Range<usize>) {
        self.0[at] = b.elem_offset;
        for (k, d) in dims.enumerate() {
            self.0[at + 1 + k] = t.strides()[d] as u32;
        }
    }
}

/// A 2-D grid of `groups` workgroups (x at most [`MAX_GROUPS`]); the shaders flatten it and grid-stride past it.
fn grid(groups: usize) -> [u32; 3] {
    let x = groups.clamp(1, MAX_GROUPS as usize);
    [x as u32, groups.div_ceil(x).clamp(1, MAX_GROUPS as usize) as u32, 1]
}

/// The grid of a kernel with one invocation per element (256 per workgroup).
fn groups_for(n: usize) -> [u32; 3] {
    grid(n.div_ceil(256))
}

/// The views of an elementwise call (inputs shaped like the output, broadcast by zero strides) with size-1 dims
/// dropped and adjacent dims merged wherever every operand steps through them as one (`stride[d] ==
/// stride[d+1] * shape[d+1]`): the shader's index arithmetic costs a division per dim, and a contiguous op becomes
/// rank 1 (no division). None when nothing merges or the shapes differ.
fn collapse(call: &OpCall) -> Option<Vec<TensorDesc>> {
    let y = &call.outputs[0];
    let all: Vec<&TensorDesc> = std::iter::once(y).chain(call.inputs).collect();
    if all.iter().any(|t| t.shape() != y.shape()) {
        return None;
    }
    // (size, stride of each operand) of the merged dims, innermost first.
    let mut dims: Vec<(usize, Vec<usize>)> = Vec::new();
    for d in (0..y.rank()).rev().filter(|&d| y.shape()[d] != 1) {
        let n = y.shape()[d];
        let strides: Vec<usize> = all.iter().map(|t| t.strides()[d]).collect();
        match dims.last_mut() {
            Some((m, s)) if s.iter().zip(&strides).all(|(inner, outer)| *outer == inner * *m) => *m *= n,
            _ => dims.push((n, strides)),
        }
    }
    if dims.is_empty() {
        dims.push((1, vec![1; all.len()]));
    }
    if dims.len() == y.rank() {
        return None;
    }
    dims.reverse();
    let shape: Vec<usize> = dims.iter().map(|d| d.0).collect();
    Some(
        all.iter()
            .enumerate()
            .map(|(k, t)| TensorDesc {
                buffer: t.buffer,
                dtype: t.dtype,
                layout: Layout {
                    shape: shape.clone(),
                    strides: dims.iter().map(|d| d.1[k]).collect(),
                    offset: t.layout.offset,
                },
            })
            .collect(),
    )
}

pub fn execute(dev: &VulkanDevice, call: &OpCall) -> Result<()> {
    if !supports(call, dev.coop.is_some()) {
        return Err(Error::Unsupported {
            backend: "vulkan".into(),
            op: call.op.name(),
            detail: "declined by supports()".into(),
        });
    }
    if crate::attention_wide::is_wide(call) {
        return crate::attention_wide::execute(dev, call);
    }
    if crate::conv_im2col::applies(dev, call) {
        return crate::conv_im2col::execute(dev, call);
    }
    let elementwise = matches!(
        call.op,
        Op::Copy
            | Op::Fill { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Affine { .. }
            | Op::Modulate
            | Op::GatedResidual
    );
    if elementwise {
        if let Some(views) = collapse(call) {
            let (y, inputs) = views.split_first().expect("the output comes first");
            return execute_one(dev, &OpCall { op: call.op, inputs, outputs: std::slice::from_ref(y) });
        }
    }
    execute_one(dev, call)
}

fn execute_one(dev: &VulkanDevice, call: &OpCall) -> Result<()> {
    if let Op::Gather = call.op {
        check_ids(dev, call)?;
    }
    let y = &call.outputs[0];
    if y.elem_count() == 0 {
        return Ok(());
    }
    let mut st = dev.lock();
    let by = st.bind(y)?;
    let bins: Vec<Bound> = call.inputs.iter().map(|t| st.bind(t)).collect::<Result<_>>()?;
    let mut p = Params::new();
    let mut bindings: Vec<(u32, Bound)> = vec![(1, by)];
    let dt = |t: &TensorDesc| t.dtype as usize;
    let mut scratch = None;
    let (kernel, groups) = match call.op {
        Op::Copy
        | Op::Fill { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Affine { .. }
        | Op::Modulate
        | Op::GatedResidual
        | Op::UpsampleNearest2d { .. } => {
            let (mode, sub) = match call.op {
                Op::Copy => (0, 0),
                Op::Fill { value } => {
                    p.f(16, value);
                    (1, 0)
                }
                Op::Unary(u) => (2, u as usize),
                Op::Binary(b) => (3, b as usize),
                Op::Affine { mul, add } => {
                    p.f(16, mul);
                    p.f(17, add);
                    (4, 0)
                }
                Op::Modulate => (5, 0),
                Op::GatedResidual => (6, 0),
                Op::UpsampleNearest2d { factor } => (7, factor),
                _ => unreachable!("matched above"),
            };
            let rank = y.rank();
            p.u(0, mode);
            p.u(1, sub);
            p.u(2, y.elem_count());
            p.u(3, rank);
            for (d, &n) in y.shape().iter().enumerate() {
                p.u(4 + d, n);
            }
            p.u(12, dt(y));
            p.u(18, word_pairs(y, &by) as usize);
            p.view(20, &by, y, 0..rank);
            for (k, (t, b)) in call.inputs.iter().zip(&bins).enumerate() {
                p.u(13 + k, dt(t));
                p.view(29 + 9 * k, b, t, 0..rank);
                bindings.push((2 + k as u32, *b));
            }
            let vector = vector_views(call, &by, &bins);
            p.u(19, vector as usize);
            let items = if vector {
                y.elem_count() / 8
            } else if word_pairs(y, &by) {
                y.elem_count() / 2
            } else {
                y.elem_count()
            };
            (Kernel::Elementwise, groups_for(items))
        }
        Op::Softmax | Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::LayerNormModulate { .. } => {
            let (mode, affine, eps) = match call.op {
                Op::Softmax => (0, false, 0.0),
                Op::LayerNorm { eps, affine } => (1, affine, eps),
                Op::RmsNorm { eps } => (2, false, eps),
                Op::LayerNormModulate { eps } => (3, false, eps),
                _ => unreachable!("matched above"),
            };
            let rank = y.rank();
            let d = y.shape()[rank - 1];
            let rows = y.elem_count() / d;
            p.u(0, mode);
            p.u(1, affine as usize);
            p.u(2, rows);
            p.u(3, d);
            p.u(4, rank - 1);
            for (k, &n) in y.shape()[..rank - 1].iter().enumerate() {
                p.u(5 + k, n);
            }
            p.u(18, word_pairs(y, &by) as usize);
            p.f(19, eps);
            let tensors: Vec<(&TensorDesc, &Bound)> =
                std::iter::once((y, &by)).chain(call.inputs.iter().zip(&bins)).collect();
            for (k, (t, b)) in tensors.iter().enumerate() {
                let at = 20 + 9 * k;
                p.u(13 + k, dt(t));
                p.0[at] = b.elem_offset;
                // Right-align the tensor's dims to the output's; missing outer dims broadcast (stride 0).
                let lead = rank - t.rank();
                for od in 0..rank - 1 {
                    p.u(at + 1 + od, if od >= lead { t.strides()[od - lead] } else { 0 });
                }
                p.u(at + 8, t.strides()[t.rank() - 1]);
                if k > 0 {
                    bindings.push((1 + k as u32, **b));
                }
            }
            // Layer norm (modulate) over f16 rows in registers: whole 16-byte vectors of every operand, at most
            // 8 per invocation of a subgroup (rows_vec8.comp's MAXV).
            let sg = dev.phys.subgroup_size as usize;
            let vec8 = matches!(mode, 1 | 3)
                && dev.phys.subgroup_arithmetic
                && sg > 0
                && d.is_multiple_of(8)
                && d <= 64 * sg
                && tensors.iter().all(|(t, b)| {
                    t.dtype == DType::F16
                        && t.strides()[t.rank() - 1] == 1
                        && (b.elem_offset as usize).is_multiple_of(8)
                        && t.strides()[..t.rank() - 1].iter().all(|s| s.is_multiple_of(8))
                });
            if vec8 {
                (Kernel::RowsVec8, grid(rows.div_ceil((256 / sg).max(1))))
            } else {
                (Kernel::Rows, grid(rows))
            }
        }
        Op::GroupNorm { groups, eps, affine } => {
            let (x, rank) = (&call.inputs[0], y.rank());
            let (n, c) = (y.shape()[0], y.shape()[1]);
            let spatial: usize = y.shape()[2..].iter().product();
            let chunks = ((c / groups) * spatial).div_ceil(GN_CHUNK).max(1);
            p.u(0, n * groups);
            p.u(1, groups);
            p.u(2, c / groups);
            p.u(3, spatial);
            p.u(4, rank - 2);
            for (k, &s) in y.shape()[2..].iter().enumerate() {
                p.u(5 + k, s);
            }
            p.u(11, dt(y));
            p.u(12, dt(x));
            p.u(15, affine as usize);
            p.f(16, eps);
            p.u(18, chunks);
            p.u(19, GN_CHUNK);
            p.view(20, &by, y, 0..rank);
            p.view(29, &bins[0], x, 0..rank);
            // Vector mode: contiguous f16 x and y with 16-byte aligned starts, 8 | spatial (8 elements of a channel
            // per invocation).
            let vec8 = [(x, &bins[0]), (y, &by)].iter().all(|(t, b)| {
                t.dtype == DType::F16
                    && t.strides() == sd3_core::layout::contiguous_strides(t.shape()).as_slice()
                    && b.elem_offset.is_multiple_of(8)
            }) && spatial.is_multiple_of(8);
            p.u(43, vec8 as usize);
            bindings.push((2, bins[0]));
            if affine {
                for k in 0..2 {
                    let t = &call.inputs[1 + k];
                    p.u(13 + k, dt(t));
                    p.view(38 + 2 * k, &bins[1 + k], t, t.rank() - 1..t.rank());
                    bindings.push((3 + k as u32, bins[1 + k]));
                }
            }
            // Per-chunk partial sums, then partial squared deviations, in a scratch buffer; the last pass
            // (below) normalises. The scratch is freed once recorded: later work is ordered after it.
            let elems = 2 * n * groups * chunks;
            let id = st.alloc.alloc(dev.raw(), elems * 4)?;
            scratch = Some(id);
            let sdesc = TensorDesc { buffer: id, dtype: DType::F32, layout: Layout::contiguous(&[elems]) };
            let sb = st.bind(&sdesc);
            let stats = sb.and_then(|sb| {
                p.0[42] = sb.elem_offset;
                for mode in 0..2 {
                    p.u(17, mode);
                    let b = [(1, sb), (2, bins[0])];
                    st.dispatch(dev.raw(), dev.queue(), Kernel::GroupNorm, &p.0, &b, grid(n * groups * chunks))?;
                }
                Ok(sb)
            });
            match stats {
                Ok(sb) => bindings.push((5, sb)),
                Err(e) => {
                    st.alloc.free(id);
                    return Err(e);
                }
            }
            p.u(17, 2);
            (Kernel::GroupNorm, grid(n * groups * chunks))
        }
        Op::Matmul { .. } | Op::MatmulGatedResidual { .. } => {
            let (bias, act, residual) = match call.op {
                Op::Matmul { bias, act } => (bias, act, false),
                Op::MatmulGatedResidual { bias } => (bias, None, true),
                _ => unreachable!(),
            };
            let (a, b, rank) = (&call.inputs[0], &call.inputs[1], y.rank());
            p.u(47, act.map_or(0, |u| u as usize + 1));
            let (m, n, k) = (y.shape()[rank - 2], y.shape()[rank - 1], a.shape()[rank - 1]);
            let batch: usize = y.shape()[..rank - 2].iter().product();
            p.u(0, m);
            p.u(1, n);
            p.u(2, k);
            p.u(3, batch);
            p.u(4, rank - 2);
            for (d, &s) in y.shape()[..rank - 2].iter().enumerate() {
                p.u(5 + d, s);
            }
            for (slot, (t, bd, at)) in [(y, &by, 34), (a, &bins[0], 16), (b, &bins[1], 25)].into_iter().enumerate() {
                p.u(11 + slot, dt(t));
                p.view(at, bd, t, rank - 2..rank);
                for d in 0..rank - 2 {
                    p.u(at + 3 + d, t.strides()[d]);
                }
            }
            bindings.push((2, bins[0]));
            bindings.push((3, bins[1]));
            if bias {
                let t = &call.inputs[2];
                p.u(14, dt(t));
                p.u(15, 1);
                p.view(43, &bins[2], t, t.rank() - 1..t.rank());
                bindings.push((4, bins[2]));
            }
            // The gated residual's x (binding 5) and gate (binding 6), viewed like y: P[48] on, dtypes at 49 and 50,
            // views at 51 and 60 (offset, row and column strides, batch strides).
            if residual {
                p.u(48, 1);
                for (i, dtype_at, at, binding) in [(2 + bias as usize, 49, 51, 5), (3 + bias as usize, 50, 60, 6)] {
                    let t = &call.inputs[i];
                    p.u(dtype_at, dt(t));
                    p.view(at, &bins[i], t, rank - 2..rank);
                    for d in 0..rank - 2 {
                        p.u(at + 3 + d, t.strides()[d]);
                    }
                    bindings.push((binding, bins[i]));
                }
            }
            // The cooperative shader reads 8 halves at once along K where an operand is contiguous along K and every
            // row starts 16 bytes aligned.
            let vec8 = |t: &TensorDesc, b: &Bound, k_dim: usize| {
                let other = if k_dim == rank - 1 { rank - 2 } else { rank - 1 };
                t.dtype == DType::F16
                    && k.is_multiple_of(8)
                    && t.strides()[k_dim] == 1
                    && (b.elem_offset as usize).is_multiple_of(8)
                    && t.strides()[other].is_multiple_of(8)
                    && t.strides()[..rank - 2].iter().all(|s| s.is_multiple_of(8))
            };
            let (va, vb) = (vec8(a, &bins[0], rank - 1), vec8(b, &bins[1], rank - 2));
            p.u(45, va as usize);
            p.u(46, vb as usize);
            // y stored fragment by fragment (rows 16-byte aligned, unit column stride), K in whole steps: the
            // whole-tile shader, which also takes a partial last row or column tile (M, N any).
            let y_rows = |w: usize| {
                y.strides()[rank - 1] == 1
                    && (by.elem_offset as usize).is_multiple_of(w)
                    && y.strides()[..rank - 1].iter().all(|s| s.is_multiple_of(w))
            };
            let whole_tiles = k.is_multiple_of(crate::coop::TILES_K_STEP)
                && va
                && vb
                && match y.dtype {
                    DType::F16 => y_rows(8),
                    DType::F32 => y_rows(4),
                    _ => false,
                };
            match dev.coop {
                // `supports` took the fused residual only for this shader.
                Some(c) if residual && whole_tiles => {
                    let (bm, bn) = crate::coop::tiles_block();
                    (c.matmul_tiles, [n.div_ceil(bn) as u32, m.div_ceil(bm) as u32, batch as u32])
                }
                _ if residual => {
                    return Err(Error::Unsupported {
                        backend: "vulkan".into(),
                        op: call.op.name(),
                        detail: "operands not suited to the whole-tile shader".into(),
                    })
                }
                // A few rows against a K-contiguous b (a linear layer on one token per sample): memory-bound on b.
                _ if batch == 1 && m <= MATVEC_MAX_M && b.strides()[rank - 2] == 1 => {
                    (Kernel::Matvec, grid(n.div_ceil(32)))
                }
                // 128x128 tiles on cooperative matrices when both operands are f16.
                Some(c) if a.dtype == DType::F16 && b.dtype == DType::F16 => {
                    let (kernel, (bm, bn)) =
                        if whole_tiles { (c.matmul_tiles, crate::coop::tiles_block()) } else { (c.matmul, (128, 128)) };
                    (kernel, [n.div_ceil(bn) as u32, m.div_ceil(bm) as u32, batch as u32])
                }
                _ => (Kernel::Matmul, [n.div_ceil(64) as u32, m.div_ceil(64) as u32, batch as u32]),
            }
        }
        Op::Attention { scale, causal, bias, qk_norm, norm_eps } => {
            let (q, k, v) = (&call.inputs[0], &call.inputs[1], &call.inputs[2]);
            let (b, h, nq, dh) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
            for (i, val) in [b, h, nq, k.shape()[2], dh, v.shape()[3], causal as usize, bias as usize, qk_norm as usize]
                .into_iter()
                .enumerate()
            {
                p.u(i, val);
            }
            p.f(9, scale);
            p.f(10, norm_eps);
            p.u(11, dt(y));
            p.view(20, &by, y, 0..4);
            for (i, (t, bd)) in call.inputs.iter().zip(&bins).take(3).enumerate() {
                p.u(12 + i, dt(t));
                p.view(25 + 5 * i, bd, t, 0..4);
                bindings.push((2 + i as u32, *bd));
            }
            let mut next = 3;
            if bias {
                let t = &call.inputs[3];
                p.u(15, dt(t));
                p.view(40, &bins[3], t, 0..4);
                bindings.push((5, bins[3]));
                next = 4;
            }
            if qk_norm {
                for j in 0..2 {
                    let t = &call.inputs[next + j];
                    p.u(16 + j, dt(t));
                    p.view(45 + 2 * j, &bins[next + j], t, t.rank() - 1..t.rank());
                    bindings.push((6 + j as u32, bins[next + j]));
                }
            }
            let f16 = [q, k, v].iter().all(|t| t.dtype == DType::F16);
            // The cooperative shader reads 8 halves at once along the head dim where a view is contiguous there and
            // every row starts 16 bytes aligned.
            for (i, (t, bd)) in call.inputs.iter().zip(&bins).take(3).enumerate() {
                let vec8 = t.dtype == DType::F16
                    && t.shape()[3].is_multiple_of(8)
                    && t.strides()[3] == 1
                    && (bd.elem_offset as usize).is_multiple_of(8)
                    && t.strides()[..3].iter().all(|s| s.is_multiple_of(8));
                p.u(50 + i, vec8 as usize);
            }
            // The workgroup-scope shader: f16 q, k, v, y with head dims of 64, nothing but the softmax, every view
            // contiguous along the head dim with offsets and strides in multiples of 8.
            let cm2 = dev.coop.is_some_and(|c| c.cm2)
                && f16
                && y.dtype == DType::F16
                && dh == 64
                && v.shape()[3] == 64
                && !(causal || bias || qk_norm)
                && [q, k, v, y].iter().all(|t| {
                    t.strides()[3] == 1
                        && t.layout.offset.is_multiple_of(8)
                        && t.strides()[..3].iter().all(|s| s.is_multiple_of(8))
                });
            let (kernel, rows) = match dev.coop {
                Some(_) if cm2 => (Kernel::AttentionCm2, crate::coop::cm2_attention_rows()),
                // Cooperative matrices: f16 q, k, v with head dims up to 64, 64 query rows per workgroup.
                Some(c) if f16 && dh.max(v.shape()[3]) <= ATTN_SMALL_D => (c.attention, 64),
                _ if dh.max(v.shape()[3]) <= ATTN_SMALL_D => (Kernel::Attention, 64),
                _ => (Kernel::Attention128, 32),
            };
            (kernel, [nq.div_ceil(rows) as u32, (b * h) as u32, 1])
        }
        Op::Conv2d { stride, padding, bias } => {
            let (x, w) = (&call.inputs[0], &call.inputs[1]);
            let (xs, ws, ys) = (x.shape(), w.shape(), y.shape());
            let vals = [
                xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], ys[2], ys[3], stride[0], stride[1], padding[0],
                padding[1],
            ];
            for (i, val) in vals.into_iter().enumerate() {
                p.u(i, val);
            }
            p.u(13, bias as usize);
            p.u(14, dt(y));
            p.view(20, &by, y, 0..4);
            for (i, (t, bd)) in call.inputs.iter().zip(&bins).take(2).enumerate() {
                p.u(15 + i, dt(t));
                p.view(25 + 5 * i, bd, t, 0..4);
                bindings.push((2 + i as u32, *bd));
            }
            if bias {
                let t = &call.inputs[2];
                p.u(17, dt(t));
                p.view(35, &bins[2], t, t.rank() - 1..t.rank());
                bindings.push((4, bins[2]));
            }
            // Tiled implicit GEMM (64 output channels x 64 output pixels per workgroup, one image per z) where the
            // grid fits; the direct shader otherwise.
            let (ws, pixels) = (w.strides(), ys[2] * ys[3]);
            p.u(18, (ws[3] == 1 && ws[2] == w.shape()[3] && ws[1] == w.shape()[2] * w.shape()[3]) as usize);
            if pixels.div_ceil(64) <= MAX_GROUPS as usize && ys[0] <= MAX_GROUPS as usize {
                (Kernel::ConvGemm, [pixels.div_ceil(64) as u32, ys[1].div_ceil(64) as u32, ys[0] as u32])
            } else {
                (Kernel::Conv2d, groups_for(y.elem_count()))
            }
        }
        Op::AttentionBackward { .. } => unreachable!("declined by supports"),
        Op::Gather => {
            let (table, ids) = (&call.inputs[0], &call.inputs[1]);
            p.u(0, y.shape()[0]);
            p.u(1, y.shape()[1]);
            p.u(2, dt(y));
            p.u(3, dt(table));
            p.u(4, dt(ids));
            p.view(8, &by, y, 0..2);
            p.view(11, &bins[0], table, 0..2);
            p.view(14, &bins[1], ids, 0..1);
            bindings.push((2, bins[0]));
            bindings.push((3, bins[1]));
            (Kernel::Gather, groups_for(y.elem_count()))
        }
    };
    let result = st.dispatch(dev.raw(), dev.queue(), kernel, &p.0, &bindings, groups);
    if let Some(id) = scratch {
        st.alloc.free(id);
    }
    result
}

/// Gather's contract: an id outside `0..V` is an error. The ids are read back and checked before the dispatch.
fn check_ids(dev: &VulkanDevice, call: &OpCall) -> Result<()> {
    use sd3_core::Device;
    let (table, ids) = (&call.inputs[0], &call.inputs[1]);
    let v = table.shape()[0];
    let es = ids.dtype.size_in_bytes();
    let span = ids.byte_span();
    let mut bytes = vec![0u8; span.len()];
    dev.download(ids.buffer, span.start, &mut bytes)?;
    for i in 0..ids.shape()[0] {
        let at = (ids.layout.offset + i * ids.strides()[0]) * es - span.start;
        let id: i64 = match ids.dtype {
            DType::I32 => i32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as i64,
            _ => i64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")),
        };
        if id < 0 || id as u64 >= v as u64 {
            return Err(Error::InvalidArgument(format!("gather: id {id} (at position {i}) outside 0..{v}")));
        }
    }
    Ok(())
}
