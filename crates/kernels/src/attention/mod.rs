//! Attention on the CPU in F32: [`decode_attention`] (every sequence's one new query row),
//! [`prefill_attention`] (one sequence's new rows, causal, AVX-512 only), and the portable
//! statement of one row ([`attend_row`]) that decode steps run where AVX-512 does not.

#[cfg(target_arch = "x86_64")]
mod avx512;

/// One sequence's single new query (a decode step) for [`decode_attention`]: its row `at` of the
/// step's queries, and its F32 cache `[kv_heads, cap, hd]` whose first `n` positions are set
/// (this step's key and value included).
#[derive(Debug, Clone, Copy)]
pub struct DecodeRow<'a> {
    /// This sequence's row in the step's queries (`q`'s `rows` dimension).
    pub at: usize,
    /// The sequence's key cache, `[kv_heads, cap, hd]`.
    pub k: &'a [f32],
    /// The sequence's value cache, `[kv_heads, cap, hd]`.
    pub v: &'a [f32],
    /// Positions allocated per key/value head in `k` and `v`.
    pub cap: usize,
    /// Positions set (this step's included): `1..=cap`.
    pub n: usize,
}

/// Attention for decode steps, every sequence's one new query row at once: per head, scores
/// `q·k * scale` over the sequence's `n` positions, softmax (max-shifted), and the
/// probability-weighted sum of values, each (sequence, head) a work item on candle's CPU thread
/// pool. `q` is the step's queries `[heads, rows, hd]` (`rows` the step's total). Returns
/// `[decode.len(), heads * hd]`. A row's result depends only on its query and its cache, so not
/// on what it is batched with. AVX-512 where the CPU has it and `TAGLLM_KERNELS` does not ask for
/// less ([`isa`](crate::isa)) and `hd` is a multiple of 16 up to 128, else portable code (which
/// vectorizes less).
pub fn decode_attention(
    q: &[f32],
    rows: usize,
    decode: &[DecodeRow<'_>],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    decode_attention_with(q, rows, decode, (heads, kv_heads, hd), scale, true)
}

/// [`decode_attention`], with `allow_simd: false` forcing the portable code (for tests).
#[doc(hidden)]
pub fn decode_attention_with(
    q: &[f32],
    rows: usize,
    decode: &[DecodeRow<'_>],
    (heads, kv_heads, hd): (usize, usize, usize),
    scale: f32,
    allow_simd: bool,
) -> Vec<f32> {
    assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads) && hd > 0);
    assert_eq!(q.len(), heads * rows * hd);
    for r in decode {
        assert!(r.at < rows && r.n > 0 && r.n <= r.cap);
        assert_eq!(r.k.len(), kv_heads * r.cap * hd);
        assert_eq!(r.v.len(), kv_heads * r.cap * hd);
    }
    let rep = heads / kv_heads;
    let simd = allow_simd && crate::avx512() && hd.is_multiple_of(16) && hd <= 128;
    let mut out = vec![0f32; decode.len() * heads * hd];
    let out_addr = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(decode.len() * heads, |range| {
        let mut scores = Vec::new();
        for item in range {
            let (ri, h) = (item / heads, item % heads);
            let r = &decode[ri];
            let base = (h / rep) * r.cap * hd;
            let qr = &q[(h * rows + r.at) * hd..][..hd];
            let (keys, vals) = (&r.k[base..][..r.n * hd], &r.v[base..][..r.n * hd]);
            scores.resize(r.n.next_multiple_of(16), 0.0);
            // SAFETY: row `ri`, head `h` of `out` (`[decode, heads, hd]`): this item's alone,
            // and `out` outlives the call.
            let dst = unsafe {
                std::slice::from_raw_parts_mut((out_addr as *mut f32).add(item * hd), hd)
            };
            if simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512 checked above; `hd` a multiple of 16 up to 128; `keys` and
                // `vals` hold `n` rows of `hd`; `scores` holds `n` rounded up to 16.
                unsafe {
                    avx512::attend_row(qr, keys, vals, scale, &mut scores, dst)
                };
            } else {
                attend_row(qr, keys, vals, scale, &mut scores, dst);
            }
        }
    });
    out
}

/// Whether [`prefill_attention`] runs on this CPU for heads of `hd`: AVX-512, unless
/// `TAGLLM_KERNELS` asks for less ([`isa`](crate::isa)), and `hd` a multiple of 16 up to 128.
/// Where it does not, callers keep their matmul path.
pub fn prefill_attention_available(hd: usize) -> bool {
    crate::avx512() && hd > 0 && hd.is_multiple_of(16) && hd <= 128
}

/// Causal attention of one sequence's `len` new query rows (a prefill) on AVX-512, without score
/// matrices in memory beyond one block of rows: the cache's keys are transposed once per call
/// (`[kv_heads][hd][positions]`), then each task takes the query heads of one key/value head for
/// a few consecutive positions (up to 8 rows), computes their scores 16 keys at a time with every
/// key vector loaded once for all its rows, and finishes each row with the same softmax and
/// weighted sum as [`decode_attention`]. Row `i` attends to positions `0..=past + i`.
///
/// `q` is the step's queries `[heads, rows, hd]`, the sequence's rows at `at..at + len`; `k`, `v`
/// its cache `[kv_heads, alloc, hd]` with positions `0..past + len` set. Returns
/// `[len, heads * hd]`. A row's result depends only on its query and the cache. Panics unless
/// [`prefill_attention_available`].
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention(
    q: &[f32],
    rows: usize,
    (at, len, past): (usize, usize, usize),
    k: &[f32],
    v: &[f32],
    alloc: usize,
    (heads, kv_heads, hd): (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    assert!(prefill_attention_available(hd));
    assert!(kv_heads > 0 && heads.is_multiple_of(kv_heads));
    assert!(at + len <= rows && past + len <= alloc);
    assert_eq!(q.len(), heads * rows * hd);
    assert_eq!(k.len(), kv_heads * alloc * hd);
    assert_eq!(v.len(), kv_heads * alloc * hd);
    let n = past + len;
    let stride = n.next_multiple_of(16);
    let rep = heads / kv_heads;
    let mut kt = vec![0f32; kv_heads * hd * stride];
    for (g, ktg) in kt.chunks_exact_mut(hd * stride).enumerate() {
        for (j, row) in k[g * alloc * hd..][..n * hd].chunks_exact(hd).enumerate() {
            for (d, &x) in row.iter().enumerate() {
                ktg[d * stride + j] = x;
            }
        }
    }
    // Consecutive positions per task, so that a task has up to 8 rows.
    let per = (8 / rep).max(1);
    let blocks = len.div_ceil(per);
    let mut out = vec![0f32; len * heads * hd];
    let out_addr = out.as_mut_ptr() as usize;
    let kt = &kt;
    candle_core::utils::barrier_pool().execute_chunked(kv_heads * blocks, |range| {
        let mut scores = vec![0f32; 8 * stride];
        let mut rows_of: Vec<(usize, usize)> = Vec::with_capacity(8 * rep);
        for item in range {
            let (g, b) = (item / blocks, item % blocks);
            rows_of.clear();
            for i in b * per..((b + 1) * per).min(len) {
                rows_of.extend((g * rep..(g + 1) * rep).map(|h| (h, i)));
            }
            let ktg = &kt[g * hd * stride..][..hd * stride];
            let vals = &v[g * alloc * hd..][..n * hd];
            for chunk in rows_of.chunks(8) {
                // SAFETY: the CPU has AVX-512 and `hd` fits (asserted); `ktg` holds `hd`
                // rows of `stride`; `scores` 8 rows of `stride`; every row's `live` is at most
                // `n <= stride`; `vals` holds `n` rows of `hd`; each (head, position) row of
                // `out` is written by this task alone, and `out` outlives the call.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::prefill_chunk(
                        q,
                        rows,
                        at,
                        past,
                        hd,
                        chunk,
                        ktg,
                        stride,
                        vals,
                        scale,
                        &mut scores,
                        out_addr,
                        heads,
                    );
                }
            }
        }
    });
    out
}

/// One query row against `keys`/`vals` (`n` rows of `hd`) into `out`, portable.
fn attend_row(
    q: &[f32],
    keys: &[f32],
    vals: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let n = keys.len() / hd;
    for (s, kr) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
        *s = dot(q, kr) * scale;
    }
    let scores = &mut scores[..n];
    let max = scores.iter().fold(f32::NEG_INFINITY, |a, &s| a.max(s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (&e, vr) in scores.iter().zip(vals.chunks_exact(hd)) {
        for (o, &x) in out.iter_mut().zip(vr) {
            *o = e.mul_add(x, *o);
        }
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Dot product in 16 independent lanes (vectorized by the compiler), then a fixed pairwise sum.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}
