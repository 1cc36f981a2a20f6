//! The test cases: every op, for every dtype a device claims, in several shapes and layouts.
//!
//! Cases are plain data ([`Case`]), built from the device's dtype list, so a vendor can list, filter or extend them.

mod compute;
mod elementwise;
mod norm;

use super::spec::TensorSpec;
use crate::{DType, Op};

/// One op call to check: operand specs, and a note with parameters worth showing.
#[derive(Clone, Debug)]
pub struct Case {
    pub op: Op,
    pub inputs: Vec<TensorSpec>,
    pub output: TensorSpec,
    /// Parameters not visible in the shapes: `causal`, `k3x3 s2 p1`, `x∈[5,7)`.
    pub note: String,
}

impl Case {
    pub fn new(op: Op, inputs: Vec<TensorSpec>, output: TensorSpec) -> Case {
        Case { op, inputs, output, note: String::new() }
    }

    pub fn note(mut self, note: impl Into<String>) -> Case {
        self.note = note.into();
        self
    }

    /// `matmul`, `unary.silu`, ...
    pub fn name(&self) -> String {
        self.op.name()
    }

    /// `f16` when every operand has one dtype, else `in, in → out` (e.g. `f32,f16 → f32`).
    pub fn dtype_label(&self) -> String {
        let out = self.output.dtype;
        if self.inputs.iter().all(|t| t.dtype == out) {
            return out.name().to_string();
        }
        let ins: Vec<&str> = self.inputs.iter().map(|t| t.dtype.name()).collect();
        format!("{}→{}", ins.join(","), out.name())
    }

    /// `[7,13]T [1,13]B → [7,13]S causal`.
    pub fn shape_label(&self) -> String {
        let ins: Vec<String> = self.inputs.iter().map(|t| t.describe()).collect();
        let mut s = if ins.is_empty() {
            format!("→ {}", self.output.describe())
        } else {
            format!("{} → {}", ins.join(" "), self.output.describe())
        };
        if !self.note.is_empty() {
            s.push(' ');
            s.push_str(&self.note);
        }
        s
    }

    /// Unique id of the case; also the key its random inputs are seeded from.
    pub fn id(&self) -> String {
        format!("{} {} {}", self.name(), self.dtype_label(), self.shape_label())
    }

    /// The least precise float dtype among the operands: the one whose epsilon sets the tolerance.
    pub fn tolerance_dtype(&self) -> DType {
        let eps = |d: DType| super::compare::epsilon(d);
        self.inputs
            .iter()
            .chain(std::iter::once(&self.output))
            .map(|t| t.dtype)
            .filter(|d| d.is_float())
            .fold(DType::F32, |acc, d| if eps(d) > eps(acc) { d } else { acc })
    }
}

/// Every case for a device computing in `dtypes` (its [`crate::DeviceInfo::dtypes`]).
pub fn all_cases(dtypes: &[DType]) -> Vec<Case> {
    let floats: Vec<DType> = DType::FLOATS.into_iter().filter(|d| dtypes.contains(d)).collect();
    let mut cases = elementwise::copy_cases(dtypes);
    for &d in &floats {
        cases.extend(elementwise::fill_cases(d));
        cases.extend(elementwise::unary_cases(d));
        cases.extend(elementwise::binary_cases(d));
        cases.extend(elementwise::affine_cases(d));
        cases.extend(compute::matmul_cases(d, &floats));
        cases.extend(norm::softmax_cases(d));
        cases.extend(norm::layer_norm_cases(d));
        cases.extend(norm::rms_norm_cases(d));
        cases.extend(norm::modulate_cases(d));
        cases.extend(compute::attention_cases(d));
        cases.extend(compute::attention_backward_cases(d));
        cases.extend(compute::conv2d_cases(d));
        cases.extend(norm::group_norm_cases(d));
        cases.extend(elementwise::upsample_cases(d));
        cases.extend(elementwise::gather_cases(d));
    }
    cases
}

/// Shorthands used by the case lists.
pub(crate) mod t {
    use crate::conformance::spec::{TensorSpec, Values};
    use crate::DType;

    pub fn c(d: DType, shape: &[usize]) -> TensorSpec {
        TensorSpec::contiguous(d, shape)
    }
    pub fn tr(d: DType, shape: &[usize]) -> TensorSpec {
        TensorSpec::transposed(d, shape)
    }
    pub fn s(d: DType, shape: &[usize]) -> TensorSpec {
        TensorSpec::sliced(d, shape)
    }
    pub fn b(d: DType, shape: &[usize], dims: &[usize]) -> TensorSpec {
        TensorSpec::broadcast(d, shape, dims)
    }
    pub fn p(d: DType, shape: &[usize], order: &[usize]) -> TensorSpec {
        TensorSpec::permuted(d, shape, order)
    }
    pub fn uni(lo: f64, hi: f64) -> Values {
        Values::Uniform(lo, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BufferId, OpCall, TensorDesc};

    /// Every case (and perf case) is a well-formed call with a unique id and views inside their buffers.
    fn check(cases: &[Case]) {
        let mut ids = std::collections::HashSet::new();
        for case in cases {
            assert!(ids.insert(case.id()), "duplicate case {}", case.id());
            assert_eq!(case.inputs.len(), case.op.n_inputs(), "{}", case.id());
            let desc = |t: &crate::conformance::spec::TensorSpec| {
                assert!(t.layout.span_end() <= t.buffer_elems, "{}: view overflows its buffer", case.id());
                TensorDesc { buffer: BufferId(1), dtype: t.dtype, layout: t.layout.clone() }
            };
            let ins: Vec<TensorDesc> = case.inputs.iter().map(desc).collect();
            let outs = [desc(&case.output)];
            let call = OpCall { op: case.op, inputs: &ins, outputs: &outs };
            crate::reference::validate(&call).unwrap_or_else(|e| panic!("{}: {e}", case.id()));
        }
    }

    #[test]
    fn cases_are_well_formed() {
        let cases = all_cases(&DType::ALL);
        assert_eq!(cases.iter().filter(|c| c.op == Op::Copy).count(), 36 * 3 + 3 * 3);
        check(&cases);
        check(&crate::conformance::perf::perf_cases(&DType::ALL));
    }

    #[test]
    fn only_claimed_dtypes_are_tested() {
        let cases = all_cases(&[DType::F16]);
        assert!(cases.iter().all(|c| c
            .inputs
            .iter()
            .chain([&c.output])
            .all(|t| matches!(t.dtype, DType::F16 | DType::I32 | DType::I64))));
    }
}
