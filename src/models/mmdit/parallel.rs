//! Tensor parallelism for the MM-DiT (the seed's `--mp_size`; PaddleMIX's `simplified_sd3.py` with
//! `mp_degree > 1`, see `../shared/reference/paddle.md` §1.4): each of `size` devices holds a slice of every block's
//! big linears and runs the whole forward on its slice.
//!
//! - q/k/v projections and the feed-forward's first linear are split by output features ("column parallel"): a rank
//!   holds `heads / size` attention heads and `4·D / size` hidden units, so attention needs no communication.
//! - `to_out`, `to_add_out` and the feed-forward's second linear are split by input features ("row parallel"): each
//!   rank's product is a partial sum, summed over the ranks (**all-reduce**) before the bias is added once.
//! - Everything else (embeddings, adaLN modulation, norms, `proj_out`) is replicated.
//!
//! That is four all-reduces per block (image and text stream, after attention and after the MLP), five in a
//! dual-attention block, two in the last block (no text-stream output). [`HostAllReduce`] sums through host memory,
//! which works between any devices (the plugin ABI has no device-to-device transfer yet): a group of N divides each
//! device's share of the blocks' weights and FLOPs by N, but pays a download and an upload of every partial sum.

use super::params::{Linear, Params};
use super::{MmditError, Sd3Transformer2DModel, Sd3TransformerConfig};
use crate::weights::Weights;
use sd3_core::{Backend, DType, PreparedCall, Tensor};
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

/// Which slice of the model a device holds: rank `rank` of `size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub size: usize,
}

impl Shard {
    /// The whole model on one device.
    pub const WHOLE: Shard = Shard { rank: 0, size: 1 };

    /// This rank's part of `0..n` (n must be a multiple of `size`; [`check_divides`] checks the model's dims).
    pub fn range(&self, n: usize) -> Range<usize> {
        let part = n / self.size;
        self.rank * part..(self.rank + 1) * part
    }
}

/// Error unless `size` divides the head count and the feed-forward width.
pub fn check_divides(heads: usize, ff_hidden: usize, size: usize) -> Result<(), MmditError> {
    if size == 0 || !heads.is_multiple_of(size) || !ff_hidden.is_multiple_of(size) {
        return Err(MmditError::Config(format!(
            "tensor parallelism over {size} devices needs the {heads} attention heads and the {ff_hidden} \
             feed-forward units to split evenly"
        )));
    }
    Ok(())
}

/// Sums a tensor over the ranks of a group: each rank calls [`AllReduce::sum`] with its partial tensor (same
/// shape and dtype everywhere) and gets the total, on its own device.
pub trait AllReduce: Send + Sync {
    fn sum(&self, partial: &Tensor) -> sd3_core::Result<Tensor>;
}

/// A rank's link to its group: the group's all-reduce (none on one device). The rank's slice of the model is fixed
/// when it is loaded ([`Shard`]).
#[derive(Clone, Copy)]
pub struct Comm<'a> {
    pub all_reduce: Option<&'a dyn AllReduce>,
}

impl Comm<'_> {
    pub const WHOLE: Comm<'static> = Comm { all_reduce: None };

    /// The sum of `partial` over the group (itself on one device).
    pub fn sum(&self, partial: Tensor) -> sd3_core::Result<Tensor> {
        match self.all_reduce {
            Some(r) => r.sum(&partial),
            None => Ok(partial),
        }
    }
}

/// A linear split by input features ("row parallel"): the local product is a partial sum, and the bias is added
/// once, after the sum over the group. On one device it is a plain linear with the bias fused into the matmul.
pub struct RowParallelLinear {
    pub(super) linear: Linear,
    /// The bias to add after the sum (only when split).
    pub(super) bias_after_sum: Option<Tensor>,
}

impl RowParallelLinear {
    pub fn load(
        p: &Params,
        name: &str,
        inp: usize,
        out: usize,
        shard: Shard,
        backend: &Backend,
        dtype: DType,
    ) -> Result<Self, MmditError> {
        if shard.size == 1 {
            return Ok(RowParallelLinear {
                linear: Linear::load(p, name, inp, out, backend, dtype)?,
                bias_after_sum: None,
            });
        }
        let cols = shard.range(inp);
        let w = p.host(&format!("{name}.weight"), &[out, inp])?;
        let local: Vec<f32> = w.chunks(inp).flat_map(|row| row[cols.clone()].iter().copied()).collect();
        let upload = |v: &[f32], shape: &[usize]| {
            backend
                .from_f32(v, shape, dtype)
                .map_err(|source| crate::weights::WeightsError::Upload { name: name.to_string(), source })
        };
        Ok(RowParallelLinear {
            linear: Linear { weight: upload(&local, &[out, cols.len()])?, bias: None },
            bias_after_sum: Some(p.tensor(&format!("{name}.bias"), &[out], backend, dtype)?),
        })
    }

    /// `residual + gate·forward(x)` as one fused call ready to run, where there is one device (no sum between the
    /// product and the residual) and the device takes it ([`Tensor::prepare_linear_gated_residual`]).
    pub fn prepare_gated_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        gate: &Tensor,
        comm: &Comm,
    ) -> sd3_core::Result<Option<PreparedCall>> {
        if comm.all_reduce.is_some() || self.bias_after_sum.is_some() {
            return Ok(None);
        }
        x.prepare_linear_gated_residual(&self.linear.weight, self.linear.bias.as_ref(), residual, gate)
    }

    /// `residual + gate·forward(x)`: one fused op where [`Self::prepare_gated_residual`] gives one, else the
    /// projection (summed over the group) and then the gated residual.
    pub fn forward_gated_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        gate: &Tensor,
        comm: &Comm,
    ) -> sd3_core::Result<Tensor> {
        match self.prepare_gated_residual(x, residual, gate, comm)? {
            Some(fused) => fused.run(),
            None => residual.gated_residual(gate, &self.forward(x, comm)?),
        }
    }

    /// `linear(x)` over the whole group: `x` holds this rank's input features.
    pub fn forward(&self, x: &Tensor, comm: &Comm) -> sd3_core::Result<Tensor> {
        let y = comm.sum(self.linear.forward(x)?)?;
        match &self.bias_after_sum {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }
}

/// What a rank's all-reduce returns when another rank failed: the other rank's error is the one to report.
const ANOTHER_RANK_FAILED: &str = "another rank failed during the forward";

/// [`AllReduce`] through host memory: each rank downloads its partial sum, the last to arrive publishes the total,
/// and each rank uploads it to its own device. Works between any backends and devices.
pub struct HostAllReduce {
    size: usize,
    state: Mutex<Round>,
    done: Condvar,
}

#[derive(Default)]
struct Round {
    /// Running sum of this round's partials, and how many have arrived.
    sum: Vec<f32>,
    arrived: usize,
    /// Rounds completed, and the last one's total.
    completed: u64,
    total: Arc<Vec<f32>>,
    /// A rank failed: the others must not wait for it.
    aborted: bool,
}

impl HostAllReduce {
    pub fn new(size: usize) -> HostAllReduce {
        HostAllReduce { size, state: Mutex::new(Round::default()), done: Condvar::new() }
    }

    /// A rank failed (or panicked) and will not arrive: every waiting and later sum returns an error instead of
    /// waiting for it forever.
    pub fn abort(&self) {
        let mut round = self.state.lock().unwrap_or_else(|e| e.into_inner());
        round.aborted = true;
        self.done.notify_all();
    }
}

impl AllReduce for HostAllReduce {
    fn sum(&self, partial: &Tensor) -> sd3_core::Result<Tensor> {
        let values = partial.to_f32_vec()?;
        let poisoned = || sd3_core::Error::backend("tensor-parallel", "another rank panicked during an all-reduce");
        let aborted = || sd3_core::Error::backend("tensor-parallel", ANOTHER_RANK_FAILED);
        let mut round = self.state.lock().map_err(|_| poisoned())?;
        if round.aborted {
            return Err(aborted());
        }
        if round.arrived == 0 {
            round.sum = values;
        } else if round.sum.len() != values.len() {
            round.aborted = true;
            self.done.notify_all();
            return Err(sd3_core::Error::InvalidArgument(format!(
                "all-reduce: this rank sums {} elements, another {}",
                values.len(),
                round.sum.len()
            )));
        } else {
            round.sum.iter_mut().zip(&values).for_each(|(s, v)| *s += v);
        }
        round.arrived += 1;
        let this_round = round.completed;
        if round.arrived == self.size {
            // The last rank in: publish. The next round cannot complete before every rank has read this total,
            // since it needs every rank's partial.
            round.total = Arc::new(std::mem::take(&mut round.sum));
            round.arrived = 0;
            round.completed += 1;
            self.done.notify_all();
        } else {
            round = self.done.wait_while(round, |r| r.completed == this_round && !r.aborted).map_err(|_| poisoned())?;
            if round.completed == this_round {
                return Err(aborted());
            }
        }
        let total = Arc::clone(&round.total);
        drop(round);
        partial.backend().from_f32(&total, partial.shape(), partial.dtype())
    }
}

/// The MM-DiT split over a group of devices (one rank per device; one device is the plain model). Inputs are
/// taken on the first device and copied to the others; every rank runs the forward on its own thread and the first
/// rank's output is returned.
pub struct TensorParallelTransformer {
    /// Rank r's slice, on `backends[r]`.
    ranks: Vec<Sd3Transformer2DModel>,
    backends: Vec<Backend>,
}

impl TensorParallelTransformer {
    /// Load rank r's slice onto `backends[r]`, all ranks at once (each device reads the whole checkpoint and keeps
    /// its slice, as PaddleMIX does).
    pub fn load(
        w: &Weights,
        config: &Sd3TransformerConfig,
        backends: &[Backend],
        dtype: DType,
    ) -> Result<Self, MmditError> {
        let size = backends.len();
        Self::build(backends, |rank, backend| {
            Sd3Transformer2DModel::from_weights_shard(w, config.clone(), Shard { rank, size }, backend, dtype)
        })
    }

    /// [`Sd3Transformer2DModel::random_shard`] over `backends`: the same values as the one-device model.
    pub fn random(
        config: &Sd3TransformerConfig,
        seed: u64,
        backends: &[Backend],
        dtype: DType,
    ) -> Result<Self, MmditError> {
        let size = backends.len();
        Self::build(backends, |rank, backend| {
            Sd3Transformer2DModel::random_shard(config.clone(), seed, Shard { rank, size }, backend, dtype)
        })
    }

    fn build(
        backends: &[Backend],
        load: impl Fn(usize, &Backend) -> Result<Sd3Transformer2DModel, MmditError> + Sync,
    ) -> Result<Self, MmditError> {
        if backends.is_empty() {
            return Err(MmditError::Config("tensor parallelism needs at least one device".into()));
        }
        // Rank 0 on this thread (as on one device), the others beside it.
        let ranks = std::thread::scope(|s| {
            let load = &load;
            let others: Vec<_> = backends
                .iter()
                .enumerate()
                .skip(1)
                .map(|(rank, backend)| s.spawn(move || load(rank, backend)))
                .collect();
            let first = load(0, &backends[0]);
            std::iter::once(first)
                .chain(others.into_iter().enumerate().map(|(i, h)| {
                    h.join().unwrap_or_else(|_| Err(MmditError::Parallel(format!("loading rank {} panicked", i + 1))))
                }))
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(TensorParallelTransformer { ranks, backends: backends.to_vec() })
    }

    /// [`Sd3Transformer2DModel::forward`] over the group; inputs and output on the first device.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled: &Tensor,
        timesteps: &[f32],
        skip_layers: &[usize],
    ) -> Result<Tensor, MmditError> {
        let size = self.ranks.len();
        if size == 1 {
            return self.ranks[0].forward(hidden_states, encoder_hidden_states, pooled, timesteps, skip_layers);
        }
        let reduce = HostAllReduce::new(size);
        // Rank r: its copy of the inputs, the forward, and on failure (or panic) an abort so no rank waits for it.
        let run = |rank: usize| -> Result<Tensor, MmditError> {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let comm = Comm { all_reduce: Some(&reduce) };
                let b = &self.backends[rank];
                let (x, c, p) = match rank {
                    0 => (hidden_states.clone(), encoder_hidden_states.clone(), pooled.clone()),
                    _ => (hidden_states.to_backend(b)?, encoder_hidden_states.to_backend(b)?, pooled.to_backend(b)?),
                };
                self.ranks[rank].forward_in_group(&x, &c, &p, timesteps, skip_layers, &comm)
            }))
            .unwrap_or_else(|_| Err(MmditError::Parallel(format!("rank {rank} panicked"))));
            if result.is_err() {
                reduce.abort();
            }
            result
        };
        std::thread::scope(|s| {
            let others: Vec<_> = (1..size).map(|rank| s.spawn(move || run(rank).map(drop))).collect();
            let first = run(0);
            let others: Vec<_> = others.into_iter().map(|h| h.join()).collect();
            // Report a rank's own failure before the aborts it caused in the others.
            let mut failures = std::iter::once(first.as_ref().err().map(|e| e.to_string()))
                .chain(others.iter().map(|r| match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("a rank panicked".to_string()),
                }))
                .flatten()
                .collect::<Vec<_>>();
            failures.sort_by_key(|m| m.contains(ANOTHER_RANK_FAILED));
            match failures.first() {
                None => first,
                Some(m) => Err(MmditError::Parallel(m.clone())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_all_reduce_sums_every_round_whatever_the_arrival_order() {
        let backend = crate::runtime::open_backend(&crate::runtime::BackendRequest::cpu()).unwrap();
        let reduce = HostAllReduce::new(3);
        std::thread::scope(|s| {
            for rank in 0..3usize {
                let (reduce, backend) = (&reduce, backend.clone());
                s.spawn(move || {
                    for round in 0..20usize {
                        // Ranks arrive in a different order each round.
                        std::thread::sleep(std::time::Duration::from_micros(((rank * 7 + round * 3) % 5) as u64 * 50));
                        let v = [(rank + 1) as f32, (round * 10) as f32];
                        let t = backend.from_f32(&v, &[2], DType::F32).unwrap();
                        let sum = reduce.sum(&t).unwrap().to_f32_vec().unwrap();
                        assert_eq!(sum, vec![6.0, (round * 30) as f32], "rank {rank}, round {round}");
                    }
                });
            }
        });
    }

    #[test]
    fn a_failed_rank_releases_the_others() {
        let backend = crate::runtime::open_backend(&crate::runtime::BackendRequest::cpu()).unwrap();
        let reduce = HostAllReduce::new(2);
        std::thread::scope(|s| {
            let waiting = s.spawn(|| reduce.sum(&backend.from_f32(&[1.0], &[1], DType::F32).unwrap()));
            std::thread::sleep(std::time::Duration::from_millis(20));
            reduce.abort();
            let err = waiting.join().unwrap().unwrap_err().to_string();
            assert!(err.contains("another rank failed"), "{err}");
        });
    }

    #[test]
    fn shards_split_evenly_or_are_refused() {
        assert_eq!(Shard { rank: 1, size: 2 }.range(24), 12..24);
        assert!(check_divides(24, 6144, 2).is_ok());
        let err = check_divides(24, 6144, 5).unwrap_err().to_string();
        assert!(err.contains("24 attention heads") && err.contains("5 devices"), "{err}");
    }
}
