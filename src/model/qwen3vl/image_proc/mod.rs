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

use std::borrow::Cow;
use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use serde::Deserialize;

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

/// Keys' cubic convolution kernel with `a = -0.5`, evaluated as torch writes it.
fn keys_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps for one axis: for output `i`, input pixels
/// `start[i] .. start[i] + len[i]` weighted by `coeffs[i * stride ..]`, scaled by
/// `2^precision`.
struct AxisTaps {
    start: Vec<usize>,
    len: Vec<usize>,
    coeffs: Vec<i16>,
    stride: usize,
    precision: u32,
}

impl AxisTaps {
    /// Torch's `_compute_index_ranges_int16_weights` for bicubic with antialias.
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
        let stride = support.ceil() as usize * 2 + 1;
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };

        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut weights = vec![0.0f64; out_size * stride];
        let mut wt_max = 0.0f64;
        for i in 0..out_size {
            let center = scale * (i as f64 + 0.5);
            // `as i64` truncates toward zero like the C++ cast.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xsize = ((center + support + 0.5) as i64)
                .min(in_size as i64)
                .saturating_sub(xmin)
                .clamp(0, stride as i64);
            let (xmin, xsize) = (xmin as usize, xsize as usize);
            let w = &mut weights[i * stride..i * stride + xsize];
            let mut total = 0.0f64;
            for (j, wj) in w.iter_mut().enumerate() {
                *wj = keys_cubic(((j + xmin) as f64 - center + 0.5) * invscale);
                total += *wj;
            }
            if total != 0.0 {
                for wj in w.iter_mut() {
                    *wj /= total;
                    wt_max = wt_max.max(*wj);
                }
            }
            start.push(xmin);
            len.push(xsize);
        }

        // The largest precision (at most 22) for which the largest weight, doubled, still fits
        // in 15 bits.
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + wt_max * f64::from(1i32 << (precision + 1))) as i32;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        let unit = f64::from(1i32 << precision);
        let coeffs = weights
            .iter()
            .map(|&w| {
                let v = w * unit;
                let rounded = if v < 0.0 {
                    (-0.5 + v) as i32
                } else {
                    (0.5 + v) as i32
                };
                rounded as i16
            })
            .collect();
        Self {
            start,
            len,
            coeffs,
            stride,
            precision,
        }
    }

    /// Applies output tap `i` to `n` samples reached by `sample(input_index)`, with torch's
    /// rounding (`+ 2^(p-1)`, arithmetic shift) and clamping to `u8`.
    #[inline]
    fn apply(&self, i: usize, sample: impl Fn(usize) -> u8) -> u8 {
        let k = &self.coeffs[i * self.stride..i * self.stride + self.len[i]];
        let mut acc: i32 = 1 << (self.precision - 1);
        for (j, &kj) in k.iter().enumerate() {
            acc =
                acc.wrapping_add(i32::from(sample(self.start[i] + j)).wrapping_mul(i32::from(kj)));
        }
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// Resizes with torch's CPU `uint8` kernel for `interpolate(mode="bicubic", antialias=True,
/// align_corners=False)`, bit for bit.
///
/// Torch runs this through `upsample_avx_bilinear_bicubic_uint8` on AVX2 builds and through
/// `separable_upsample_generic_Nd_kernel_impl` otherwise; both do the same integer arithmetic.
/// An axis whose size is unchanged is skipped, as torch skips it.
///
/// # Panics
///
/// Panics if the source image or the requested size has a side of zero pixels.
pub fn resize_bicubic_antialias(src: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let (in_w, in_h) = src.dimensions();
    assert!(
        in_w > 0 && in_h > 0 && out_w > 0 && out_h > 0,
        "resize from {in_w}x{in_h} to {out_w}x{out_h}: every side must be at least 1 pixel"
    );
    if (in_w, in_h) == (out_w, out_h) {
        return src.clone();
    }
    let (in_w, in_h, ow, oh) = (in_w as usize, in_h as usize, out_w as usize, out_h as usize);

    // Horizontal pass: in_h rows of ow pixels.
    let horizontal: Cow<'_, [u8]> = if ow == in_w {
        Cow::Borrowed(src.as_raw().as_slice())
    } else {
        let taps = AxisTaps::new(in_w, ow);
        let input = src.as_raw();
        let mut out = vec![0u8; in_h * ow * 3];
        for (in_row, out_row) in input
            .chunks_exact(in_w * 3)
            .zip(out.chunks_exact_mut(ow * 3))
        {
            for (x, px) in out_row.chunks_exact_mut(3).enumerate() {
                for (c, v) in px.iter_mut().enumerate() {
                    *v = taps.apply(x, |j| in_row[j * 3 + c]);
                }
            }
        }
        Cow::Owned(out)
    };

    // Vertical pass: oh rows of ow pixels.
    let pixels = if oh == in_h {
        horizontal.into_owned()
    } else {
        let taps = AxisTaps::new(in_h, oh);
        let row_len = ow * 3;
        let mut out = vec![0u8; oh * row_len];
        for (y, out_row) in out.chunks_exact_mut(row_len).enumerate() {
            for (x, v) in out_row.iter_mut().enumerate() {
                *v = taps.apply(y, |j| horizontal[j * row_len + x]);
            }
        }
        out
    };
    RgbImage::from_raw(out_w, out_h, pixels).expect("buffer length matches the output size")
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

/// Pillow's `SHIFTFORDIV255`: `a / 255` for the ranges used below.
#[inline]
fn shift_div_255(a: u32) -> u32 {
    ((a >> 8) + a) >> 8
}

/// One channel of Pillow's `alpha_composite(opaque white, (v, alpha))`, step by step.
#[inline]
fn over_white(v: u8, alpha: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    const DST: u32 = 255;
    const DST_ALPHA: u32 = 255;
    if alpha == 0 {
        return DST as u8;
    }
    let (v, a) = (u32::from(v), u32::from(alpha));
    let blend = DST_ALPHA * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = v * coef1 + DST * coef2;
    (shift_div_255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
}

/// Converts a decoded image to RGB8 as transformers' `convert_to_rgb` does through Pillow.
///
/// 16-bit samples keep their high byte, as Pillow's PNG reader does for RGB, RGBA and LA. For
/// 16-bit grayscale Pillow opens mode `I;16` and its RGB conversion clips every value above
/// 255 to white; this function keeps the high byte there too, so such images differ from HF.
fn to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let hi = |v: u16| (v >> 8) as u8;
    let from_fn =
        |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma8(l) => from_fn(&|x, y| [l.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageLumaA8(la) => from_fn(&|x, y| {
            let [v, a] = la.get_pixel(x, y).0;
            [over_white(v, a); 3]
        }),
        DynamicImage::ImageRgba8(rgba) => from_fn(&|x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0;
            [over_white(r, a), over_white(g, a), over_white(b, a)]
        }),
        DynamicImage::ImageLuma16(l) => from_fn(&|x, y| [hi(l.get_pixel(x, y).0[0]); 3]),
        DynamicImage::ImageLumaA16(la) => from_fn(&|x, y| {
            let [v, a] = la.get_pixel(x, y).0;
            [over_white(hi(v), hi(a)); 3]
        }),
        DynamicImage::ImageRgb16(rgb) => from_fn(&|x, y| rgb.get_pixel(x, y).0.map(hi)),
        DynamicImage::ImageRgba16(rgba) => from_fn(&|x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0.map(hi);
            [over_white(r, a), over_white(g, a), over_white(b, a)]
        }),
        other => {
            let rgba = other.to_rgba8();
            from_fn(&|x, y| {
                let [r, g, b, a] = rgba.get_pixel(x, y).0;
                [over_white(r, a), over_white(g, a), over_white(b, a)]
            })
        }
    }
}

/// Wraps a decoder error that hit `limits`, naming them.
fn limits_error(limits: &Limits, source: image::ImageError) -> ImageProcError {
    let side = |v: Option<u32>| v.map_or_else(|| "any".to_owned(), |v| v.to_string());
    let alloc = limits
        .max_alloc
        .map_or_else(|| "unlimited".to_owned(), |v| format!("{v} bytes"));
    ImageProcError::Limits {
        limits: format!(
            "at most {}x{} pixels, allocations {}",
            side(limits.max_image_width),
            side(limits.max_image_height),
            alloc
        ),
        source: Box::new(source),
    }
}

/// Decodes PNG, JPEG, WebP or GIF bytes (first frame) to RGB8 as HF sees a PIL image.
///
/// The EXIF orientation is applied (as `PIL.ImageOps.exif_transpose`); transparency (an alpha
/// channel, a `tRNS` chunk, a GIF transparent index) is composited onto opaque white with
/// Pillow's integer `alpha_composite`, as transformers' `convert_to_rgb` does; grayscale and
/// palettes are expanded; CMYK JPEGs are converted to RGB. 16-bit samples keep their high byte,
/// as Pillow does for RGB, RGBA and gray+alpha; for plain 16-bit grayscale Pillow instead clips
/// at 255 (most such images turn white in HF), and this function keeps the high byte.
///
/// `limits` bounds the image dimensions and the bytes decoding may allocate (the decoded image
/// in its own pixel format, and the decoders' working buffers), so decompression bombs fail
/// with [`ImageProcError::Limits`] before pixels are allocated; the RGB8 result, at most the
/// decoded size, is not charged. JPEG pixels can differ slightly from Pillow's libjpeg-turbo
/// (rounding, and chroma at the right and bottom edges of subsampled images).
pub fn decode_rgb(bytes: &[u8], limits: Limits) -> Result<RgbImage, ImageProcError> {
    let map = |e: image::ImageError| match e {
        image::ImageError::Limits(_) => limits_error(&limits, e),
        image::ImageError::Unsupported(_) => ImageProcError::UnsupportedFormat,
        other => ImageProcError::Decode(Box::new(other)),
    };
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageProcError::Decode(Box::new(e.into())))?;
    if reader.format().is_none() {
        return Err(ImageProcError::UnsupportedFormat);
    }
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder().map_err(map)?;

    // The decoder's own buffers are bounded by the limits it was given; the decoded image is
    // charged here, as `ImageReader::decode` does.
    let mut budget = limits.clone();
    budget.reserve(decoder.total_bytes()).map_err(map)?;

    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let decoded = DynamicImage::from_decoder(decoder).map_err(map)?;
    let rgb = to_rgb_like_pil(decoded);
    if orientation == Orientation::NoTransforms {
        return Ok(rgb);
    }
    let mut oriented = DynamicImage::ImageRgb8(rgb);
    oriented.apply_orientation(orientation);
    Ok(oriented.into_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_white_is_identity_when_opaque_and_white_when_clear() {
        for v in 0..=255u8 {
            assert_eq!(over_white(v, 255), v);
            assert_eq!(over_white(v, 0), 255);
        }
    }

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

    #[test]
    fn taps_are_identity_at_scale_one() {
        let taps = AxisTaps::new(7, 7);
        for i in 0..7 {
            assert_eq!(taps.apply(i, |j| (j * 30) as u8), (i * 30) as u8);
        }
    }
}
