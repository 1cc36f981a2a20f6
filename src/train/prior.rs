//! Prior preservation's class images: where the class folder holds fewer than `--num-class-images`, the missing
//! ones are generated with the base model from the class prompt, as the script does before training
//! (`class_{n}.png`, seed `--seed + n`, the pipeline's default steps and guidance, at the training resolution).

use super::data::image_paths;
use super::dreambooth::{DreamBoothConfig, PriorPreservation, TrainEvent};
use crate::pipeline::{GenerationRequest, PipelineOptions, StableDiffusion3Pipeline};
use anyhow::Context;
use sd3_core::Backend;

pub fn complete_class_images(
    cfg: &DreamBoothConfig,
    prior: &PriorPreservation,
    backend: &Backend,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> anyhow::Result<()> {
    let dir = &prior.class_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("--class-data-dir {}", dir.display()))?;
    let have = image_paths(dir)?.len();
    if have >= prior.num_class_images {
        return Ok(());
    }
    let options = PipelineOptions { dtype: cfg.dtype, ..PipelineOptions::default() };
    let pipe = StableDiffusion3Pipeline::new(&cfg.model_dir, backend.clone(), options)
        .with_context(|| format!("opening the model {} to generate class images", cfg.model_dir.display()))?;
    for n in have..prior.num_class_images {
        let mut req = GenerationRequest::new(prior.class_prompt.clone(), cfg.resolution, cfg.resolution);
        req.seed = cfg.seed.wrapping_add(n as u64);
        let generation = pipe.generate(&req, &mut |_| {}).with_context(|| format!("class image {n}"))?;
        let path = (n..).map(|k| dir.join(format!("class_{k}.png"))).find(|p| !p.exists()).expect("a free name");
        crate::image_out::write_png(&path, &generation.images[0], &[("prompt", prior.class_prompt.clone())])?;
        on_event(&TrainEvent::ClassImage { index: n, total: prior.num_class_images, path });
    }
    Ok(())
}
