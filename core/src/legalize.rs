//! Device-side legalisation: when a device declines a call, rewrite it into calls the device accepts before the
//! host fallback is considered.
//!
//! Rewrites, cheapest first:
//! 1. **Relayout**: some operands that are not plain contiguous (strided, permuted, broadcast or offset views)
//!    are replaced by contiguous temporaries. An input is copied into its temporary with the device's own `Copy`;
//!    an output is computed into its temporary, then copied into the view. Every subset of such operands is tried
//!    in order of the bytes it copies, so a device that declines only one odd operand pays for that one copy.
//! 2. **Decompose** a fused form the device declines: a matmul with an activation epilogue becomes the plain
//!    matmul into a contiguous temporary and the activation from it into the output, a matmul with a gated
//!    residual the plain matmul and a `GatedResidual` from it (each part relaid out as needed). When both parts run as they are, this split is taken before any relayout of the fused call (it
//!    copies nothing; the activation's extra pass is what an unfused model pays anyway).
//!
//! Only `supports` decides, and a whole plan is accepted before anything is queued, so a declined rewrite costs
//! no device work. Temporaries are freed as soon as their work is queued (a device keeps a buffer alive until
//! queued work that uses it is done, see [`Device`]).

use crate::{BufferId, Device, Layout, Op, OpCall, Result, TensorDesc};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// What legalisation did on a backend: shown by `--benchmark` ([`crate::Backend::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LegalizeStats {
    /// Calls that ran on the device through a rewrite, by op name.
    pub rewritten: BTreeMap<String, u64>,
    /// Fused calls that ran as their parts, by op name.
    pub decomposed: BTreeMap<String, u64>,
    /// Copies into or out of temporaries, and the bytes they moved (counted once, at the destination).
    pub copies: u64,
    pub copy_bytes: u64,
}

impl LegalizeStats {
    /// `key=value` lines in the style of [`Device::stats`]; empty when nothing was legalised.
    pub fn lines(&self) -> Vec<String> {
        if self.rewritten.is_empty() {
            return Vec::new();
        }
        let list = |m: &BTreeMap<String, u64>| m.iter().map(|(k, n)| format!("{k}:{n}")).collect::<Vec<_>>().join(",");
        let mut v = vec![
            format!("legalize.copies={}", self.copies),
            format!("legalize.copy_bytes={}", self.copy_bytes),
            format!("legalize.rewritten={}", list(&self.rewritten)),
        ];
        if !self.decomposed.is_empty() {
            v.push(format!("legalize.decomposed={}", list(&self.decomposed)));
        }
        v
    }
}

/// Run `call`, which `dev` declined as it is, through a rewrite the device accepts. `Ok(false)` when there is none
/// (the caller falls back to the host); errors are those of the device while running the rewrite.
pub(crate) fn run_on_device(dev: &dyn Device, call: &OpCall, stats: &Mutex<LegalizeStats>) -> Result<bool> {
    let mut temps = Temps { dev, buffers: Vec::new() };
    let plan = match rewrite(dev, call, &mut temps)? {
        Some(p) => p,
        None => return Ok(false),
    };
    let mut counts = Counts::default();
    execute(dev, call, &plan, &mut counts)?;
    let mut s = stats.lock().unwrap();
    *s.rewritten.entry(call.op.name()).or_default() += 1;
    if matches!(plan, Plan::Decompose { .. }) {
        *s.decomposed.entry(call.op.name()).or_default() += 1;
    }
    s.copies += counts.copies;
    s.copy_bytes += counts.bytes;
    Ok(true)
}

/// How to run a call on the device.
#[derive(Debug)]
enum Plan {
    /// As it is.
    Direct,
    /// With the inputs at these indices, and the output if given, replaced by these contiguous temporaries.
    Relayout { inputs: Vec<(usize, TensorDesc)>, output: Option<TensorDesc> },
    /// A fused matmul as its parts ([`parts`]): the plain matmul into `tmp`, then the epilogue's op from it into
    /// the output.
    Decompose { tmp: TensorDesc, matmul: Box<Plan>, epilogue: Box<Plan> },
}

/// Device buffers of one legalised call, freed when it has been queued.
struct Temps<'a> {
    dev: &'a dyn Device,
    buffers: Vec<BufferId>,
}

impl Temps<'_> {
    fn contiguous_like(&mut self, t: &TensorDesc) -> Result<TensorDesc> {
        let bytes = t.elem_count() * t.dtype.size_in_bytes();
        let buffer = self.dev.alloc(bytes.max(1))?;
        self.buffers.push(buffer);
        Ok(TensorDesc { buffer, dtype: t.dtype, layout: Layout::contiguous(t.shape()) })
    }
}

impl Drop for Temps<'_> {
    fn drop(&mut self) {
        for &b in &self.buffers {
            self.dev.free(b);
        }
    }
}

/// A fused matmul's two calls, given the temporary between them: the plain matmul (into `tmp`) and the epilogue
/// (from `tmp` into the call's output). `None` for other ops.
fn parts(call: &OpCall, tmp: &TensorDesc) -> Option<[(Op, Vec<TensorDesc>); 2]> {
    match call.op {
        Op::Matmul { bias, act: Some(act) } => {
            Some([(Op::Matmul { bias, act: None }, call.inputs.to_vec()), (Op::Unary(act), vec![tmp.clone()])])
        }
        Op::MatmulGatedResidual { bias } => {
            let (mm, rest) = call.inputs.split_at(2 + bias as usize);
            Some([
                (Op::Matmul { bias, act: None }, mm.to_vec()),
                (Op::GatedResidual, vec![rest[0].clone(), rest[1].clone(), tmp.clone()]),
            ])
        }
        _ => None,
    }
}

/// The cheapest plan other than running the call as it is, if any.
fn rewrite(dev: &dyn Device, call: &OpCall, temps: &mut Temps) -> Result<Option<Plan>> {
    if !matches!(call.op, Op::Matmul { act: Some(_), .. } | Op::MatmulGatedResidual { .. }) {
        return relayout(dev, call, temps);
    }
    let tmp = temps.contiguous_like(&call.outputs[0])?;
    let [(mm_op, mm_in), (ep_op, ep_in)] = parts(call, &tmp).expect("a fused matmul");
    let mm_out = [tmp.clone()];
    let matmul = OpCall { op: mm_op, inputs: &mm_in, outputs: &mm_out };
    let epilogue = OpCall { op: ep_op, inputs: &ep_in, outputs: call.outputs };
    let split = |m: Plan, e: Plan| Plan::Decompose { tmp: tmp.clone(), matmul: Box::new(m), epilogue: Box::new(e) };
    // Both parts as they are: no copy, one more pass over the output (what an unfused model does). Preferred
    // to relaying out the fused call, and found without trying that (typically a device without the epilogue).
    if dev.supports(&matmul) && dev.supports(&epilogue) {
        return Ok(Some(split(Plan::Direct, Plan::Direct)));
    }
    if let Some(p) = relayout(dev, call, temps)? {
        return Ok(Some(p));
    }
    match (direct_or_relayout(dev, &matmul, temps)?, direct_or_relayout(dev, &epilogue, temps)?) {
        (Some(m), Some(e)) => Ok(Some(split(m, e))),
        _ => Ok(None),
    }
}

fn direct_or_relayout(dev: &dyn Device, call: &OpCall, temps: &mut Temps) -> Result<Option<Plan>> {
    if dev.supports(call) {
        return Ok(Some(Plan::Direct));
    }
    relayout(dev, call, temps)
}

/// Whether an operand is a candidate for a contiguous temporary.
fn is_plain(t: &TensorDesc) -> bool {
    t.layout.offset == 0 && t.is_contiguous()
}

/// The cheapest set of operands to make contiguous so that the device takes the call and the copies it needs.
fn relayout(dev: &dyn Device, call: &OpCall, temps: &mut Temps) -> Result<Option<Plan>> {
    // Copy and fill are the rewrite's own tools; a device that declines them has nothing to rewrite them into.
    if matches!(call.op, Op::Copy | Op::Fill { .. }) || call.outputs.len() != 1 {
        return Ok(None);
    }
    let n_in = call.inputs.len();
    let operand = |i: usize| if i < n_in { &call.inputs[i] } else { &call.outputs[0] };
    let candidates: Vec<usize> = (0..=n_in).filter(|&i| !is_plain(operand(i))).collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    let bytes = |i: usize| operand(i).elem_count() * operand(i).dtype.size_in_bytes();
    let subset_bytes = |mask: u32| -> usize {
        candidates.iter().enumerate().filter(|(j, _)| mask & (1 << j) != 0).map(|(_, &i)| bytes(i)).sum()
    };
    let mut subsets: Vec<u32> = (1..1u32 << candidates.len()).collect();
    subsets.sort_by_key(|&m| (subset_bytes(m), m.count_ones()));
    let mut temp_of: Vec<Option<TensorDesc>> = vec![None; candidates.len()];
    for mask in subsets {
        for (j, &i) in candidates.iter().enumerate() {
            if mask & (1 << j) != 0 && temp_of[j].is_none() {
                temp_of[j] = Some(temps.contiguous_like(operand(i))?);
            }
        }
        let chosen = |i: usize| {
            candidates.iter().position(|&c| c == i).filter(|&j| mask & (1 << j) != 0).and_then(|j| temp_of[j].clone())
        };
        let inputs: Vec<(usize, TensorDesc)> = (0..n_in).filter_map(|i| chosen(i).map(|t| (i, t))).collect();
        let output = chosen(n_in);
        let ins: Vec<TensorDesc> = (0..n_in).map(|i| chosen(i).unwrap_or_else(|| call.inputs[i].clone())).collect();
        let outs = [output.clone().unwrap_or_else(|| call.outputs[0].clone())];
        let copies_ok = inputs.iter().all(|(i, t)| supports_copy(dev, &call.inputs[*i], t))
            && output.as_ref().is_none_or(|t| supports_copy(dev, t, &call.outputs[0]));
        if copies_ok && dev.supports(&OpCall { op: call.op, inputs: &ins, outputs: &outs }) {
            return Ok(Some(Plan::Relayout { inputs, output }));
        }
    }
    Ok(None)
}

fn supports_copy(dev: &dyn Device, src: &TensorDesc, dst: &TensorDesc) -> bool {
    dev.supports(&OpCall { op: Op::Copy, inputs: std::slice::from_ref(src), outputs: std::slice::from_ref(dst) })
}

#[derive(Default)]
struct Counts {
    copies: u64,
    bytes: u64,
}

fn copy(dev: &dyn Device, src: &TensorDesc, dst: &TensorDesc, counts: &mut Counts) -> Result<()> {
    dev.execute(&OpCall { op: Op::Copy, inputs: std::slice::from_ref(src), outputs: std::slice::from_ref(dst) })?;
    counts.copies += 1;
    counts.bytes += (dst.elem_count() * dst.dtype.size_in_bytes()) as u64;
    Ok(())
}

fn execute(dev: &dyn Device, call: &OpCall, plan: &Plan, counts: &mut Counts) -> Result<()> {
    match plan {
        Plan::Direct => dev.execute(call),
        Plan::Relayout { inputs, output } => {
            let mut ins = call.inputs.to_vec();
            for (i, t) in inputs {
                copy(dev, &call.inputs[*i], t, counts)?;
                ins[*i] = t.clone();
            }
            let outs = [output.clone().unwrap_or_else(|| call.outputs[0].clone())];
            dev.execute(&OpCall { op: call.op, inputs: &ins, outputs: &outs })?;
            if let Some(t) = output {
                copy(dev, t, &call.outputs[0], counts)?;
            }
            Ok(())
        }
        Plan::Decompose { tmp, matmul, epilogue } => {
            let [(mm_op, mm_in), (ep_op, ep_in)] = parts(call, tmp).expect("only fused matmuls are decomposed");
            let mm_out = [tmp.clone()];
            execute(dev, &OpCall { op: mm_op, inputs: &mm_in, outputs: &mm_out }, matmul, counts)?;
            execute(dev, &OpCall { op: ep_op, inputs: &ep_in, outputs: call.outputs }, epilogue, counts)
        }
    }
}
