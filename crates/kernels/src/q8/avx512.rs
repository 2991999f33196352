//! The AVX-512 F/BW/VNNI statement of the Q8_0 product: [`quantize_block`] for the input rows and
//! [`tile_rows`], one `vpdpbusd` per 4 inputs of a tile's 16 rows ([`crate::Isa::Avx512Vnni`]).

use std::arch::x86_64::*;

use super::{Acts, Tile, QK, TILE};

/// [`super::quantize_block`] on 32 values at once. Rounding half away from zero is `t + sign`
/// where `t = trunc(y)` and `|y - t| >= 0.5` (`y - t` is exact), and values are clamped to
/// the i8 range before narrowing, as `as i8` saturates: equal for every finite input.
///
/// # Safety
/// AVX-512 F/BW; `xs` and `qs` hold 32 values each.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, i32) {
    debug_assert!(xs.len() == QK && qs.len() == QK);
    // SAFETY: 32 values (checked by the caller).
    let (a, b) = unsafe {
        (
            _mm512_loadu_ps(xs.as_ptr()),
            _mm512_loadu_ps(xs.as_ptr().add(16)),
        )
    };
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let round = |v: __m512| {
        let y = _mm512_mul_ps(v, _mm512_set1_ps(id));
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(
            _mm512_abs_ps(_mm512_sub_ps(y, t)),
            _mm512_set1_ps(0.5),
        );
        let sign = _mm512_or_ps(_mm512_and_ps(y, _mm512_set1_ps(-0.0)), _mm512_set1_ps(1.0));
        let r = _mm512_mask_add_ps(t, away, t, sign);
        let r = _mm512_min_ps(
            _mm512_max_ps(r, _mm512_set1_ps(-128.0)),
            _mm512_set1_ps(127.0),
        );
        _mm512_cvtps_epi32(r)
    };
    let (qa, qb) = (round(a), round(b));
    // SAFETY: 32 bytes of `qs`, 16 from each vector.
    unsafe {
        _mm_storeu_si128(qs.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128(qs.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi8(qb));
    }
    (d, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)))
}

/// Rows of input at a time against one tile row (16 int + 16 float accumulators).
const ROWS: usize = 8;

/// Computes columns `16 t0 .. 16 (t0 + count)` of all `m` rows into `out` (which points at
/// column `16 t0` of row 0 of a `[m, ldo]` matrix), `tiles` holding those `count` tile rows.
///
/// # Safety
/// AVX-512 F/BW/VNNI; `tiles.len() == count * kb`; `acts` has `m` rows of `32 kb` values;
/// `out` is valid for writes of the `m` rows by `16 count` columns at stride `ldo`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile_rows(
    tiles: &[Tile],
    count: usize,
    acts: &Acts,
    m: usize,
    out: *mut f32,
    ldo: usize,
) {
    let kb = tiles.len() / count;
    if m == 1 && count == 4 {
        // SAFETY: forwarded from the caller.
        unsafe { kernel::<4, 1>(tiles, kb, acts, 0, out, ldo) };
        return;
    }
    for t in 0..count {
        let tiles = &tiles[t * kb..(t + 1) * kb];
        // SAFETY: column offset `16 t` stays within the caller's `16 count` columns.
        let out = unsafe { out.add(t * TILE) };
        let mut row = 0;
        while row < m {
            let r = (m - row).min(ROWS);
            // SAFETY: rows `row..row + r` exist; forwarded from the caller.
            unsafe {
                match r {
                    8 => kernel::<1, 8>(tiles, kb, acts, row, out, ldo),
                    7 => kernel::<1, 7>(tiles, kb, acts, row, out, ldo),
                    6 => kernel::<1, 6>(tiles, kb, acts, row, out, ldo),
                    5 => kernel::<1, 5>(tiles, kb, acts, row, out, ldo),
                    4 => kernel::<1, 4>(tiles, kb, acts, row, out, ldo),
                    3 => kernel::<1, 3>(tiles, kb, acts, row, out, ldo),
                    2 => kernel::<1, 2>(tiles, kb, acts, row, out, ldo),
                    _ => kernel::<1, 1>(tiles, kb, acts, row, out, ldo),
                }
            }
            row += r;
        }
    }
}

/// `T` tile rows (`tiles[t * kb + b]`) against input rows `row0..row0 + R`.
///
/// # Safety
/// As [`tile_rows`], for `T` tile rows and input rows `row0..row0 + R`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel<const T: usize, const R: usize>(
    tiles: &[Tile],
    kb: usize,
    acts: &Acts,
    row0: usize,
    out: *mut f32,
    ldo: usize,
) {
    let k = kb * QK;
    let xq = acts.qs.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); R]; T];
    for b in 0..kb {
        let mut dot = [[_mm512_setzero_si512(); R]; T];
        for g in 0..QK / 4 {
            for (t, dot) in dot.iter_mut().enumerate() {
                // SAFETY: tile `t * kb + b` exists; 64 aligned bytes at group `g`.
                let w =
                    unsafe { _mm512_load_si512(tiles[t * kb + b].qs.as_ptr().add(g * 64).cast()) };
                for (r, dot) in dot.iter_mut().enumerate() {
                    // SAFETY: 4 quants of input row `row0 + r`, block `b`, group `g`.
                    let x = unsafe {
                        xq.add((row0 + r) * k + b * QK + g * 4)
                            .cast::<i32>()
                            .read_unaligned()
                    };
                    *dot = _mm512_dpbusd_epi32(*dot, w, _mm512_set1_epi32(x));
                }
            }
        }
        for (t, (acc, dot)) in acc.iter_mut().zip(&dot).enumerate() {
            // SAFETY: 16 aligned scales of tile `t * kb + b`.
            let dw = unsafe { _mm512_load_ps(tiles[t * kb + b].d.as_ptr()) };
            for (r, (acc, dot)) in acc.iter_mut().zip(dot).enumerate() {
                let a = (row0 + r) * kb + b;
                let dot = _mm512_sub_epi32(*dot, _mm512_set1_epi32(128 * acts.sum[a]));
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(acts.d[a]));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *acc);
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: row `row0 + r`, columns `16 t..16 t + 16` of the caller's block.
            unsafe { _mm512_storeu_ps(out.add((row0 + r) * ldo + t * TILE), *acc) };
        }
    }
}
