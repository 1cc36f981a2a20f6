//! The transformer's parameters by their diffusers names, as PyTorch's `named_parameters()` lists them, each the
//! model's own tensor or a view of it (`to_q`, `to_k`, `to_v` are row ranges of the fused projection): what full
//! fine-tuning updates in place. `pos_embed.pos_embed` is a buffer, not a parameter.

use super::attention::QkvProjection;
use super::params::Linear;
use super::{MmditError, Sd3Transformer2DModel};
use sd3_core::Tensor;

fn linear(out: &mut Vec<(String, Tensor)>, name: &str, l: &Linear) {
    out.push((format!("{name}.weight"), l.weight.clone()));
    if let Some(b) = &l.bias {
        out.push((format!("{name}.bias"), b.clone()));
    }
}

fn qkv(
    out: &mut Vec<(String, Tensor)>,
    prefix: &str,
    p: &QkvProjection,
    names: [&str; 3],
    norms: [&str; 2],
) -> sd3_core::Result<()> {
    let d = p.heads * p.head_dim;
    for (i, name) in names.iter().enumerate() {
        out.push((format!("{prefix}.{name}.weight"), p.qkv.weight.narrow(0, i * d, d)?));
        if let Some(b) = &p.qkv.bias {
            out.push((format!("{prefix}.{name}.bias"), b.narrow(0, i * d, d)?));
        }
    }
    if let Some(norm) = &p.norm {
        out.push((format!("{prefix}.{}.weight", norms[0]), norm.q.clone()));
        out.push((format!("{prefix}.{}.weight", norms[1]), norm.k.clone()));
    }
    Ok(())
}

impl Sd3Transformer2DModel {
    /// Every trainable parameter: `(name, tensor)`, the tensor the model computes with (a view where fused).
    /// Errors on a tensor-parallel slice (whose tensors are parts of parameters).
    pub fn named_parameters(&self) -> Result<Vec<(String, Tensor)>, MmditError> {
        let mut out = Vec::new();
        let pe = &self.pos_embed;
        out.push(("pos_embed.proj.weight".into(), pe.proj_weight.clone()));
        out.push(("pos_embed.proj.bias".into(), pe.proj_bias.clone()));
        let tte = &self.time_text_embed;
        for (name, mlp) in [("timestep_embedder", &tte.timestep_embedder), ("text_embedder", &tte.text_embedder)] {
            linear(&mut out, &format!("time_text_embed.{name}.linear_1"), &mlp.linear_1);
            linear(&mut out, &format!("time_text_embed.{name}.linear_2"), &mlp.linear_2);
        }
        linear(&mut out, "context_embedder", &self.context_embedder);
        for (i, block) in self.blocks.iter().enumerate() {
            let prefix = format!("transformer_blocks.{i}");
            let parts = [&block.attn.to_out, &block.ff.proj_out];
            if parts.iter().any(|p| p.bias_after_sum.is_some()) {
                return Err(MmditError::Config("a tensor-parallel slice has no whole parameters".into()));
            }
            linear(&mut out, &format!("{prefix}.norm1.linear"), &block.norm1);
            let attn = format!("{prefix}.attn");
            qkv(&mut out, &attn, &block.attn.image, ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"])?;
            let text = ["add_q_proj", "add_k_proj", "add_v_proj"];
            qkv(&mut out, &attn, &block.attn.context, text, ["norm_added_q", "norm_added_k"])?;
            linear(&mut out, &format!("{attn}.to_out.0"), &block.attn.to_out.linear);
            if let Some(p) = &block.attn.to_add_out {
                linear(&mut out, &format!("{attn}.to_add_out"), &p.linear);
            }
            if let Some(attn2) = &block.attn2 {
                let a2 = format!("{prefix}.attn2");
                qkv(&mut out, &a2, &attn2.qkv, ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"])?;
                linear(&mut out, &format!("{a2}.to_out.0"), &attn2.to_out.linear);
            }
            linear(&mut out, &format!("{prefix}.ff.net.0.proj"), &block.ff.proj_in);
            linear(&mut out, &format!("{prefix}.ff.net.2"), &block.ff.proj_out.linear);
            match (&block.context, &block.context_norm_last) {
                (Some(ctx), _) => {
                    linear(&mut out, &format!("{prefix}.norm1_context.linear"), &ctx.norm1);
                    linear(&mut out, &format!("{prefix}.ff_context.net.0.proj"), &ctx.ff.proj_in);
                    linear(&mut out, &format!("{prefix}.ff_context.net.2"), &ctx.ff.proj_out.linear);
                }
                (None, Some(norm)) => linear(&mut out, &format!("{prefix}.norm1_context.linear"), &norm.linear),
                (None, None) => unreachable!("a block has one of the two context norms"),
            }
        }
        linear(&mut out, "norm_out.linear", &self.norm_out.linear);
        linear(&mut out, "proj_out", &self.proj_out);
        Ok(out)
    }
}
