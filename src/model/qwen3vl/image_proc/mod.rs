//! Qwen3-VL image preprocessing, bit-exact with Hugging Face's `Qwen2VLImageProcessor`.
//!
//! The reference is transformers 5.23 with its default torchvision backend on CPU (torch 2.15,
//! torchvision 0.29, Pillow 11.3):
//!
//! 1. [`smart_resize`] picks a size whose sides are multiples of `patch_size * merge_size`.
//! 2. [`resize_bicubic_antialias`] resizes the `uint8` image the way torch's CPU kernel for
//!    `interpolate(mode="bicubic", antialias=True)` does on `uint8` input (a port of Pillow's
//!    `ImagingResample`): Keys cubic with `a = -0.5`, support widened by the downscale factor,
//!    weights computed in `f64`, normalised, quantised to `i16`, a horizontal pass then a
//!    vertical pass, each rounded and clamped to `u8`. An axis whose size does not change is
//!    not filtered at all, and an image whose size does not change is used as is.
//! 3. Rescale and normalise are fused as HF fuses them: `(x - mean / rescale) / (std /
//!    rescale)` in `f32`, which is `(x - 127.5) / 127.5` for Qwen3-VL.
//! 4. The frame is repeated `temporal_patch_size` times and cut into rows ordered
//!    `(block_row, block_col, merge_row, merge_col)`, each row laid out
//!    `(channel, t, patch_y, patch_x)`.
//!
//! [`decode_rgb`] turns encoded bytes into the RGB image HF sees when a PIL image goes through
//! `convert_to_rgb`: EXIF orientation applied, transparency composited onto white with Pillow's
//! integer arithmetic.

mod decode;
mod resize;

use std::borrow::Cow;

use image::RgbImage;
use serde::Deserialize;

pub use decode::decode_rgb;
pub use resize::resize_bicubic_antialias;

/// Largest aspect ratio (long side over short side) that [`smart_resize`] accepts, as in HF.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// Largest integer that HF's float arithmetic in [`smart_resize`] handles exactly (2^53).
const MAX_EXACT: u128 = 1 << 53;

/// Errors from decoding and preprocessing images.
#[derive(Debug, thiserror::Error)]
pub enum ImageProcError {
    /// The preprocessor config is not valid JSON or holds a value this module cannot use.
    #[error("invalid preprocessor config: {0}")]
    Config(String),
    /// The image has a side of zero pixels.
    #[error("image is {width}x{height} pixels; both sides must be at least 1")]
    EmptyImage {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
    },
    /// The image is too elongated for the model.
    #[error("image is {width}x{height} pixels, aspect ratio {ratio:.1}; the limit is 200")]
    AspectRatio {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
        /// Long side divided by short side.
        ratio: f64,
    },
    /// The image or a pixel budget is too large for exact size arithmetic.
    #[error("{what} is {value}; the limit is 2^53")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The offending value.
        value: u128,
    },
    /// The configured pixel budget leaves no valid size for this image.
    #[error(
        "image of {width}x{height} pixels resizes to {out_width}x{out_height}; \
         min_pixels must be above 0 so that every side is at least one patch block"
    )]
    ZeroSize {
        /// Input width in pixels.
        width: usize,
        /// Input height in pixels.
        height: usize,
        /// Computed output width.
        out_width: usize,
        /// Computed output height.
        out_height: usize,
    },
    /// The bytes are not in a supported image format (PNG, JPEG, WebP, GIF).
    #[error("unsupported image format; supported formats are PNG, JPEG, WebP and GIF")]
    UnsupportedFormat,
    /// The image needs more memory or larger dimensions than the decoding limits allow.
    #[error("image exceeds the decoding limits ({limits}): {source}")]
    Limits {
        /// The limits in force, in words.
        limits: String,
        /// The decoder's report.
        source: Box<image::ImageError>,
    },
    /// The bytes could not be decoded.
    #[error("cannot decode image: {0}")]
    Decode(#[source] Box<image::ImageError>),
}

/// Preprocessing parameters read from `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// Side of a square vision patch in pixels.
    pub patch_size: usize,
    /// Number of frames per temporal patch; a still image is repeated this many times.
    pub temporal_patch_size: usize,
    /// Side of the block of patches merged into one LLM token.
    pub merge_size: usize,
    /// Smallest pixel count the resized image may have (`size.shortest_edge` in HF).
    pub min_pixels: usize,
    /// Largest pixel count the resized image may have (`size.longest_edge` in HF).
    pub max_pixels: usize,
    /// Per-channel mean, on the rescaled (0..1) scale.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation, on the rescaled (0..1) scale.
    pub image_std: [f32; 3],
    /// Factor that maps `u8` values to the rescaled scale (HF: `1 / 255`).
    pub rescale_factor: f64,
}

impl Default for ProcessorConfig {
    /// Qwen3-VL's published values.
    fn default() -> Self {
        Self {
            patch_size: 16,
            temporal_patch_size: 2,
            merge_size: 2,
            min_pixels: 65_536,
            max_pixels: 16_777_216,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
            rescale_factor: 1.0 / 255.0,
        }
    }
}

/// A mean or std entry: HF accepts one number or one per channel.
#[derive(Deserialize)]
#[serde(untagged)]
enum ChannelValues {
    One(f32),
    Three([f32; 3]),
}

impl ChannelValues {
    fn per_channel(&self) -> [f32; 3] {
        match *self {
            Self::One(v) => [v; 3],
            Self::Three(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
}

#[derive(Deserialize)]
struct RawConfig {
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    size: Option<RawSize>,
    image_mean: Option<ChannelValues>,
    image_std: Option<ChannelValues>,
    rescale_factor: Option<f64>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    resample: Option<i64>,
}

/// PIL's code for bicubic resampling, the only one this module implements.
const RESAMPLE_BICUBIC: i64 = 3;

impl ProcessorConfig {
    /// Parses `preprocessor_config.json`.
    ///
    /// Accepts the transformers 4.x layout (`min_pixels` / `max_pixels`, `size` with
    /// `shortest_edge` / `longest_edge`, or both; the top-level keys win, as in HF) and the 5.x
    /// layout, also when nested under an `"image_processor"` key. Missing keys take Qwen3-VL's
    /// values (see [`Default`]). Configs that turn off resizing, rescaling or normalisation, or
    /// that ask for another resampling filter than bicubic, are rejected.
    pub fn from_json(text: &str) -> Result<ProcessorConfig, ImageProcError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ImageProcError::Config(e.to_string()))?;
        let value = match value.get("image_processor") {
            Some(inner) if inner.is_object() => inner.clone(),
            _ => value,
        };
        let raw: RawConfig =
            serde_json::from_value(value).map_err(|e| ImageProcError::Config(e.to_string()))?;

        for (key, flag) in [
            ("do_resize", raw.do_resize),
            ("do_rescale", raw.do_rescale),
            ("do_normalize", raw.do_normalize),
        ] {
            if flag == Some(false) {
                return Err(ImageProcError::Config(format!(
                    "{key} is false; resizing, rescaling and normalising must all be on"
                )));
            }
        }
        if let Some(resample) = raw.resample {
            if resample != RESAMPLE_BICUBIC {
                return Err(ImageProcError::Config(format!(
                    "resample is {resample}; only 3 (bicubic) is supported"
                )));
            }
        }

        let d = ProcessorConfig::default();
        let size = raw.size.as_ref();
        let cfg = ProcessorConfig {
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            min_pixels: raw
                .min_pixels
                .or(size.and_then(|s| s.shortest_edge))
                .unwrap_or(d.min_pixels),
            max_pixels: raw
                .max_pixels
                .or(size.and_then(|s| s.longest_edge))
                .unwrap_or(d.max_pixels),
            image_mean: raw
                .image_mean
                .as_ref()
                .map_or(d.image_mean, ChannelValues::per_channel),
            image_std: raw
                .image_std
                .as_ref()
                .map_or(d.image_std, ChannelValues::per_channel),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that every value is usable.
    fn validate(&self) -> Result<(), ImageProcError> {
        let bad = |msg: String| Err(ImageProcError::Config(msg));
        if self.patch_size == 0 || self.temporal_patch_size == 0 || self.merge_size == 0 {
            return bad(format!(
                "patch_size {}, temporal_patch_size {} and merge_size {} must all be at least 1",
                self.patch_size, self.temporal_patch_size, self.merge_size
            ));
        }
        if self.max_pixels == 0 || self.min_pixels > self.max_pixels {
            return bad(format!(
                "min_pixels {} must not exceed max_pixels {}, and max_pixels must be at least 1",
                self.min_pixels, self.max_pixels
            ));
        }
        if self.max_pixels as u128 > MAX_EXACT {
            return bad(format!(
                "max_pixels {} is above the limit of 2^53",
                self.max_pixels
            ));
        }
        if self.image_std.iter().any(|s| !s.is_finite() || *s == 0.0)
            || self.image_mean.iter().any(|m| !m.is_finite())
        {
            return bad(format!(
                "image_mean {:?} must be finite and image_std {:?} finite and non-zero",
                self.image_mean, self.image_std
            ));
        }
        if !(self.rescale_factor.is_finite() && self.rescale_factor > 0.0) {
            return bad(format!(
                "rescale_factor {} must be finite and above 0",
                self.rescale_factor
            ));
        }
        Ok(())
    }

    /// Side of the pixel block that becomes one LLM token: `patch_size * merge_size`.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Values of `u8` `x` after HF's fused rescale + normalise, per channel: `(x - m) / s`.
    ///
    /// HF builds `m = f32(mean) * f32(1 / rescale_factor)` and likewise `s`, then computes in
    /// `f32`.
    fn normalisation(&self) -> [[f32; 256]; 3] {
        let inv = (1.0 / self.rescale_factor) as f32;
        let mut table = [[0.0f32; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            let mean = self.image_mean[c] * inv;
            let std = self.image_std[c] * inv;
            for (x, v) in row.iter_mut().enumerate() {
                *v = (x as f32 - mean) / std;
            }
        }
        table
    }
}

/// Picks the resized `(height, width)` exactly as HF's Python `smart_resize` does.
///
/// Each side is rounded to a multiple of `factor` (ties to even, as Python's `round`); if the
/// area then exceeds `max_pixels` both sides are scaled down and floored (but kept at least
/// `factor`), if it is below `min_pixels` they are scaled up and ceiled. Fails for an empty
/// image, an aspect ratio above 200, sizes beyond 2^53, and when the result has a zero side
/// (only possible with `min_pixels == 0`).
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize), ImageProcError> {
    if height == 0 || width == 0 {
        return Err(ImageProcError::EmptyImage { width, height });
    }
    if factor == 0 || max_pixels == 0 {
        return Err(ImageProcError::Config(format!(
            "factor {factor} and max_pixels {max_pixels} must be at least 1"
        )));
    }
    let area = height as u128 * width as u128;
    for (what, value) in [
        ("image pixel count", area),
        ("min_pixels", min_pixels as u128),
        ("max_pixels", max_pixels as u128),
    ] {
        if value > MAX_EXACT {
            return Err(ImageProcError::TooLarge { what, value });
        }
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > MAX_ASPECT_RATIO {
        return Err(ImageProcError::AspectRatio {
            width,
            height,
            ratio,
        });
    }

    let f = factor as f64;
    let (hf, wf) = (height as f64, width as f64);
    let mut h_bar = (hf / f).round_ties_even() as usize * factor;
    let mut w_bar = (wf / f).round_ties_even() as usize * factor;
    let bar_area = h_bar as u128 * w_bar as u128;
    if bar_area > max_pixels as u128 {
        let beta = (area as f64 / max_pixels as f64).sqrt();
        h_bar = factor.max((hf / beta / f).floor() as usize * factor);
        w_bar = factor.max((wf / beta / f).floor() as usize * factor);
    } else if bar_area < min_pixels as u128 {
        let beta = (min_pixels as f64 / area as f64).sqrt();
        h_bar = (hf * beta / f).ceil() as usize * factor;
        w_bar = (wf * beta / f).ceil() as usize * factor;
    }
    if h_bar == 0 || w_bar == 0 {
        return Err(ImageProcError::ZeroSize {
            width,
            height,
            out_width: w_bar,
            out_height: h_bar,
        });
    }
    Ok((h_bar, w_bar))
}

/// Model input for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// Row-major `[rows, 3 * temporal_patch_size * patch_size^2]` values; a row is laid out
    /// `(channel, t, patch_y, patch_x)`.
    pub pixel_values: Vec<f32>,
    /// Patch grid `[t, h, w]`: frames / temporal patch, height / patch, width / patch.
    pub grid_thw: [usize; 3],
}

impl ProcessedImage {
    /// Number of patch rows, `t * h * w`.
    pub fn rows(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Number of values per row, `3 * temporal_patch_size * patch_size^2`.
    pub fn row_len(&self) -> usize {
        self.pixel_values
            .len()
            .checked_div(self.rows())
            .unwrap_or(0)
    }

    /// Number of LLM tokens the image becomes: rows / `merge^2`.
    pub fn llm_tokens(&self, merge: usize) -> usize {
        self.rows() / (merge * merge).max(1)
    }
}

/// Runs HF's Qwen2-VL / Qwen3-VL image preprocessing on an RGB image.
///
/// Resizes to [`smart_resize`]'s size with [`resize_bicubic_antialias`] (skipped when the
/// size is unchanged, as torchvision skips it), normalises as HF's fused rescale + normalise,
/// and lays out patches as HF's `patchify`.
pub fn preprocess(img: &RgbImage, cfg: &ProcessorConfig) -> Result<ProcessedImage, ImageProcError> {
    cfg.validate()?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    let (rh, rw) = smart_resize(height, width, cfg.factor(), cfg.min_pixels, cfg.max_pixels)?;
    let resized: Cow<'_, RgbImage> = if (rh, rw) == (height, width) {
        Cow::Borrowed(img)
    } else {
        let too_large = |value: usize| ImageProcError::TooLarge {
            what: "resized side",
            value: value as u128,
        };
        let out_w = u32::try_from(rw).map_err(|_| too_large(rw))?;
        let out_h = u32::try_from(rh).map_err(|_| too_large(rh))?;
        Cow::Owned(resize_bicubic_antialias(img, out_w, out_h))
    };

    let table = cfg.normalisation();
    let (p, m, t) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (rh / p, rw / p);
    let row_len = 3 * t * p * p;
    let raw = resized.as_raw();
    let mut pixel_values = Vec::with_capacity(gh * gw * row_len);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let y0 = (bh * m + mh) * p;
                    let x0 = (bw * m + mw) * p;
                    for (c, lut) in table.iter().enumerate() {
                        for _ in 0..t {
                            for py in 0..p {
                                let line = ((y0 + py) * rw + x0) * 3;
                                pixel_values.extend(
                                    raw[line..line + p * 3]
                                        .chunks_exact(3)
                                        .map(|px| lut[usize::from(px[c])]),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(ProcessedImage {
        pixel_values,
        grid_thw: [1, gh, gw],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_half_to_even() {
        // 48 / 32 = 1.5 -> 2 blocks; 80 / 32 = 2.5 -> 2 blocks.
        assert_eq!(smart_resize(48, 80, 32, 0, 1 << 30).unwrap(), (64, 64));
        // Below min_pixels both sides scale up and round up.
        assert_eq!(smart_resize(10, 10, 32, 4096, 65536).unwrap(), (64, 64));
        // Above max_pixels both sides scale down and round down.
        assert_eq!(
            smart_resize(1000, 1000, 32, 4096, 65536).unwrap(),
            (256, 256)
        );
    }

    #[test]
    fn config_layouts() {
        let hub = r#"{"size": {"longest_edge": 16777216, "shortest_edge": 65536},
            "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "processor_class": "Qwen3VLProcessor",
            "image_processor_type": "Qwen2VLImageProcessorFast"}"#;
        assert_eq!(
            ProcessorConfig::from_json(hub).unwrap(),
            ProcessorConfig::default()
        );
        // 4.x top-level pixel keys win over `size`.
        let old = r#"{"min_pixels": 3136, "max_pixels": 1003520, "patch_size": 14,
            "size": {"shortest_edge": 1, "longest_edge": 2}, "image_mean": 0.25}"#;
        let cfg = ProcessorConfig::from_json(old).unwrap();
        assert_eq!(
            (cfg.min_pixels, cfg.max_pixels, cfg.factor()),
            (3136, 1003520, 28)
        );
        assert_eq!(cfg.image_mean, [0.25; 3]);
        // 5.x processor_config.json nests the image processor.
        let nested = r#"{"image_processor": {"size": {"shortest_edge": 4096,
            "longest_edge": 65536}, "resample": 3}, "processor_class": "Qwen3VLProcessor"}"#;
        let cfg = ProcessorConfig::from_json(nested).unwrap();
        assert_eq!((cfg.min_pixels, cfg.max_pixels), (4096, 65536));
        for bad in [
            r#"{"do_resize": false}"#,
            r#"{"resample": 2}"#,
            r#"{"image_std": [0.5, 0.0, 0.5]}"#,
            r#"{"merge_size": 0}"#,
            r#"{"min_pixels": 10, "max_pixels": 5}"#,
            r#"{"rescale_factor": -1.0}"#,
            r#"{"patch_size": "16"}"#,
            "not json",
        ] {
            let err = ProcessorConfig::from_json(bad).unwrap_err();
            assert!(matches!(err, ImageProcError::Config(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn normalisation_is_hfs_fused_form() {
        let table = ProcessorConfig::default().normalisation();
        for x in 0..=255u8 {
            let want = (f32::from(x) - 127.5) / 127.5;
            assert_eq!(table[1][usize::from(x)].to_bits(), want.to_bits());
        }
    }
}
