//! How a case describes its operands: dtype, view layout inside a buffer, and how the buffer is filled.
//!
//! Layout kinds, with the tag each gets in a case's shape description:
//! - contiguous (no tag);
//! - `T`: transposed, i.e. stored with the last two dims swapped (a column-major matrix);
//! - `P`: permuted, stored in another dim order (e.g. `[B,N,H,D]` viewed as `[B,H,N,D]`);
//! - `S`: sliced, a view into a bigger buffer (offset, gaps between rows and planes);
//! - `B`: broadcast, stride 0 in some dims.

use super::rng::SplitMix64;
use crate::layout::contiguous_strides;
use crate::{DType, Layout};

/// How an input buffer is filled. Values are drawn in f64, rounded to the tensor's dtype, and redrawn while the
/// rounded value is zero (so no input is ever exactly zero, except ids).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Values {
    /// Uniform in `[lo, hi)`.
    Uniform(f64, f64),
    /// Random sign, magnitude uniform in `[lo, hi)`: for divisors and reciprocals.
    AwayFromZero(f64, f64),
    /// Integers uniform in `0..n`: gather ids.
    Ids(usize),
}

/// One operand of a case.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub dtype: DType,
    /// The view the op sees.
    pub layout: Layout,
    /// Size of the underlying buffer in elements (at least `layout.span_end()`); the suite adds a sentinel tail
    /// after it for outputs.
    pub buffer_elems: usize,
    pub values: Values,
    /// Layout tag for descriptions: "", "T", "P", "S" or "B".
    pub tag: &'static str,
}

impl TensorSpec {
    pub fn contiguous(dtype: DType, shape: &[usize]) -> Self {
        let layout = Layout::contiguous(shape);
        TensorSpec { dtype, buffer_elems: layout.elem_count(), layout, values: Values::Uniform(-1.0, 1.0), tag: "" }
    }

    /// Stored in the dim order `order` (outermost first), viewed in logical order.
    pub fn permuted(dtype: DType, shape: &[usize], order: &[usize]) -> Self {
        let phys: Vec<usize> = order.iter().map(|&d| shape[d]).collect();
        let phys_strides = contiguous_strides(&phys);
        let mut strides = vec![0; shape.len()];
        for (j, &d) in order.iter().enumerate() {
            strides[d] = phys_strides[j];
        }
        let layout = Layout { shape: shape.to_vec(), strides, offset: 0 };
        TensorSpec { dtype, buffer_elems: phys.iter().product(), layout, values: Values::Uniform(-1.0, 1.0), tag: "P" }
    }

    /// Stored with its last two dims swapped.
    pub fn transposed(dtype: DType, shape: &[usize]) -> Self {
        let r = shape.len();
        let mut order: Vec<usize> = (0..r).collect();
        order.swap(r - 2, r - 1);
        TensorSpec { tag: "T", ..Self::permuted(dtype, shape, &order) }
    }

    /// A view starting at index 1 of every dim of a buffer one larger in every dim (three larger in the last),
    /// so there are gaps before, between and after its rows.
    pub fn sliced(dtype: DType, shape: &[usize]) -> Self {
        let r = shape.len();
        let phys: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| d + if i + 1 == r { 3 } else { 1 }).collect();
        let strides = contiguous_strides(&phys);
        let offset = strides.iter().sum();
        let layout = Layout { shape: shape.to_vec(), strides, offset };
        TensorSpec { dtype, buffer_elems: phys.iter().product(), layout, values: Values::Uniform(-1.0, 1.0), tag: "S" }
    }

    /// Broadcast along `dims`: the buffer holds the shape with those dims set to 1, viewed with stride 0.
    pub fn broadcast(dtype: DType, shape: &[usize], dims: &[usize]) -> Self {
        let phys: Vec<usize> = shape.iter().enumerate().map(|(i, &d)| if dims.contains(&i) { 1 } else { d }).collect();
        let mut strides = contiguous_strides(&phys);
        for &d in dims {
            strides[d] = 0;
        }
        let layout = Layout { shape: shape.to_vec(), strides, offset: 0 };
        TensorSpec { dtype, buffer_elems: phys.iter().product(), layout, values: Values::Uniform(-1.0, 1.0), tag: "B" }
    }

    pub fn with_values(mut self, values: Values) -> Self {
        self.values = values;
        self
    }

    pub fn shape(&self) -> &[usize] {
        &self.layout.shape
    }

    /// `[7,13]T` style description.
    pub fn describe(&self) -> String {
        let dims: Vec<String> = self.layout.shape.iter().map(|d| d.to_string()).collect();
        format!("[{}]{}", dims.join(","), self.tag)
    }

    /// Bytes of the whole buffer, every element drawn from `self.values` and rounded to the dtype.
    pub fn generate(&self, rng: &mut SplitMix64) -> Vec<u8> {
        let values: Vec<f32> = (0..self.buffer_elems).map(|_| self.draw(rng)).collect();
        self.dtype.f32_to_bytes(&values)
    }

    fn draw(&self, rng: &mut SplitMix64) -> f32 {
        if let Values::Ids(n) = self.values {
            return rng.below(n as u64) as f32;
        }
        for _ in 0..1000 {
            let x = match self.values {
                Values::Uniform(lo, hi) => rng.uniform(lo, hi),
                Values::AwayFromZero(lo, hi) => {
                    let m = rng.uniform(lo, hi);
                    if rng.next_u64() & 1 == 0 {
                        m
                    } else {
                        -m
                    }
                }
                Values::Ids(_) => unreachable!(),
            };
            let rounded = self.dtype.round_f32(x as f32);
            if rounded != 0.0 {
                return rounded;
            }
        }
        panic!("conformance suite bug: {:?} never gives a nonzero {} value", self.values, self.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_what_their_tags_say() {
        let t = TensorSpec::transposed(DType::F32, &[2, 3]);
        assert_eq!((t.layout.strides.as_slice(), t.buffer_elems), (&[1, 2][..], 6));
        let s = TensorSpec::sliced(DType::F32, &[2, 3]);
        assert_eq!((s.layout.strides.as_slice(), s.layout.offset, s.buffer_elems), (&[6, 1][..], 7, 18));
        let b = TensorSpec::broadcast(DType::F32, &[4, 5], &[0]);
        assert_eq!((b.layout.strides.as_slice(), b.buffer_elems), (&[0, 1][..], 5));
        let p = TensorSpec::permuted(DType::F32, &[2, 3, 4], &[0, 2, 1]);
        assert_eq!((p.layout.strides.as_slice(), p.buffer_elems), (&[12, 1, 3][..], 24));
    }

    #[test]
    fn generated_values_are_nonzero_in_range_and_reproducible() {
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::I32, DType::U8] {
            let spec = TensorSpec::contiguous(dtype, &[4096]).with_values(Values::Uniform(-1.5, 1.5));
            let bytes = spec.generate(&mut SplitMix64::new(3));
            assert_eq!(bytes, spec.generate(&mut SplitMix64::new(3)));
            let values = dtype.bytes_to_f32(&bytes);
            assert!(values.iter().all(|&v| v != 0.0 && (-1.5..=1.5).contains(&v)), "{dtype}");
        }
        let ids = TensorSpec::contiguous(DType::I64, &[1000]).with_values(Values::Ids(7));
        let values = DType::I64.bytes_to_f32(&ids.generate(&mut SplitMix64::new(3)));
        assert!(values.iter().all(|&v| (0.0..7.0).contains(&v)) && values.contains(&0.0) && values.contains(&6.0));
    }
}
