//! A linear layer with a matrix-vector path for decode. candle's CPU matmul (the `gemm` crate)
//! packs the weight matrix for every product, which for a handful of rows (one decode step of a
//! few sequences) means reading and writing every weight twice; decode is bound by memory
//! bandwidth, so that halves its speed. For up to [`GEMV_MAX_ROWS`] rows of F32 input on the CPU,
//! this reads each weight row once and computes all rows' dot products from it, split across
//! candle's rayon pool. Larger inputs (prefill) go to candle's matmul.

use candle_core::{DType, Module, Result, Storage, Tensor};
use candle_nn::{Linear, VarBuilder};
use rayon::prelude::*;

/// Inputs with at most this many rows take the matrix-vector path.
pub const GEMV_MAX_ROWS: usize = 8;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct Proj {
    inner: Linear,
}

impl Proj {
    /// Wraps a candle [`Linear`].
    pub fn new(inner: Linear) -> Proj {
        Proj { inner }
    }

    /// The weight, `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    fn gemv(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let w = self.inner.weight();
        if !x.device().is_cpu()
            || x.dtype() != DType::F32
            || w.dtype() != DType::F32
            || x.rank() != 2
            || x.dim(0)? > GEMV_MAX_ROWS
        {
            return Ok(None);
        }
        let (m, k) = x.dims2()?;
        let (n, k2) = w.dims2()?;
        if k != k2 {
            return Ok(None); // let candle report the shape error
        }
        let x = x.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (Storage::Cpu(wc), Storage::Cpu(xc)) = (&*ws, &*xs) else {
            return Ok(None);
        };
        let (Some((w0, w1)), Some((x0, x1))) = (wl.contiguous_offsets(), xl.contiguous_offsets())
        else {
            return Ok(None);
        };
        let wd = &wc.as_slice::<f32>()?[w0..w1];
        let xd = &xc.as_slice::<f32>()?[x0..x1];
        // out_t is [n, m]: each task owns whole weight rows.
        let mut out_t = vec![0f32; n * m];
        out_t
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first = task * ROWS_PER_TASK;
                for (r, out) in chunk.chunks_mut(m).enumerate() {
                    let row = &wd[(first + r) * k..(first + r + 1) * k];
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = dot(row, &xd[i * k..(i + 1) * k]);
                    }
                }
            });
        let y = Tensor::from_vec(out_t, (n, m), x.device())?
            .t()?
            .contiguous()?;
        Ok(Some(match self.inner.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        }))
    }
}

/// Dot product: AVX2 + FMA when the CPU has them (checked once at run time), else portable code.
/// For a given pair of slices the result does not depend on anything else, so a row's output is
/// the same whatever it is batched with.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Four 8-wide FMA accumulators over 32 floats a step, then the tail.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8 * j + 8 <= n, within both slices; unaligned loads.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(pa.add(i + 8 * j)),
                    _mm256_loadu_ps(pb.add(i + 8 * j)),
                )
            };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    while i < n {
        s = a[i].mul_add(b[i], s);
        i += 1;
    }
    s
}

/// Portable fallback: eight independent lanes, then the tail.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.gemv(x)? {
            Some(y) => Ok(y),
            None => self.inner.forward(x),
        }
    }
}

/// A linear layer with a bias when `bias`.
pub fn proj_b(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Proj> {
    candle_nn::linear_b(in_dim, out_dim, bias, vb).map(Proj::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gemv_matches_candle_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (77, 131), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 77, &dev).unwrap();
        let p = Proj::new(Linear::new(w.clone(), Some(b.clone())));
        for m in [1, 3, 8] {
            let x = Tensor::randn(0f32, 1.0, (m, 131), &dev).unwrap();
            let fast = p.forward(&x).unwrap();
            let slow = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let diff = (fast - slow)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "m={m}: {diff}");
        }
        // The portable and SIMD dot products agree.
        let a: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.11).cos()).collect();
        assert!((dot(&a, &b) - dot_portable(&a, &b)).abs() < 1e-3);
        // Nine rows take candle's path and agree too.
        let x = Tensor::randn(0f32, 1.0, (9, 131), &dev).unwrap();
        assert_eq!(p.forward(&x).unwrap().dims(), &[9, 77]);
    }
}
