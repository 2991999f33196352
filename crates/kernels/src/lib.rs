//! tagllm's CPU kernels: Q8_0 matrix products for x86 CPUs with AVX-512 VNNI or AVX2 (the default
//! model's projections), and attention for decode steps ([`decode_attention`]) and prefills
//! ([`prefill_attention`], AVX-512).
//!
//! candle 0.11.1 multiplies Q8_0 weights one 32-value block and one output row at a time
//! (`vec_dot`), and its repacked VNNI kernels need the inner dimension to be a multiple of 256,
//! which SmolLM2's hidden size (576) is not. Here the weights are repacked at load into tiles of
//! 16 output rows by one 32-value block, each weight stored `+ 128` as an unsigned byte, so one
//! `vpdpbusd` multiplies 4 inputs into all 16 rows at once; each input row is quantized to Q8_0
//! exactly as ggml does it (per 32 values, `d = amax / 127`, `d` rounded to f16), and the
//! `+ 128` comes off again through the block's sum of input quants. Projections that read the
//! same input (q, k and v; gate and up) are packed into one matrix, so the input is quantized
//! once and the thread pool is woken once for them.
//!
//! Every output value is one lane's `Σ_blocks fma(dot_block as f32, d_w · d_x, acc)` in block
//! order, whatever the number of input rows or how the work is split across threads, so a row's
//! result does not depend on what it is batched with. A portable implementation of the same
//! arithmetic ([`PackedQ8::matmul_portable`]) is the reference the SIMD kernels are tested
//! against, bit for bit. On AVX2 without AVX-512 VNNI the same tiles run on an AVX2 kernel
//! ([`Isa::Avx2`]: `vpmaddubsw` on the weights' magnitudes with the signs moved onto the
//! inputs, as ggml does on AVX2); the integer dot products are the same, so the results are too.
//! Other CPUs (and every GPU) keep candle's `QMatMul`. `TAGLLM_KERNELS=avx2` or `off` chooses a
//! lesser path at start ([`isa`]).
//!
//! This is a crate of its own so that debug builds (the test suite) compile it optimized: the
//! root crate builds at opt-level 0 in tests, where these intrinsics would be slower than candle.

use candle_core::{
    quantized::{GgmlDType, QMatMul, QTensor},
    CpuStorage, CustomOp1, Device, Layout, Module, Result, Shape, Tensor,
};

/// Output rows per tile: one 32-bit lane of a 512-bit register each.
const TILE: usize = 16;
/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes of a Q8_0 block in a GGUF: an f16 scale and 32 signed quants.
const Q8_0_BYTES: usize = 2 + QK;

/// One 32-value block of 16 output rows. `qs` is laid out `[group (8)][row (16)][4 bytes]`, so
/// one 64-byte load holds 4 consecutive weights of every row, as `vpdpbusd` wants them.
#[derive(Clone)]
#[repr(C, align(64))]
struct Tile {
    qs: [u8; QK * TILE],
    d: [f32; TILE],
}

/// A Q8_0 weight matrix `[n, k]` (one or more projections stacked by rows), repacked.
pub struct PackedQ8 {
    n: usize,
    k: usize,
    /// `tiles[t * k / 32 + b]`: tile row `t` (output rows `16t..16t + 16`), block `b`.
    tiles: Vec<Tile>,
    /// No weight is -128 (ggml's and candle's Q8_0 quantizers write -127..=127; a file could
    /// hold -128, whose magnitude AVX2's `vpsignb` cannot take).
    symmetric: bool,
}

impl std::fmt::Debug for PackedQ8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQ8")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

/// The instruction set a [`PackedQ8`] product runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F/BW/VNNI: one `vpdpbusd` per 4 inputs of 16 rows.
    Avx512Vnni,
    /// AVX2 and FMA: `vpmaddubsw` on the weights' magnitudes with the signs moved onto the
    /// inputs, then `vpmaddwd`, per 4 inputs of 8 rows (what ggml does on AVX2).
    Avx2,
}

impl Isa {
    /// Whether this CPU has it.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Isa::Avx2 => has!("avx2") && has!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }
}

/// `TAGLLM_KERNELS` as set at start (read once): `avx2` or `off` ask for less than the best.
fn asked() -> &'static str {
    static ASKED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ASKED.get_or_init(|| {
        std::env::var("TAGLLM_KERNELS")
            .unwrap_or_default()
            .trim()
            .to_string()
    })
}

/// The instruction set packed products run on: the best this CPU has, unless the environment
/// variable `TAGLLM_KERNELS` asks for `avx2` (on a CPU that has it: what an AVX2-only CPU runs,
/// AVX-512 attention included off) or `off` (candle's matmuls, no AVX-512 attention); `None`
/// where neither kernel runs.
pub fn isa() -> Option<Isa> {
    static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| match asked() {
        "off" => None,
        "avx2" => Some(Isa::Avx2).filter(|i| i.supported()),
        _ => [Isa::Avx512Vnni, Isa::Avx2]
            .into_iter()
            .find(|i| i.supported()),
    })
}

/// Whether packed products run on this CPU ([`isa`]).
pub fn available() -> bool {
    isa().is_some()
}

/// Whether the attention kernels run on AVX-512: the CPU has it and `TAGLLM_KERNELS` does not
/// ask for less (checked once).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && !matches!(asked(), "avx2" | "off")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedQ8 {
    /// Stacks the Q8_0 matrices `ws` (each `[n_i, k]`, same `k`) by rows and repacks them. `None`
    /// when the layout does not fit: another dtype, a device other than the CPU, `k` not a
    /// multiple of 32 or an `n_i` not a multiple of 16.
    pub fn pack(ws: &[&QTensor]) -> Result<Option<PackedQ8>> {
        let mut k = None;
        for w in ws {
            let (n_i, k_i) = w.shape().dims2()?;
            if w.dtype() != GgmlDType::Q8_0
                || !matches!(w.device(), Device::Cpu)
                || n_i % TILE != 0
                || k_i % QK != 0
                || k.is_some_and(|k| k != k_i)
            {
                return Ok(None);
            }
            k = Some(k_i);
        }
        let Some(k) = k else { return Ok(None) };
        let kb = k / QK;
        let mut tiles = Vec::new();
        let mut n = 0;
        let mut symmetric = true;
        for w in ws {
            let n_i = w.shape().dims()[0];
            let data = w.data()?;
            if data.len() != n_i * kb * Q8_0_BYTES {
                candle_core::bail!("Q8_0 tensor of {n_i}x{k} holds {} bytes", data.len());
            }
            for t in 0..n_i / TILE {
                for b in 0..kb {
                    let mut tile = Tile {
                        qs: [0; QK * TILE],
                        d: [0.0; TILE],
                    };
                    for r in 0..TILE {
                        let block = &data[((t * TILE + r) * kb + b) * Q8_0_BYTES..][..Q8_0_BYTES];
                        tile.d[r] = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                        for (i, &q) in block[2..].iter().enumerate() {
                            symmetric &= q as i8 != i8::MIN;
                            let (g, j) = (i / 4, i % 4);
                            tile.qs[(g * TILE + r) * 4 + j] = (q as i8 as i16 + 128) as u8;
                        }
                    }
                    tiles.push(tile);
                }
            }
            n += n_i;
        }
        Ok(Some(PackedQ8 {
            n,
            k,
            tiles,
            symmetric,
        }))
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether [`PackedQ8::matmul_with`] can run on `isa` (the CPU has it, and for AVX2 no
    /// weight is -128).
    pub fn runs_on(&self, isa: Isa) -> bool {
        isa.supported() && (isa != Isa::Avx2 || self.symmetric)
    }

    /// `x [m, k]` (row-major) times the matrix's transpose: `[m, n]`, on the [`isa`] kernel
    /// spread over candle's CPU thread pool, or [`PackedQ8::matmul_portable`] where that
    /// kernel cannot run this matrix (callers pick candle's kernels instead: [`Projections`]).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        match isa() {
            Some(isa) if self.runs_on(isa) => self.matmul_with(x, m, isa),
            _ => self.matmul_portable(x, m),
        }
    }

    /// [`PackedQ8::matmul`] on the given instruction set. Panics unless
    /// [`PackedQ8::runs_on`]`(isa)`.
    pub fn matmul_with(&self, x: &[f32], m: usize, isa: Isa) -> Vec<f32> {
        assert!(
            self.runs_on(isa),
            "the packed Q8_0 kernel cannot run on {isa:?} here"
        );
        assert_eq!(x.len(), m * self.k);
        let acts = Acts::quantize(x, m, self.k, Some(isa));
        let mut out = vec![0f32; m * self.n];
        let kb = self.k / QK;
        let tile_rows = self.n / TILE;
        // One sequence (decode): 4 tile rows at a time, for 4 independent accumulator chains.
        // Several: one tile row against up to 8 input rows at a time, which reuse each load.
        let per_item = if m == 1 { 4 } else { 1 };
        let items = tile_rows.div_ceil(per_item);
        let out_addr = out.as_mut_ptr() as usize;
        let (n, tiles, acts) = (self.n, &self.tiles, &acts);
        candle_core::utils::barrier_pool().execute_chunked(items, |range| {
            for item in range {
                let t0 = item * per_item;
                let count = per_item.min(tile_rows - t0);
                let tiles = &tiles[t0 * kb..(t0 + count) * kb];
                // SAFETY: the CPU has `isa` (asserted above; for AVX2 no weight is -128);
                // `tiles` holds `count` tile rows of `kb` blocks; `acts` holds `m` rows of
                // `k = 32 kb` values; the kernel writes columns `16 t0..16 (t0 + count)` of the
                // `m` rows of `out` (`[m, n]`), which no other work item writes, and `out`
                // outlives the call.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let out = (out_addr as *mut f32).add(t0 * TILE);
                    match isa {
                        Isa::Avx512Vnni => x86::tile_rows(tiles, count, acts, m, out, n),
                        Isa::Avx2 => avx2::tile_rows(tiles, count, acts, m, out, n),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (tiles, count, out_addr, n);
            }
        });
        out
    }

    /// The same arithmetic as the SIMD kernel in portable code, one output value at a time: the
    /// reference it is tested against (bit for bit), and the documentation of what it computes.
    pub fn matmul_portable(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k);
        let acts = Acts::quantize(x, m, self.k, None);
        let kb = self.k / QK;
        let mut out = vec![0f32; m * self.n];
        for row in 0..m {
            for col in 0..self.n {
                let (t, lane) = (col / TILE, col % TILE);
                let mut acc = 0f32;
                for b in 0..kb {
                    let tile = &self.tiles[t * kb + b];
                    let xq = &acts.qs[row * self.k + b * QK..][..QK];
                    let mut dot = 0i32;
                    for (i, &xv) in xq.iter().enumerate() {
                        let w = tile.qs[((i / 4) * TILE + lane) * 4 + i % 4];
                        dot += i32::from(w) * i32::from(xv);
                    }
                    let a = row * kb + b;
                    dot -= 128 * acts.sum[a];
                    acc = (dot as f32).mul_add(tile.d[lane] * acts.d[a], acc);
                }
                out[row * self.n + col] = acc;
            }
        }
        out
    }
}

/// The input rows quantized to Q8_0: `qs[row * k + i]`, and per 32-value block the scale (the
/// f16-rounded value ggml stores) and the sum of the block's quants.
struct Acts {
    qs: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<i32>,
}

impl Acts {
    /// ggml's `quantize_row_q8_0` (what candle's `BlockQ8_0::from_float` does): per block,
    /// `d = amax / 127`, `q = round(x / d)` (half away from zero), and the stored scale is `d`
    /// as an f16. `simd`: the statement of the same for that instruction set (the caller checked
    /// the CPU).
    fn quantize(x: &[f32], m: usize, k: usize, simd: Option<Isa>) -> Acts {
        let blocks = m * k / QK;
        let mut acts = Acts {
            qs: vec![0; m * k],
            d: vec![0.0; blocks],
            sum: vec![0; blocks],
        };
        for (i, (xs, qs)) in x
            .chunks_exact(QK)
            .zip(acts.qs.chunks_exact_mut(QK))
            .enumerate()
        {
            let (d, sum) = match simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller checked the CPU; both chunks hold 32 values.
                Some(Isa::Avx512Vnni) => unsafe { x86::quantize_block(xs, qs) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Some(Isa::Avx2) => unsafe { avx2::quantize_block(xs, qs) },
                _ => quantize_block(xs, qs),
            };
            acts.d[i] = half::f16::from_f32(d).to_f32();
            acts.sum[i] = sum;
        }
        acts
    }
}

/// One block: its quants into `qs`; returns `d` (before f16 rounding) and the quants' sum.
fn quantize_block(xs: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(xs) {
        *q = (v * id).round() as i8;
        sum += i32::from(*q);
    }
    (d, sum)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
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
                acc =
                    unsafe { _mm512_fmadd_ps(*qv, _mm512_loadu_ps(kp.add(j * hd + 16 * t)), acc) };
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
    pub(super) unsafe fn softmax_values(
        scores: &mut [f32],
        n: usize,
        max: f32,
        vals: &[f32],
        out: &mut [f32],
    ) {
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
                *acc =
                    unsafe { _mm512_fmadd_ps(p, _mm512_loadu_ps(vp.add(j * hd + 16 * t)), *acc) };
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
    pub(super) unsafe fn score_rows<const R: usize>(
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
                    let w = unsafe {
                        _mm512_load_si512(tiles[t * kb + b].qs.as_ptr().add(g * 64).cast())
                    };
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
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Acts, Tile, QK, TILE};

    /// Input rows per kernel call. 4 rows x 2 register halves x (accumulator + block dot) is all
    /// 16 of AVX2's registers, so some spill; still ~10% faster than 2 rows on 64-row products
    /// (`examples/speed.rs`), as each weight load serves more rows.
    const ROWS: usize = 4;

    /// [`super::quantize_block`] on AVX2, with the rounding of the AVX-512 statement
    /// ([`super::x86::quantize_block`]): `t + sign` where `t = trunc(y)` and `|y - t| >= 0.5`,
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

    /// As [`super::x86::tile_rows`], on AVX2.
    ///
    /// # Safety
    /// AVX2 and FMA; no weight in `tiles` is -128; otherwise as [`super::x86::tile_rows`].
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
                            _mm256_load_si256(
                                tiles[t * kb + b].qs.as_ptr().add(g * 64 + h * 32).cast(),
                            )
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
}

impl CustomOp1 for PackedQ8 {
    fn name(&self) -> &'static str {
        "q8_0-packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = storage else {
            candle_core::bail!("packed Q8_0 matmul: F32 input expected");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed Q8_0 matmul: contiguous input expected");
        };
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("packed Q8_0 matmul: input {dims:?}, k = {}", self.k);
        }
        let x = &x[start..end];
        let out = self.matmul(x, x.len() / self.k);
        *dims.last_mut().expect("checked above") = self.n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Projections of one input: packed together when the kernel applies ([`available`] and every
/// matrix [`PackedQ8::pack`]s), else candle's `QMatMul` each.
pub enum Projections {
    Packed {
        w: PackedQ8,
        /// Output features of each projection, in order.
        sizes: Vec<usize>,
    },
    Candle(Vec<QMatMul>),
}

impl std::fmt::Debug for Projections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Projections::Packed { w, sizes } => write!(f, "Packed({w:?}, {sizes:?})"),
            Projections::Candle(ws) => write!(f, "Candle({})", ws.len()),
        }
    }
}

impl Projections {
    /// `ws`: the projections' weights (`[n_i, k]` each). `pack`: use the kernel where it applies.
    pub fn new(ws: Vec<QTensor>, pack: bool) -> Result<Projections> {
        if let (true, Some(isa)) = (pack, isa()) {
            let refs: Vec<&QTensor> = ws.iter().collect();
            if let Some(w) = PackedQ8::pack(&refs)?.filter(|w| w.runs_on(isa)) {
                let sizes = ws.iter().map(|w| w.shape().dims()[0]).collect();
                return Ok(Projections::Packed { w, sizes });
            }
        }
        ws.into_iter()
            .map(QMatMul::from_qtensor)
            .collect::<Result<_>>()
            .map(Projections::Candle)
    }

    /// Whether the packed kernel runs these.
    pub fn packed(&self) -> bool {
        matches!(self, Projections::Packed { .. })
    }

    /// Each projection of `x` (`[.., k]`), in order. Packed outputs are column slices of one
    /// result (not contiguous when there are several).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Projections::Packed { w, sizes } => {
                let y = x.contiguous()?.apply_op1_no_bwd(w)?;
                if sizes.len() == 1 {
                    return Ok(vec![y]);
                }
                let last = y.rank() - 1;
                let mut offset = 0;
                sizes
                    .iter()
                    .map(|&n| {
                        let part = y.narrow(last, offset, n);
                        offset += n;
                        part
                    })
                    .collect()
            }
            Projections::Candle(ws) => ws.iter().map(|w| w.forward(x)).collect(),
        }
    }

    /// The single projection's output.
    pub fn forward1(&self, x: &Tensor) -> Result<Tensor> {
        let mut ys = self.forward(x)?;
        if ys.len() != 1 {
            candle_core::bail!("forward1 on {} projections", ys.len());
        }
        Ok(ys.remove(0))
    }
}

/// One sequence's single new query (a decode step) for [`decode_attention`]: its row `at` of the
/// step's queries, and its F32 cache `[kv_heads, cap, hd]` whose first `n` positions are set
/// (this step's key and value included).
#[derive(Debug, Clone, Copy)]
pub struct DecodeRow<'a> {
    pub at: usize,
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub cap: usize,
    pub n: usize,
}

/// Attention for decode steps, every sequence's one new query row at once: per head, scores
/// `q·k * scale` over the sequence's `n` positions, softmax (max-shifted), and the
/// probability-weighted sum of values, each (sequence, head) a work item on candle's CPU thread
/// pool. `q` is the step's queries `[heads, rows, hd]` (`rows` the step's total). Returns
/// `[decode.len(), heads * hd]`. A row's result depends only on its query and its cache, so not
/// on what it is batched with. AVX-512 where [`available`] and `hd` is a multiple of 16 up to
/// 128, else portable code (which vectorizes less).
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
    let simd = allow_simd && avx512() && hd.is_multiple_of(16) && hd <= 128;
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
                    x86::attend_row(qr, keys, vals, scale, &mut scores, dst)
                };
            } else {
                attend_row(qr, keys, vals, scale, &mut scores, dst);
            }
        }
    });
    out
}

/// Whether [`prefill_attention`] runs on this CPU for heads of `hd`: AVX-512 ([`available`])
/// and `hd` a multiple of 16 up to 128. Where it does not, callers keep their matmul path.
pub fn prefill_attention_available(hd: usize) -> bool {
    avx512() && hd > 0 && hd.is_multiple_of(16) && hd <= 128
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
                    prefill_chunk(
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

/// Up to 8 rows `(head, position)` of [`prefill_attention`]: scores, then softmax and values.
///
/// # Safety
/// As the call site in [`prefill_attention`] states.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn prefill_chunk(
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
            unsafe { x86::score_rows::<$r>(q, ktg, stride, n, l, scale, scores) }.to_vec()
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
        unsafe { x86::softmax_values(s, live(row), max, vals, dst) };
    }
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
