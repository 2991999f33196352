//! Inline images are checked at the edge, before a note reaches the queue: the format is sniffed
//! from the bytes, the dimensions are read from the header and checked against the limits before
//! any pixel buffer exists (a decompression bomb costs a header read), and then the image is
//! decoded under the `image` crate's allocation limits, so corrupt and truncated files are refused
//! with the field named instead of failing later inside the model.

use std::{io::Cursor, sync::OnceLock};

use image::{ImageDecoder, ImageFormat, ImageReader};
use tokio::sync::Semaphore;

use crate::{
    domain::error::Error,
    domain::Limits,
    domain::{ImageRef, Note},
    model::qwen3vl::image_proc::{self, ProcessedImage, ProcessorConfig},
};

/// What an accepted image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `png`, `jpeg`, `webp` or `gif`.
    pub format: &'static str,
    /// Width (pixels).
    pub width: u32,
    /// Height (pixels).
    pub height: u32,
}

fn format_name(f: ImageFormat) -> Option<&'static str> {
    match f {
        ImageFormat::Png => Some("png"),
        ImageFormat::Jpeg => Some("jpeg"),
        ImageFormat::WebP => Some("webp"),
        ImageFormat::Gif => Some("gif"),
        _ => None,
    }
}

/// Checks one inline image (`field` names it in errors) and decodes it fully under limits.
pub fn check(field: &str, bytes: &[u8], limits: &Limits) -> Result<ImageInfo, Error> {
    let bad = |reason: String| Error::invalid(field, reason);
    let (image_format, format) = image::guess_format(bytes)
        .ok()
        .and_then(|f| format_name(f).map(|name| (f, name)))
        .ok_or_else(|| bad("is not a PNG, JPEG, WebP or GIF image".into()))?;
    let mut reader = ImageReader::new(Cursor::new(bytes));
    reader.set_format(image_format);
    // Sides and pixels are checked below with messages that name the limit; the allocation cap
    // backs them up inside the decoders. The largest legitimate buffer is 16-bit RGBA at the
    // pixel limit; decoders get a little more for their own state.
    let mut lim = image::Limits::default();
    lim.max_alloc = Some(limits.max_image_pixels.saturating_mul(8) + (16 << 20));
    reader.limits(lim);
    let decoder = reader.into_decoder().map_err(|e| {
        bad(format!(
            "cannot be read as {format}: {}",
            e.to_string().trim()
        ))
    })?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(bad(format!("has no pixels ({width}x{height})")));
    }
    if width > limits.max_image_side || height > limits.max_image_side {
        return Err(bad(format!(
            "is {width}x{height} pixels, over the limit of {} per side",
            limits.max_image_side
        )));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_image_pixels {
        return Err(bad(format!(
            "is {width}x{height} = {pixels} pixels, over the limit of {}",
            limits.max_image_pixels
        )));
    }
    image::DynamicImage::from_decoder(decoder).map_err(|e| {
        bad(format!(
            "cannot be decoded as {format}: {}",
            e.to_string().trim()
        ))
    })?;
    Ok(ImageInfo {
        format,
        width,
        height,
    })
}

/// Checks every inline image of `note`, in order; the first bad one is the error.
pub fn check_note(note: &Note, limits: &Limits) -> Result<Vec<ImageInfo>, Error> {
    note.images
        .iter()
        .enumerate()
        .filter_map(|(i, img)| match img {
            ImageRef::Bytes(b) => Some((i, b)),
            ImageRef::Uri(_) => None,
        })
        .map(|(i, b)| check(&format!("note.images[{i}].data"), b, limits))
        .collect()
}

/// Decodes at once: one per core, so a burst of large images queues instead of holding many
/// full-size pixel buffers.
fn decode_permits() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| {
        Semaphore::new(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        )
    })
}

/// [`check_note`] on the blocking pool (decoding is CPU work), at most one decode per core. Takes
/// and gives back the note, so its image bytes are never copied.
pub async fn check_note_blocking(
    note: Note,
    limits: &Limits,
) -> Result<(Note, Vec<ImageInfo>), Error> {
    if !note.images.iter().any(|i| matches!(i, ImageRef::Bytes(_))) {
        return Ok((note, Vec::new()));
    }
    let _permit = decode_permits().acquire().await.map_err(Error::internal)?;
    let limits = limits.clone();
    tokio::task::spawn_blocking(move || check_note(&note, &limits).map(|infos| (note, infos)))
        .await
        .map_err(Error::internal)?
}

/// Turns a note's inline images into vision-tower input for a multimodal model: each is decoded
/// (EXIF orientation applied, alpha composited over white, under the same allocation cap as
/// [`check`]), resized and normalised as the model's processor does. Runs on the blocking pool,
/// one image decode per core. URIs are not fetched (no network at run time): they are skipped.
pub async fn preprocess_note(
    note: &Note,
    processor: std::sync::Arc<ProcessorConfig>,
    limits: &Limits,
) -> Result<Vec<ProcessedImage>, Error> {
    let inline: Vec<(usize, Vec<u8>)> = note
        .images
        .iter()
        .enumerate()
        .filter_map(|(i, img)| match img {
            ImageRef::Bytes(b) => Some((i, b.clone())),
            ImageRef::Uri(_) => None,
        })
        .collect();
    if inline.is_empty() {
        return Ok(Vec::new());
    }
    let _permit = decode_permits().acquire().await.map_err(Error::internal)?;
    let max_alloc = limits.max_image_pixels.saturating_mul(8) + (16 << 20);
    tokio::task::spawn_blocking(move || {
        inline
            .iter()
            .map(|(i, bytes)| {
                let mut lim = image::Limits::default();
                lim.max_alloc = Some(max_alloc);
                let field = format!("note.images[{i}].data");
                let rgb = image_proc::decode_rgb(bytes, lim)
                    .map_err(|e| Error::invalid(&field, e.to_string()))?;
                image_proc::preprocess(&rgb, &processor)
                    .map_err(|e| Error::invalid(&field, e.to_string()))
            })
            .collect()
    })
    .await
    .map_err(Error::internal)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn accepts_a_small_png_and_names_the_field_otherwise() {
        let l = Limits::default();
        let info = check("f", &png(7, 5), &l).unwrap();
        assert_eq!((info.format, info.width, info.height), ("png", 7, 5));
        let err = check("note.images[2].data", b"GIF87a?", &l).unwrap_err();
        assert!(err.to_string().starts_with("note.images[2].data"), "{err}");
        let err = check("f", b"hello", &l).unwrap_err().to_string();
        assert!(err.contains("not a PNG, JPEG, WebP or GIF"), "{err}");
        let mut truncated = png(64, 64);
        truncated.truncate(truncated.len() / 2);
        let err = check("f", &truncated, &l).unwrap_err().to_string();
        assert!(err.contains("cannot be"), "{err}");
    }

    #[test]
    fn pixel_limits_come_from_the_header() {
        let l = Limits {
            max_image_pixels: 100,
            max_image_side: 50,
            ..Limits::default()
        };
        let err = check("f", &png(11, 10), &l).unwrap_err().to_string();
        assert!(
            err.contains("11x10 = 110 pixels, over the limit of 100"),
            "{err}"
        );
        let err = check("f", &png(51, 1), &l).unwrap_err().to_string();
        assert!(err.contains("over the limit of 50 per side"), "{err}");
    }
}
