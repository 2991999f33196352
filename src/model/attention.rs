//! What the two decoders (llama from GGUF, [`super::llama`], and Qwen3-VL's text decoder,
//! [`super::qwen3vl::text`]) share: a sequence's KV cache, a sequence's slice of a packed step,
//! and grouped-query attention over packed sequences against each sequence's own cache.

use candle_core::{DType, Device, Result, Tensor};

/// One sequence's keys and values, up to a fixed capacity, reusable: `reset` makes it empty
/// without freeing it. Memory grows with use (in steps of at least [`KvCache::STEP`] positions,
/// doubling), so a slot that never held a long prompt never holds the full capacity.
pub struct KvCache {
    /// Per layer, keys and values `[kv_heads, cap, head_dim]`; the first `len` positions are set.
    pub(crate) layers: Vec<(Tensor, Tensor)>,
    pub(crate) len: usize,
    cap: usize,
}

impl KvCache {
    /// Smallest allocation, in positions.
    pub const STEP: usize = 256;

    /// A cache of `cap` positions for `layers` layers of `kv_heads` heads of `head_dim`.
    pub fn with_shape(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        cap: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<KvCache> {
        let shape = (kv_heads, cap.min(Self::STEP), head_dim);
        let layers = (0..layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            cap,
        })
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions it can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Empties it for the next sequence (the memory stays).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Makes room for `total` positions (at most the capacity), keeping what is cached.
    pub fn reserve(&mut self, total: usize) -> Result<()> {
        let have = self.layers.first().map_or(0, |(k, _)| k.dims()[1]);
        if total <= have {
            return Ok(());
        }
        if total > self.cap {
            candle_core::bail!(
                "sequence of {total} tokens does not fit its {}-position cache",
                self.cap
            );
        }
        let new = total
            .next_multiple_of(Self::STEP)
            .max(2 * have)
            .min(self.cap);
        for (k, v) in &mut self.layers {
            for t in [k, v] {
                let (heads, _, dim) = t.dims3()?;
                let grown = Tensor::zeros((heads, new, dim), t.dtype(), t.device())?;
                if self.len > 0 {
                    grown.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                *t = grown;
            }
        }
        Ok(())
    }
}

/// One sequence's share of a packed step: how many of the step's rows are its new tokens, and its
/// cache (which already holds its earlier tokens).
pub struct SeqSlice<'a> {
    /// New tokens of this sequence in the step.
    pub tokens: usize,
    /// Its cache.
    pub cache: &'a mut KvCache,
}

/// Causal masks of one packed step, one per sequence (`None` for a single new token, which sees
/// its whole cache), built once and used by every layer.
pub fn step_masks(
    seqs: &[SeqSlice<'_>],
    rep: usize,
    direct: bool,
    device: &Device,
) -> Result<Vec<Option<Tensor>>> {
    seqs.iter()
        .map(|s| {
            (s.tokens > 1 && !direct)
                .then(|| causal_mask(rep, s.tokens, s.cache.len, device))
                .transpose()
        })
        .collect()
}

/// Whether [`packed_attention`] runs on `tagllm_kernels` (decode and prefill rows alike, no
/// masks): F32 on a CPU with its AVX-512 kernels, heads of a size they take. Else decode rows
/// still take `decode_attention` (its portable code) and prefill rows candle's matmuls.
pub fn direct_attention(dtype: DType, device: &Device, hd: usize) -> bool {
    dtype == DType::F32 && device.is_cpu() && tagllm_kernels::prefill_attention_available(hd)
}

/// Grouped-query attention over packed sequences, shared by the llama and Qwen3-VL decoders.
/// `q` is `[heads, n, hd]`, `k` and `v` are `[kv_heads, n, hd]` (rotated), rows in `seqs` order.
/// Each sequence's new keys and values are written into its cache at layer `li`, and its queries
/// attend to the cache. A sequence with several new tokens (a prefill) runs as matmuls: the `rep`
/// query heads sharing a key/value head form one `[rep*len, hd]` block against it, so keys are
/// never copied per head; scores and softmax are F32; `masks` come from [`step_masks`]. On the
/// CPU in F32, a sequence with one new token (a decode step) runs on
/// `tagllm_kernels::decode_attention` instead, all such sequences of the step in one call (no
/// packing of the cache for a matmul, every (sequence, head) a task on the thread pool), and
/// where [`direct_attention`] holds a prefill runs on `tagllm_kernels::prefill_attention` (no
/// score matrices, no masks). Either way a sequence's result depends only on its own tokens and
/// cache. Returns `[n, heads*hd]` in `q`'s dtype.
pub fn packed_attention(
    li: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &mut [SeqSlice<'_>],
    masks: &[Option<Tensor>],
) -> Result<Tensor> {
    let (heads, _, hd) = q.dims3()?;
    let kv_heads = k.dim(0)?;
    let rep = heads / kv_heads;
    let dtype = q.dtype();
    let scale = (hd as f64).powf(-0.5);
    let mut at = 0;
    for s in seqs.iter_mut() {
        let (kc, vc) = &s.cache.layers[li];
        kc.slice_set(&k.narrow(1, at, s.tokens)?.contiguous()?, 1, s.cache.len)?;
        vc.slice_set(&v.narrow(1, at, s.tokens)?.contiguous()?, 1, s.cache.len)?;
        at += s.tokens;
    }
    let direct = dtype == DType::F32 && q.device().is_cpu();
    let decoded = if direct {
        decode_rows(q, seqs, li, heads, kv_heads, hd, scale as f32)?
    } else {
        None
    };
    let direct_prefill = direct_attention(dtype, q.device(), hd);
    let mut outs = Vec::with_capacity(seqs.len());
    let mut at = 0;
    let mut d = 0;
    for (s, mask) in seqs.iter().zip(masks) {
        let len = s.tokens;
        if let (Some(rows), 1) = (&decoded, len) {
            outs.push(rows.narrow(0, d, 1)?);
            d += 1;
            at += 1;
            continue;
        }
        let past = s.cache.len;
        let (kc, vc) = &s.cache.layers[li];
        if direct_prefill {
            outs.push(prefill_rows(
                q,
                (at, len, past),
                kc,
                vc,
                (heads, kv_heads, hd),
                scale,
            )?);
            at += len;
            continue;
        }
        let keys = kc.narrow(1, 0, past + len)?; // [kv, L, hd]
        let vals = vc.narrow(1, 0, past + len)?;
        // Reduced-precision matmuls want a contiguous right-hand side; F32 reads the view.
        let vals = if dtype == DType::F32 {
            vals
        } else {
            vals.contiguous()?
        };
        let qs = q
            .narrow(1, at, len)?
            .contiguous()?
            .reshape((kv_heads, rep * len, hd))?;
        let scores = (qs.matmul(&keys.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs
            .matmul(&vals)?
            .reshape((heads, len, hd))?
            .transpose(0, 1)?
            .reshape((len, heads * hd))?;
        outs.push(out);
        at += len;
    }
    Tensor::cat(&outs, 0)
}

/// The decode rows of a step (sequences with one new token) through
/// `tagllm_kernels::decode_attention`: `[decode rows, heads*hd]`, or `None` when there are none.
/// `q` is F32 on the CPU; every cache is read in place.
#[allow(clippy::too_many_arguments)]
fn decode_rows(
    q: &Tensor,
    seqs: &[SeqSlice<'_>],
    li: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
) -> Result<Option<Tensor>> {
    if !seqs.iter().any(|s| s.tokens == 1) {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let rows = q.dim(1)?;
    let qs = f32_storage(&q)?;
    let mut guards = Vec::new();
    let mut at = 0;
    for s in seqs {
        if s.tokens == 1 {
            let (kc, vc) = &s.cache.layers[li];
            // Positions allocated: the cache grows in steps up to its capacity.
            guards.push((
                at,
                kc.dim(1)?,
                s.cache.len + 1,
                f32_storage(kc)?,
                f32_storage(vc)?,
            ));
        }
        at += s.tokens;
    }
    let decode = guards
        .iter()
        .map(|(at, cap, n, k, v)| {
            Ok(tagllm_kernels::DecodeRow {
                at: *at,
                k: f32_slice(k, kv_heads * cap * hd)?,
                v: f32_slice(v, kv_heads * cap * hd)?,
                cap: *cap,
                n: *n,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let out = tagllm_kernels::decode_attention(
        f32_slice(&qs, heads * rows * hd)?,
        rows,
        &decode,
        heads,
        kv_heads,
        hd,
        scale,
    );
    let n = decode.len();
    Ok(Some(Tensor::from_vec(out, (n, heads * hd), q.device())?))
}

/// One sequence's prefill rows through `tagllm_kernels::prefill_attention`: `[len, heads*hd]`.
fn prefill_rows(
    q: &Tensor,
    (at, len, past): (usize, usize, usize),
    kc: &Tensor,
    vc: &Tensor,
    (heads, kv_heads, hd): (usize, usize, usize),
    scale: f64,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    let rows = q.dim(1)?;
    let alloc = kc.dim(1)?;
    let (qs, ks, vs) = (f32_storage(&q)?, f32_storage(kc)?, f32_storage(vc)?);
    let out = tagllm_kernels::prefill_attention(
        f32_slice(&qs, heads * rows * hd)?,
        rows,
        (at, len, past),
        f32_slice(&ks, kv_heads * alloc * hd)?,
        f32_slice(&vs, kv_heads * alloc * hd)?,
        alloc,
        (heads, kv_heads, hd),
        scale as f32,
    );
    Tensor::from_vec(out, (len, heads * hd), q.device())
}

/// A contiguous F32 CPU tensor's storage, read-locked, and where its data starts.
fn f32_storage(t: &Tensor) -> Result<(candle_core::StorageRef<'_>, usize)> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)), Some((start, _))) => {
            Ok((storage, start))
        }
        _ => candle_core::bail!("decode attention: contiguous F32 CPU tensors expected"),
    }
}

/// `len` values of a tensor from [`f32_storage`].
fn f32_slice<'a>(t: &'a (candle_core::StorageRef<'_>, usize), len: usize) -> Result<&'a [f32]> {
    match &*t.0 {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) if t.1 + len <= v.len() => {
            Ok(&v[t.1..t.1 + len])
        }
        _ => candle_core::bail!("decode attention: {len} values past {} expected", t.1),
    }
}

/// Additive mask, `[rep*len, past+len]` in F32: query `i` (repeated `rep` times, one block per
/// query head of a group) sees keys `0..=past+i`.
pub fn causal_mask(rep: usize, len: usize, past: usize, device: &Device) -> Result<Tensor> {
    let keys = past + len;
    let mut m = vec![0f32; rep * len * keys];
    for (r, row) in m.chunks_exact_mut(keys).enumerate() {
        row[past + r % len + 1..].fill(f32::MIN);
    }
    Tensor::from_vec(m, (rep * len, keys), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_with_a_past() {
        let m = causal_mask(2, 2, 1, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[0], vec![0.0, 0.0, f32::MIN]);
        assert_eq!(v[1], vec![0.0, 0.0, 0.0]);
        assert_eq!(v[2], v[0]);
    }
}
