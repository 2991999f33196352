//! The resize of step 2: torch's CPU kernel for `interpolate(mode="bicubic", antialias=True)` on
//! `uint8` input (a port of Pillow's `ImagingResample`), bit for bit.

use std::borrow::Cow;

use image::RgbImage;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_are_identity_at_scale_one() {
        let taps = AxisTaps::new(7, 7);
        for i in 0..7 {
            assert_eq!(taps.apply(i, |j| (j * 30) as u8), (i * 30) as u8);
        }
    }
}
