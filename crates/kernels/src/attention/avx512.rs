//! The AVX-512 F statement of attention: one decode row ([`attend_row`]) and a prefill's blocks
//! of up to 8 rows ([`prefill_chunk`]: [`score_rows`], then [`softmax_values`] per row).

use std::arch::x86_64::*;

/// [`super::attend_row`] on AVX-512: the query in up to 8 registers, one key row per
/// 4-16 FMAs and a horizontal sum, `exp` as a degree-6 polynomial (about 1 ulp), the values'
/// weighted sum in registers, one division at the end.
///
/// # Safety
/// AVX-512 F; `q.len() == out.len() == hd`, `hd` a multiple of 16 up to 128; `keys` and
/// `vals` hold `n` rows of `hd`; `scores.len() >= n` rounded up to 16.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn attend_row(
    q: &[f32],
    keys: &[f32],
    vals: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let c = hd / 16;
    let n = keys.len() / hd;
    let (kp, sp) = (keys.as_ptr(), scores.as_mut_ptr());
    let mut qv = [_mm512_setzero_ps(); 8];
    for (t, qv) in qv.iter_mut().enumerate().take(c) {
        // SAFETY: 16 values of `q` at `16 t < hd`.
        *qv = unsafe { _mm512_loadu_ps(q.as_ptr().add(16 * t)) };
    }
    let mut max = f32::NEG_INFINITY;
    for j in 0..n {
        // SAFETY: key row `j < n`, chunks `16 t < hd`.
        let mut acc = unsafe { _mm512_mul_ps(qv[0], _mm512_loadu_ps(kp.add(j * hd))) };
        for (t, qv) in qv.iter().enumerate().take(c).skip(1) {
            acc = unsafe { _mm512_fmadd_ps(*qv, _mm512_loadu_ps(kp.add(j * hd + 16 * t)), acc) };
        }
        let s = _mm512_reduce_add_ps(acc) * scale;
        max = max.max(s);
        // SAFETY: `j < n <= scores.len()`.
        unsafe { *sp.add(j) = s };
    }
    // SAFETY: forwarded from the caller.
    unsafe { softmax_values(scores, n, max, vals, out) };
}

/// The second half of a row's attention: `scores[..n]` (whose maximum is `max`) become
/// `exp(s - max)`, and `out` the values' sum weighted by them over their sum.
///
/// # Safety
/// AVX-512 F; `out.len() == hd`, a multiple of 16 up to 128; `vals` holds at least `n` rows
/// of `hd`; `scores.len() >= n` rounded up to 16.
#[target_feature(enable = "avx512f")]
unsafe fn softmax_values(scores: &mut [f32], n: usize, max: f32, vals: &[f32], out: &mut [f32]) {
    let hd = out.len();
    let c = hd / 16;
    let (vp, sp) = (vals.as_ptr(), scores.as_mut_ptr());
    let (maxv, mut sumv) = (_mm512_set1_ps(max), _mm512_setzero_ps());
    let mut j = 0;
    while j < n {
        // The last chunk is masked to the `n - j` scores that exist.
        let live: __mmask16 = if n - j >= 16 {
            0xffff
        } else {
            (1u16 << (n - j)) - 1
        };
        // SAFETY: `scores` holds `n` rounded up to 16.
        let s = unsafe { _mm512_loadu_ps(sp.add(j)) };
        let e = _mm512_maskz_mov_ps(live, exp(_mm512_sub_ps(s, maxv)));
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(sp.add(j), e) };
        sumv = _mm512_add_ps(sumv, e);
        j += 16;
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sumv));
    let mut acc = [_mm512_setzero_ps(); 8];
    for j in 0..n {
        // SAFETY: score `j < n`; value row `j`, chunks `16 t < hd`.
        let p = _mm512_set1_ps(unsafe { *sp.add(j) });
        for (t, acc) in acc.iter_mut().enumerate().take(c) {
            *acc = unsafe { _mm512_fmadd_ps(p, _mm512_loadu_ps(vp.add(j * hd + 16 * t)), *acc) };
        }
    }
    for (t, acc) in acc.iter().enumerate().take(c) {
        // SAFETY: 16 values of `out` at `16 t < hd`.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * t), _mm512_mul_ps(*acc, inv)) };
    }
}

/// Scores of `R` query rows against keys `0..n` stored transposed in blocks of 16
/// (`kt[d * stride + j]`, `stride` a multiple of 16 covering `n`), times `scale`, into
/// `scores[r * stride + j]`; returns each row's maximum over its first `live[r]` keys.
/// Each row's value is `fma` over `d` in order, the same whatever `R` is.
///
/// # Safety
/// AVX-512 F; `q[r]` holds `hd` values; `kt` holds `hd * stride`; `scores` `R * stride`;
/// `live[r] <= n <= stride`.
#[target_feature(enable = "avx512f")]
unsafe fn score_rows<const R: usize>(
    q: [&[f32]; R],
    kt: &[f32],
    stride: usize,
    n: usize,
    live: [usize; R],
    scale: f32,
    scores: &mut [f32],
) -> [f32; R] {
    let hd = q[0].len();
    let (kp, sp) = (kt.as_ptr(), scores.as_mut_ptr());
    let scalev = _mm512_set1_ps(scale);
    let mut max = [f32::NEG_INFINITY; R];
    let mut jb = 0;
    while jb < n {
        let mut acc = [_mm512_setzero_ps(); R];
        for d in 0..hd {
            // SAFETY: `d < hd`, `jb + 16 <= stride`.
            let k = unsafe { _mm512_loadu_ps(kp.add(d * stride + jb)) };
            for (acc, q) in acc.iter_mut().zip(&q) {
                // SAFETY: `d < hd = q.len()`.
                let x = _mm512_set1_ps(unsafe { *q.get_unchecked(d) });
                *acc = _mm512_fmadd_ps(x, k, *acc);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let s = _mm512_mul_ps(*acc, scalev);
            // SAFETY: row `r`, keys `jb..jb + 16` within `stride`.
            unsafe { _mm512_storeu_ps(sp.add(r * stride + jb), s) };
            let valid = live[r].saturating_sub(jb).min(16);
            if valid > 0 {
                let m: __mmask16 = if valid == 16 {
                    0xffff
                } else {
                    (1u16 << valid) - 1
                };
                let v = _mm512_mask_reduce_max_ps(m, s);
                max[r] = max[r].max(v);
            }
        }
        jb += 16;
    }
    max
}

/// `e^x` for 16 lanes: `x = k ln2 + r` (`|r| <= ln2 / 2`, ln2 in two parts), a degree-6
/// Taylor polynomial in `r` (relative error below 2e-7), then `scalef` by `2^k`. Inputs
/// below -104 give 0, as `expf` does in f32.
#[target_feature(enable = "avx512f")]
fn exp(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
    let x = _mm512_min_ps(x, _mm512_set1_ps(88.7));
    let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693_145_75), x);
    let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, k)
}

/// Up to 8 rows `(head, position)` of [`super::prefill_attention`]: scores, then softmax and
/// values.
///
/// # Safety
/// As the call site in [`super::prefill_attention`] states.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn prefill_chunk(
    q: &[f32],
    rows: usize,
    at: usize,
    past: usize,
    hd: usize,
    chunk: &[(usize, usize)],
    ktg: &[f32],
    stride: usize,
    vals: &[f32],
    scale: f32,
    scores: &mut [f32],
    out_addr: usize,
    heads: usize,
) {
    let qrow = |&(h, i): &(usize, usize)| &q[(h * rows + at + i) * hd..][..hd];
    let live = |&(_, i): &(usize, usize)| past + i + 1;
    let n = chunk.iter().map(live).max().unwrap_or(0);
    macro_rules! rows {
        ($r:literal) => {{
            let q: [&[f32]; $r] = std::array::from_fn(|r| qrow(&chunk[r]));
            let l: [usize; $r] = std::array::from_fn(|r| live(&chunk[r]));
            // SAFETY: forwarded from the caller.
            unsafe { score_rows::<$r>(q, ktg, stride, n, l, scale, scores) }.to_vec()
        }};
    }
    let max = match chunk.len() {
        8 => rows!(8),
        7 => rows!(7),
        6 => rows!(6),
        5 => rows!(5),
        4 => rows!(4),
        3 => rows!(3),
        2 => rows!(2),
        _ => rows!(1),
    };
    for (r, (row, max)) in chunk.iter().zip(max).enumerate() {
        let (h, i) = *row;
        // SAFETY: row `i`, head `h` of `out` (`[len, heads, hd]`), this task's alone.
        let dst = unsafe {
            std::slice::from_raw_parts_mut((out_addr as *mut f32).add((i * heads + h) * hd), hd)
        };
        let s = &mut scores[r * stride..(r + 1) * stride];
        // SAFETY: forwarded from the caller.
        unsafe { softmax_values(s, live(row), max, vals, dst) };
    }
}
