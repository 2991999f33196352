//! The packed product as a candle op ([`PackedQ8`] as a `CustomOp1`), and [`Projections`]: the
//! matrices that read the same input, packed together where the kernel applies, else candle's.

use candle_core::{
    quantized::{QMatMul, QTensor},
    CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor,
};

use crate::{isa, PackedQ8};

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
        if dims.last() != Some(&self.k()) {
            candle_core::bail!("packed Q8_0 matmul: input {dims:?}, k = {}", self.k());
        }
        let x = &x[start..end];
        let out = self.matmul(x, x.len() / self.k());
        *dims.last_mut().expect("checked above") = self.n();
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Projections of one input: packed together when the kernel applies
/// ([`available`](crate::available), every matrix [`PackedQ8::pack`]s and the kernel
/// [`PackedQ8::runs_on`] the result), else candle's `QMatMul` each.
pub enum Projections {
    /// One packed matrix, the projections stacked by rows.
    Packed {
        /// The stacked projections.
        w: PackedQ8,
        /// Output features of each projection, in order.
        sizes: Vec<usize>,
    },
    /// candle's `QMatMul` per projection, in order.
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
