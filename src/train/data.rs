//! DreamBooth's instance images: every PNG or JPEG of a folder, prepared as the script's `DreamBoothDataset`
//! does: resized (bilinear) so the shorter side is the resolution, cropped to a square (centre, or a random
//! position), optionally flipped, scaled to [-1, 1], channels first.

use image::imageops::FilterType;
use image::RgbImage;
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

/// The instance images, decoded once, in file-name order.
pub struct InstanceImages {
    pub paths: Vec<PathBuf>,
    images: Vec<RgbImage>,
}

impl InstanceImages {
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let entries = std::fs::read_dir(dir).map_err(|source| DataError::ReadDir { dir: dir.into(), source })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
                matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
            })
            .collect();
        paths.sort();
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
