//! The AVX2 and FMA statement of the Q8_0 product ([`crate::Isa::Avx2`]): the same tiles as the
//! AVX-512 kernel ([`super::avx512`]), each tile's 16 rows in two registers of 8, with
//! `vpmaddubsw` on the weights' magnitudes and the signs moved onto the inputs, as ggml does on
//! AVX2.

use std::arch::x86_64::*;

use super::{Acts, Tile, QK, TILE};

/// Input rows per kernel call. 4 rows x 2 register halves x (accumulator + block dot) is all
/// 16 of AVX2's registers, so some spill; still ~10% faster than 2 rows on 64-row products
/// (`examples/speed.rs`), as each weight load serves more rows.
const ROWS: usize = 4;

/// [`super::quantize_block`] on AVX2, with the rounding of the AVX-512 statement
/// ([`super::avx512::quantize_block`]): `t + sign` where `t = trunc(y)` and `|y - t| >= 0.5`,
/// clamped to the i8 range. Equal to the portable code for every finite input.
///
/// # Safety
/// AVX2 and FMA; `xs` and `qs` hold 32 values each.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, i32) {
    debug_assert!(xs.len() == QK && qs.len() == QK);
    let abs = |v: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
    // SAFETY: 32 values (checked by the caller).
    let v: [__m256; 4] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xs.as_ptr().add(8 * i)) });
    let m = _mm256_max_ps(
        _mm256_max_ps(abs(v[0]), abs(v[1])),
        _mm256_max_ps(abs(v[2]), abs(v[3])),
    );
    let mut lanes = [0f32; 8];
    // SAFETY: 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i32; QK];
    for (i, &v) in v.iter().enumerate() {
        let y = _mm256_mul_ps(v, _mm256_set1_ps(id));
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
        let away = _mm256_cmp_ps::<_CMP_GE_OQ>(abs(_mm256_sub_ps(y, t)), _mm256_set1_ps(0.5));
        let sign = _mm256_or_ps(_mm256_and_ps(y, _mm256_set1_ps(-0.0)), _mm256_set1_ps(1.0));
        let r = _mm256_add_ps(t, _mm256_and_ps(away, sign));
        let r = _mm256_min_ps(
            _mm256_max_ps(r, _mm256_set1_ps(-128.0)),
            _mm256_set1_ps(127.0),
        );
        // SAFETY: 8 of the 32 i32s.
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().add(8 * i).cast(), _mm256_cvtps_epi32(r)) };
    }
    let mut sum = 0;
    for (o, &q) in qs.iter_mut().zip(&q) {
        *o = q as i8;
        sum += q;
    }
    (d, sum)
}

/// As [`super::avx512::tile_rows`], on AVX2.
///
/// # Safety
/// AVX2 and FMA; no weight in `tiles` is -128; otherwise as [`super::avx512::tile_rows`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tile_rows(
    tiles: &[Tile],
    count: usize,
    acts: &Acts,
    m: usize,
    out: *mut f32,
    ldo: usize,
) {
    let kb = tiles.len() / count;
    let mut t = 0;
    while t < count {
        let tile_rows = if m == 1 && count - t >= 2 { 2 } else { 1 };
        let tiles = &tiles[t * kb..(t + tile_rows) * kb];
        // SAFETY: column offset `16 t` stays within the caller's `16 count` columns.
        let out = unsafe { out.add(t * TILE) };
        let mut row = 0;
        while row < m {
            let r = (m - row).min(ROWS);
            // SAFETY: rows `row..row + r` exist; forwarded from the caller.
            unsafe {
                match (tile_rows, r) {
                    (2, _) => kernel::<2, 1>(tiles, kb, acts, row, out, ldo),
                    (_, 4) => kernel::<1, 4>(tiles, kb, acts, row, out, ldo),
                    (_, 3) => kernel::<1, 3>(tiles, kb, acts, row, out, ldo),
                    (_, 2) => kernel::<1, 2>(tiles, kb, acts, row, out, ldo),
                    _ => kernel::<1, 1>(tiles, kb, acts, row, out, ldo),
                }
            }
            row += r;
        }
        t += tile_rows;
    }
}

/// `T` tile rows against input rows `row0..row0 + R`. Each 64-byte group of a tile is two
/// registers (rows 0-7 and 8-15), 4 weights of each row per 32-bit lane. The weights are
/// stored `+ 128`; flipping the top bit gives them back signed. `vpmaddubsw` multiplies
/// unsigned by signed bytes, so it takes `|x|` and the weights with `x`'s signs (`vpsignb`):
/// pairs of products stay within i16 (2 x 127 x 127), and `vpmaddwd` by 1 sums each lane's 4.
/// That is the block's exact integer dot product, so the f32 arithmetic after it is the
/// portable code's, bit for bit.
///
/// # Safety
/// As [`tile_rows`], for `T` tile rows and input rows `row0..row0 + R`.
#[target_feature(enable = "avx2,fma")]
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
    let flip = _mm256_set1_epi8(i8::MIN);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[[_mm256_setzero_ps(); 2]; R]; T];
    for b in 0..kb {
        let mut dot = [[[_mm256_setzero_si256(); 2]; R]; T];
        for g in 0..QK / 4 {
            let mut xs = [_mm256_setzero_si256(); R];
            let mut ax = [_mm256_setzero_si256(); R];
            for r in 0..R {
                // SAFETY: 4 quants of input row `row0 + r`, block `b`, group `g`.
                let x = unsafe {
                    xq.add((row0 + r) * k + b * QK + g * 4)
                        .cast::<i32>()
                        .read_unaligned()
                };
                xs[r] = _mm256_set1_epi32(x);
                ax[r] = _mm256_sign_epi8(xs[r], xs[r]);
            }
            for (t, dot) in dot.iter_mut().enumerate() {
                for h in 0..2 {
                    // SAFETY: tile `t * kb + b` exists; 32 aligned bytes at group `g`,
                    // half `h`.
                    let w = unsafe {
                        _mm256_load_si256(tiles[t * kb + b].qs.as_ptr().add(g * 64 + h * 32).cast())
                    };
                    let w = _mm256_xor_si256(w, flip);
                    for (r, dot) in dot.iter_mut().enumerate() {
                        let p = _mm256_maddubs_epi16(ax[r], _mm256_sign_epi8(w, xs[r]));
                        dot[h] = _mm256_add_epi32(dot[h], _mm256_madd_epi16(p, ones));
                    }
                }
            }
        }
        for (t, (acc, dot)) in acc.iter_mut().zip(&dot).enumerate() {
            let d = tiles[t * kb + b].d.as_ptr();
            // SAFETY: 16 aligned scales of tile `t * kb + b`.
            let dw = unsafe { [_mm256_load_ps(d), _mm256_load_ps(d.add(8))] };
            for (r, (acc, dot)) in acc.iter_mut().zip(dot).enumerate() {
                let dx = _mm256_set1_ps(acts.d[(row0 + r) * kb + b]);
                for h in 0..2 {
                    let scale = _mm256_mul_ps(dw[h], dx);
                    acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h]), scale, acc[h]);
                }
            }
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        for (r, acc) in acc.iter().enumerate() {
            for (h, acc) in acc.iter().enumerate() {
                // SAFETY: row `row0 + r`, columns `16 t + 8 h..+ 8` of the caller's block.
                unsafe { _mm256_storeu_ps(out.add((row0 + r) * ldo + t * TILE + h * 8), *acc) };
            }
        }
    }
}
