//! `--train-text-encoder`: LoRA adapters on both CLIP encoders too (the script's `text_lora_config`, `q_proj`,
//! `k_proj`, `v_proj`, `out_proj` of every layer), so the prompt is encoded with them at every step and the
//! transformer's backward goes on into the encoders ([`crate::models::clip_train`]). T5 stays frozen.

use crate::models::clip::ClipTextModel;
use crate::models::clip_train::ClipActs;
use crate::models::mmdit::train::{AdapterGrads, Adapters};
use crate::pipeline::{StableDiffusion3Pipeline, TextInputs};
use anyhow::Context;
use sd3_core::{Backend, DType, Tensor};
use std::path::Path;

/// The components, in the LoRA file's key prefixes.
pub const COMPONENTS: [&str; 2] = ["text_encoder", "text_encoder_2"];

/// The two CLIP encoders.
pub struct TextEncoders {
    clips: [ClipTextModel; 2],
}

/// One prompt's encoding with its activations, for [`TextEncoders::backward`].
pub struct Encoded<'a> {
    /// `[1, 77 + T, joint]` and `[1, pooled_dim]`.
    pub embeds: Tensor,
    pub pooled: Tensor,
    acts: [ClipActs<'a>; 2],
    /// Each encoder's hidden and pooled widths.
    widths: [(usize, usize); 2],
}

impl TextEncoders {
    pub fn load(model_dir: &Path, backend: &Backend, dtype: DType) -> anyhow::Result<Self> {
        let load = |c: &str| ClipTextModel::load(&model_dir.join(c), backend, dtype);
        Ok(TextEncoders { clips: [load(COMPONENTS[0])?, load(COMPONENTS[1])?] })
    }

    /// Each component's adapted modules, `(in, out)` features (`text_model.encoder.layers.{i}.self_attn.q_proj`).
    pub fn adapter_shapes(&self) -> [std::collections::BTreeMap<String, (usize, usize)>; 2] {
        self.clips.each_ref().map(|clip| {
            let c = clip.config();
            (0..c.num_hidden_layers)
                .flat_map(|i| {
                    crate::models::clip_train::CLIP_LORA_TARGETS.map(|t| {
                        (format!("text_model.encoder.layers.{i}.self_attn.{t}"), (c.hidden_size, c.hidden_size))
                    })
                })
                .collect()
        })
    }

    /// The prompt through both encoders with `adapters` (per component), assembled as the pipeline does.
    pub fn encode<'a>(
        &'a self,
        pipe: &StableDiffusion3Pipeline,
        prompt: &TextInputs,
        adapters: [&'a Adapters; 2],
    ) -> anyhow::Result<Encoded<'a>> {
        let (l, l_acts) = self.clips[0].forward_adapted(&prompt.clip_l, adapters[0])?;
        let (g, g_acts) = self.clips[1].forward_adapted(&prompt.clip_g, adapters[1])?;
        let widths = [(l.penultimate.dim(2), l.pooled.dim(1)), (g.penultimate.dim(2), g.pooled.dim(1))];
        let (embeds, pooled) =
            pipe.assemble_text(&(l.penultimate, l.pooled), &(g.penultimate, g.pooled), &prompt.t5)?;
        Ok(Encoded { embeds, pooled, acts: [l_acts, g_acts], widths })
    }

    /// Each component's adapters' gradients from the gradients of the prompt's embeddings and pooled vector
    /// (`[1, 77 + T, joint]`, `[1, pooled_dim]`; the rows of a batch that share the prompt summed).
    pub fn backward(&self, e: &Encoded, d_embeds: &Tensor, d_pooled: &Tensor) -> anyhow::Result<[AdapterGrads; 2]> {
        let dtype = e.embeds.dtype();
        let (d_embeds, d_pooled) = (d_embeds.to_dtype(dtype)?, d_pooled.to_dtype(dtype)?);
        let n = e.acts[0].tokens();
        let mut offsets = (0, 0);
        let mut out: [AdapterGrads; 2] = Default::default();
        for (i, (&(w, p), acts)) in e.widths.iter().zip(&e.acts).enumerate() {
            let d_pen = d_embeds.narrow(1, 0, n)?.narrow(2, offsets.0, w)?.contiguous()?;
            let d_pool = d_pooled.narrow(1, offsets.1, p)?.contiguous()?;
            out[i] = self.clips[i].backward_adapters(acts, &d_pen, &d_pool).with_context(|| COMPONENTS[i])?;
            offsets = (offsets.0 + w, offsets.1 + p);
        }
        Ok(out)
    }
}

/// `Σ` over the batch rows `rows` of `t [B, …]`: `[1, …]`.
pub fn sum_rows(t: &Tensor, rows: std::ops::Range<usize>) -> sd3_core::Result<Tensor> {
    let mut shape = t.shape().to_vec();
    let per: usize = shape[1..].iter().product();
    let part = t.narrow(0, rows.start, rows.len())?.contiguous()?.reshape(&[rows.len(), per])?;
    let ones = t.backend().full(&[1, rows.len()], t.dtype(), 1.0)?;
    shape[0] = 1;
    ones.matmul(&part)?.reshape(&shape)
}
