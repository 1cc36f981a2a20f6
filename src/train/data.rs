//! DreamBooth's instance (and class) images: every PNG or JPEG of a folder, prepared as the script's
//! `DreamBoothDataset` does: resized (bilinear) so the shorter side is the resolution, cropped to a square
//! (centre, or a random position), optionally flipped, scaled to [-1, 1], channels first; then encoded by the VAE
//! into training latents ([`ImageLatents`]).

use crate::models::vae_encoder::VaeEncoder;
use image::imageops::FilterType;
use image::RgbImage;
use sd3_core::{Backend, DType};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("--instance-dir {dir}: {source}")]
    ReadDir { dir: PathBuf, source: std::io::Error },
    #[error("--instance-dir {0}: no .png, .jpg or .jpeg image in it")]
    Empty(PathBuf),
    #[error("instance image {path}: {source}")]
    Decode { path: PathBuf, source: image::ImageError },
}

/// The PNG and JPEG files of `dir`, in file-name order (not decoded).
pub fn image_paths(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::ReadDir { dir: dir.into(), source })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
        })
        .collect();
    paths.sort();
    Ok(paths)
}

/// The instance images, decoded once, in file-name order.
pub struct InstanceImages {
    pub paths: Vec<PathBuf>,
    images: Vec<RgbImage>,
}

impl InstanceImages {
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let paths = image_paths(dir)?;
        if paths.is_empty() {
            return Err(DataError::Empty(dir.into()));
        }
        let images = paths
            .iter()
            .map(|p| {
                image::open(p).map(|i| i.to_rgb8()).map_err(|source| DataError::Decode { path: p.clone(), source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(InstanceImages { paths, images })
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Image `i` as `[3, res, res]` values in [-1, 1]; `crop` picks the crop's offset in [0, 1] of the slack
    /// (0.5: centred), `flip` mirrors it left to right.
    pub fn prepared(&self, i: usize, res: usize, crop: (f32, f32), flip: bool) -> Vec<f32> {
        let img = &self.images[i];
        let (w, h) = (img.width() as usize, img.height() as usize);
        // torchvision's Resize(int): the shorter side becomes `res`, the longer one `⌊long·res/short⌋`.
        let (nw, nh) = if w < h { (res, h * res / w) } else { (w * res / h, res) };
        let resized = image::imageops::resize(img, nw as u32, nh as u32, FilterType::Triangle);
        let x0 = ((nw - res) as f32 * crop.0).round() as usize;
        let y0 = ((nh - res) as f32 * crop.1).round() as usize;
        let mut out = vec![0f32; 3 * res * res];
        for y in 0..res {
            for x in 0..res {
                let sx = if flip { res - 1 - x } else { x };
                let p = resized.get_pixel((x0 + sx) as u32, (y0 + y) as u32);
                for c in 0..3 {
                    out[c * res * res + y * res + x] = p[c] as f32 / 127.5 - 1.0;
                }
            }
        }
        out
    }
}

/// Uniform draws for shuffles, crops and flips (splitmix64; the noise comes from [`crate::noise`]).
pub struct Draws(u64);

impl Draws {
    pub fn new(seed: u64) -> Self {
        Draws(seed)
    }
    /// The generator's state (to save and resume a run exactly).
    pub fn state(&self) -> u64 {
        self.0
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// In [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// How images become training latents.
#[derive(Clone, Copy, Debug)]
pub struct LatentsOptions {
    pub resolution: usize,
    pub center_crop: bool,
    pub random_flip: bool,
    /// Encode each image once (one crop, no flip).
    pub cache: bool,
    /// Each image this many times per pass (`--repeats`).
    pub repeats: usize,
}

/// One image set (instance or class images) as training latents: shuffled passes over it, each image prepared
/// and encoded by the VAE when used (or once, cached), its latent sampled as `(z − shift)·scale`.
pub struct ImageLatents<'a> {
    images: &'a InstanceImages,
    encoder: &'a VaeEncoder,
    backend: &'a Backend,
    options: LatentsOptions,
    /// `(mean, logvar)` per image when cached.
    cached: Vec<(Vec<f32>, Vec<f32>)>,
    order: Vec<usize>,
}

impl<'a> ImageLatents<'a> {
    pub fn new(
        images: &'a InstanceImages,
        encoder: &'a VaeEncoder,
        backend: &'a Backend,
        options: LatentsOptions,
        draws: &mut Draws,
    ) -> anyhow::Result<Self> {
        let mut set = ImageLatents { images, encoder, backend, options, cached: Vec::new(), order: Vec::new() };
        if options.cache {
            for i in 0..images.len() {
                let crop = set.crop(draws);
                let dist = set.distribution(i, crop, false)?;
                set.cached.push(dist);
            }
        }
        Ok(set)
    }

    fn crop(&self, draws: &mut Draws) -> (f32, f32) {
        if self.options.center_crop {
            (0.5, 0.5)
        } else {
            (draws.unit(), draws.unit())
        }
    }

    /// `(mean, logvar)` of image `i`, prepared with `crop` and `flip`.
    fn distribution(&self, i: usize, crop: (f32, f32), flip: bool) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let res = self.options.resolution;
        let pixels = self.images.prepared(i, res, crop, flip);
        let image = self.backend.from_f32(&pixels, &[1, 3, res, res], DType::F32)?;
        let dist = self.encoder.encode(&image)?;
        Ok((dist.mean.to_f32_vec()?, dist.logvar.to_f32_vec()?))
    }

    /// What is left of the current shuffled pass (to save and resume a run exactly).
    pub fn pass_left(&self) -> &[usize] {
        &self.order
    }

    pub fn set_pass_left(&mut self, order: Vec<usize>) -> anyhow::Result<()> {
        anyhow::ensure!(order.iter().all(|&i| i < self.images.len()), "a saved image index beyond the image set");
        self.order = order;
        Ok(())
    }

    /// The next image's latent, `(mean + exp(logvar/2)·noise − shift)·scale`.
    pub fn next_sample(&mut self, noise: &[f32], draws: &mut Draws) -> anyhow::Result<Vec<f32>> {
        if self.order.is_empty() {
            let repeats = self.options.repeats.max(1);
            self.order = (0..self.images.len()).flat_map(|i| std::iter::repeat_n(i, repeats)).collect();
            for i in (1..self.order.len()).rev() {
                self.order.swap(i, draws.below(i + 1));
            }
        }
        let i = self.order.pop().expect("refilled");
        let dist = match self.cached.get(i) {
            Some(dist) => dist.clone(),
            None => {
                let crop = self.crop(draws);
                let flip = self.options.random_flip && draws.unit() < 0.5;
                self.distribution(i, crop, flip)?
            }
        };
        let c = self.encoder.config();
        let (shift, scale) = (c.shift_factor.unwrap_or(0.0), c.scaling_factor);
        let (mean, logvar) = &dist;
        Ok(mean.iter().zip(logvar).zip(noise).map(|((m, lv), n)| (m + (0.5 * lv).exp() * n - shift) * scale).collect())
    }
}
