//! Pixels: the RGB images that flow between simulated nodes, the pictures the
//! "sampler" paints, and their PNG / JPEG / WebP encodings.

use std::io::Cursor;

use image::{ImageEncoder, RgbImage};

/// One RGB8 image.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl Frame {
    pub fn solid(width: u32, height: u32, color: [u8; 3]) -> Self {
        let mut rgb = Vec::with_capacity((width * height * 3) as usize);
        for _ in 0..width * height {
            rgb.extend_from_slice(&color);
        }
        Self { width, height, rgb }
    }

    pub fn from_fn(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Self {
        let mut rgb = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(&f(x, y));
            }
        }
        Self { width, height, rgb }
    }

    fn px(&self, x: u32, y: u32) -> [u8; 3] {
        let i = ((y * self.width + x) * 3) as usize;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    pub fn inverted(&self) -> Self {
        Self {
            width: self.width,
            height: self.height,
            rgb: self.rgb.iter().map(|v| 255 - v).collect(),
        }
    }

    /// Nearest-neighbour resize (the sim does not need ComfyUI's filters).
    pub fn resized(&self, width: u32, height: u32) -> Self {
        let (width, height) = (width.max(1), height.max(1));
        if self.width == 0 || self.height == 0 {
            return Self::solid(width, height, [0, 0, 0]);
        }
        Self::from_fn(width, height, |x, y| {
            self.px(
                (x as u64 * self.width as u64 / width as u64) as u32,
                (y as u64 * self.height as u64 / height as u64) as u32,
            )
        })
    }

    /// Box blur with running sums, so a 1024² image with radius 31 stays cheap.
    pub fn blurred(&self, radius: u32) -> Self {
        let r = radius as i64;
        if r == 0 || self.width == 0 || self.height == 0 {
            return self.clone();
        }
        let (w, h) = (self.width as i64, self.height as i64);
        let pass = |src: &[u8], horizontal: bool| -> Vec<u8> {
            let mut out = vec![0u8; src.len()];
            let (lines, len) = if horizontal { (h, w) } else { (w, h) };
            for line in 0..lines {
                let idx = |i: i64| -> usize {
                    let i = i.clamp(0, len - 1);
                    let (x, y) = if horizontal { (i, line) } else { (line, i) };
                    ((y * w + x) * 3) as usize
                };
                for c in 0..3 {
                    let mut sum: i64 = (-r..=r).map(|i| src[idx(i) + c] as i64).sum();
                    for i in 0..len {
                        out[idx(i) + c] = (sum / (2 * r + 1)) as u8;
                        sum += src[idx(i + r + 1) + c] as i64 - src[idx(i - r) + c] as i64;
                    }
                }
            }
            out
        };
        let tmp = pass(&self.rgb, true);
        Self {
            width: self.width,
            height: self.height,
            rgb: pass(&tmp, false),
        }
    }
}

fn hash(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

/// What the simulated VAE decodes a finished latent into: soft colour fields
/// and rings placed by the seed, so different seeds give different pictures.
pub fn painting(seed: u64, width: u32, height: u32, index: u64) -> Frame {
    let h = hash(seed ^ index.wrapping_mul(0x9e3779b97f4a7c15));
    let hue = |shift: u32| ((h >> shift) & 0xff) as f64 / 255.0;
    let (cx, cy) = (0.25 + 0.5 * hue(8), 0.25 + 0.5 * hue(16));
    let (a, b, c) = (hue(24), hue(32), hue(40));
    Frame::from_fn(width, height, |x, y| {
        let u = x as f64 / width.max(1) as f64;
        let v = y as f64 / height.max(1) as f64;
        let d = ((u - cx).powi(2) + (v - cy).powi(2)).sqrt();
        let ring = (0.5 + 0.5 * (d * 40.0 * (0.5 + c)).cos()) * 0.35;
        [
            ((a * (1.0 - u) + (1.0 - a) * v) * 180.0 + ring * 200.0).min(255.0) as u8,
            ((b * u + (1.0 - b) * (1.0 - v)) * 180.0 + ring * 120.0).min(255.0) as u8,
            ((c * (1.0 - d)).abs() * 200.0 + ring * 160.0).min(255.0) as u8,
        ]
    })
}

/// A sampler preview at `step` of `steps`: noise fading into the final painting,
/// so every step's image differs from the last.
pub fn preview(seed: u64, width: u32, height: u32, step: u64, steps: u64) -> Frame {
    let target = painting(seed, width, height, 0);
    let t = step as f64 / steps.max(1) as f64;
    let mut rgb = target.rgb;
    for (i, v) in rgb.iter_mut().enumerate() {
        let noise = (hash(seed ^ (step << 40) ^ i as u64) & 0xff) as f64;
        *v = (noise * (1.0 - t) + *v as f64 * t) as u8;
    }
    Frame { width, height, rgb }
}

/// PNG with ComfyUI's metadata text chunks (`prompt`, `workflow`, ...).
pub fn encode_png(frame: &Frame, text: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, frame.width.max(1), frame.height.max(1));
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    for (key, value) in text {
        // tEXt is Latin-1; fall back to iTXt for anything else.
        let added = if value.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk((*key).to_owned(), value.clone())
        } else {
            enc.add_itxt_chunk((*key).to_owned(), value.clone())
        };
        if added.is_err() {
            continue;
        }
    }
    let ok = enc
        .write_header()
        .and_then(|mut w| w.write_image_data(&frame.rgb));
    if ok.is_err() {
        return Vec::new();
    }
    out
}

pub fn encode_jpeg(frame: &Frame, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
    if enc
        .write_image(
            &frame.rgb,
            frame.width,
            frame.height,
            image::ExtendedColorType::Rgb8,
        )
        .is_err()
    {
        return Vec::new();
    }
    out
}

pub fn encode_webp(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
    if enc
        .write_image(
            &frame.rgb,
            frame.width,
            frame.height,
            image::ExtendedColorType::Rgb8,
        )
        .is_err()
    {
        return Vec::new();
    }
    out
}

/// Decodes an uploaded image (PNG, JPEG, WebP) to RGB, plus its alpha as a mask.
pub fn decode(bytes: &[u8]) -> Option<(Frame, Option<Vec<u8>>)> {
    let img = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .decode()
        .ok()?;
    let alpha = img
        .color()
        .has_alpha()
        .then(|| img.to_rgba8().pixels().map(|p| p.0[3]).collect());
    let rgb: RgbImage = img.to_rgb8();
    Some((
        Frame {
            width: rgb.width(),
            height: rgb.height(),
            rgb: rgb.into_raw(),
        },
        alpha,
    ))
}

/// `input/example.png`.
pub fn example_png() -> Vec<u8> {
    encode_png(&painting(0, 64, 64, 0), &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips() {
        let f = painting(7, 32, 16, 0);
        let png = encode_png(&f, &[("prompt", "{}".to_owned())]);
        let (back, alpha) = decode(&png).expect("decodes");
        assert_eq!(back, f);
        assert!(alpha.is_none());
    }

    #[test]
    fn previews_change_per_step_and_decode() {
        let a = encode_jpeg(&preview(1, 16, 16, 1, 3), 95);
        let b = encode_jpeg(&preview(1, 16, 16, 2, 3), 95);
        assert_ne!(a, b);
        assert_eq!(decode(&a).map(|(f, _)| (f.width, f.height)), Some((16, 16)));
    }

    #[test]
    fn blur_keeps_solid_colour() {
        let f = Frame::solid(20, 10, [10, 20, 30]).blurred(3);
        assert!(f.rgb.chunks(3).all(|p| p == [10, 20, 30]));
    }
}
