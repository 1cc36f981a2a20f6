//! Images out: the VAE output to 8-bit RGB exactly as diffusers post-processes it, and PNG files carrying the
//! generation parameters in text chunks.

use std::io::BufWriter;
use std::path::Path;

/// An 8-bit RGB image, rows top to bottom, `RGBRGB…`.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// diffusers' `VaeImageProcessor`: `(x/2 + 0.5).clamp(0, 1)`, then `round(x·255)` (numpy rounds half to even).
/// `decoded` is one image `[3, H, W]` in `[-1, 1]`, row-major f32.
pub fn to_rgb8(decoded: &[f32], height: usize, width: usize) -> RgbImage {
    let plane = height * width;
    assert_eq!(decoded.len(), 3 * plane, "decoded image must be [3, {height}, {width}]");
    let mut pixels = Vec::with_capacity(3 * plane);
    for i in 0..plane {
        for c in 0..3 {
            let v = (decoded[c * plane + i] * 0.5 + 0.5).clamp(0.0, 1.0);
            pixels.push((v * 255.0).round_ties_even() as u8);
        }
    }
    RgbImage { width, height, pixels }
}

/// Write a PNG with one text chunk per `(keyword, text)`: `tEXt` when the text is Latin-1, `iTXt` (UTF-8)
/// otherwise (a prompt in CJK or with emoji).
pub fn write_png(path: &Path, image: &RgbImage, text: &[(&str, String)]) -> Result<(), ImageError> {
    let err = |reason: String| ImageError { path: path.display().to_string(), reason };
    let file = std::fs::File::create(path).map_err(|e| err(e.to_string()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), image.width as u32, image.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (key, value) in text {
        let latin1 = value.chars().all(|c| (c as u32) < 256);
        let added = if latin1 {
            enc.add_text_chunk(key.to_string(), value.clone())
        } else {
            enc.add_itxt_chunk(key.to_string(), value.clone())
        };
        added.map_err(|e| err(e.to_string()))?;
    }
    let mut writer = enc.write_header().map_err(|e| err(e.to_string()))?;
    writer.write_image_data(&image.pixels).map_err(|e| err(e.to_string()))?;
    writer.finish().map_err(|e| err(e.to_string()))
}

/// Read an 8-bit RGB PNG and its text chunks (tEXt and iTXt).
pub fn read_png(path: &Path) -> Result<(RgbImage, Vec<(String, String)>), ImageError> {
    let err = |reason: String| ImageError { path: path.display().to_string(), reason };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().map_err(|e| err(e.to_string()))?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or_else(|| err("image too large".into()))?];
    let frame = reader.next_frame(&mut buf).map_err(|e| err(e.to_string()))?;
    if frame.color_type != png::ColorType::Rgb || frame.bit_depth != png::BitDepth::Eight {
        return Err(err(format!("expected 8-bit RGB, found {:?} {:?}", frame.color_type, frame.bit_depth)));
    }
    buf.truncate(frame.buffer_size());
    let info = reader.info();
    let mut text: Vec<(String, String)> =
        info.uncompressed_latin1_text.iter().map(|c| (c.keyword.clone(), c.text.clone())).collect();
    for c in &info.utf8_text {
        text.push((c.keyword.clone(), c.get_text().map_err(|e| err(e.to_string()))?));
    }
    let image = RgbImage { width: frame.width as usize, height: frame.height as usize, pixels: buf };
    Ok((image, text))
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ImageError {
    pub path: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postprocess_clamps_and_rounds() {
        // x = 0 → 0.5·255 = 127.5 (exact) → 128; outside [-1, 1] clamps; 0.2 → 0.6·255 = 153.
        assert_eq!(to_rgb8(&[0.0, 5.0, -3.0], 1, 1).pixels, [128, 255, 0]);
        assert_eq!(to_rgb8(&[0.2, 1.0, -1.0], 1, 1).pixels, [153, 255, 0]);
    }

    #[test]
    fn png_round_trip_with_text() {
        let path = std::env::temp_dir().join(format!("sd3-png-{}.png", std::process::id()));
        let img = RgbImage { width: 2, height: 1, pixels: vec![1, 2, 3, 4, 5, 6] };
        write_png(&path, &img, &[("prompt", "a cat".into()), ("negative_prompt", "猫".into())]).unwrap();
        let (back, text) = read_png(&path).unwrap();
        assert_eq!(back, img);
        assert!(text.contains(&("prompt".into(), "a cat".into())));
        assert!(text.contains(&("negative_prompt".into(), "猫".into())));
        std::fs::remove_file(path).ok();
    }
}
