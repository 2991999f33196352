//! The packed Q8_0 matrix product: [`PackedQ8`] (weights repacked into 16-row tiles, the
//! dispatch to a kernel, and [`PackedQ8::matmul_portable`], the portable statement the kernels
//! are tested against), the input rows' quantization ([`Acts`], [`quantize_block`]), and the
//! kernels per instruction set (`avx512`, `avx2`, x86-64 only).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use candle_core::{
    quantized::{GgmlDType, QTensor},
    Device, Result,
};

use crate::{isa, Isa};

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
    /// kernel cannot run this matrix (callers pick candle's kernels instead:
    /// [`Projections`](crate::Projections)).
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
                        Isa::Avx512Vnni => avx512::tile_rows(tiles, count, acts, m, out, n),
                        Isa::Avx2 => avx2::tile_rows(tiles, count, acts, m, out, n),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (tiles, count, out_addr, n);
            }
        });
        out
    }

    /// The same arithmetic as the SIMD kernels in portable code, one output value at a time: the
    /// reference they are tested against (bit for bit), and the documentation of what they compute.
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
                Some(Isa::Avx512Vnni) => unsafe { avx512::quantize_block(xs, qs) },
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
