//! Encoded bytes -> the RGB image HF sees when a PIL image goes through `convert_to_rgb`: EXIF
//! orientation applied, transparency composited onto white with Pillow's integer arithmetic,
//! decoding under the caller's memory limits.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

use super::ImageProcError;

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
}
