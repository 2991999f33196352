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

/// Dot product with 32 independent lanes (vectorised by the compiler: no reassociation needed).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let (ac, ar) = a.split_at(a.len() - a.len() % L);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(L).zip(bc.chunks_exact(L)) {
        for i in 0..L {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s = 0f32;
    for (x, y) in ar.iter().zip(br) {
        s = x.mul_add(*y, s);
    }
    // Pairwise over the lanes.
    let mut w = L;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + s
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
        // Nine rows take candle's path and agree too.
        let x = Tensor::randn(0f32, 1.0, (9, 131), &dev).unwrap();
        assert_eq!(p.forward(&x).unwrap().dims(), &[9, 77]);
    }
}
