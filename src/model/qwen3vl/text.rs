//! The Qwen3-VL text decoder (Qwen3 blocks: q/k RMSNorm per head, grouped-query attention, SwiGLU)
//! with interleaved multimodal RoPE, run over *packed* sequences: the new tokens of every sequence
//! in a step are stacked into one `[tokens, hidden]` matrix for the projections and MLPs, and
//! attention runs per sequence against that sequence's own KV cache. No sequence is padded, so a
//! row's result does not depend on what it is batched with.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, rms_norm, Embedding, Linear, RmsNorm, VarBuilder};

use super::config::TextConfig;
use super::linear::{proj_b, Proj};

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

    /// A cache of `cap` positions for every layer of `cfg`.
    pub fn new(cfg: &TextConfig, cap: usize, dtype: DType, device: &Device) -> Result<KvCache> {
        KvCache::with_shape(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cap,
            dtype,
            device,
        )
    }

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

/// Per-token rotary angles: cos and sin, `[tokens, head_dim/2]`.
pub struct Rotary {
    inv_freq: Vec<f32>,
    /// For each rotary frequency, which position axis (0 = t, 1 = h, 2 = w) drives it.
    axis: Vec<usize>,
}

impl Rotary {
    /// The frequencies of `cfg` and the interleaved M-RoPE axis of each.
    pub fn new(cfg: &TextConfig) -> Rotary {
        let half = cfg.head_dim / 2;
        let inv_freq = (0..cfg.head_dim)
            .step_by(2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(i as f32 / cfg.head_dim as f32))
            .collect();
        // HF's Qwen3-VL always interleaves (T H W T H W ...), whatever `mrope_interleaved`
        // says: H owns j % 3 == 1 below 3*sh, W owns j % 3 == 2 below 3*sw, T the rest.
        let [_, sh, sw] = cfg.mrope_section;
        let axis = (0..half)
            .map(|j| {
                if j % 3 == 1 && j < 3 * sh {
                    1
                } else if j % 3 == 2 && j < 3 * sw {
                    2
                } else {
                    0
                }
            })
            .collect();
        Rotary { inv_freq, axis }
    }

    /// cos and sin for tokens at 3-D `positions` (t, h, w), in `dtype`.
    pub fn angles(
        &self,
        positions: &[[u32; 3]],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for p in positions {
            for (j, &f) in self.inv_freq.iter().enumerate() {
                let a = p[self.axis[j]] as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let n = positions.len();
        Ok((
            Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
        ))
    }
}

struct Layer {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    gate: Proj,
    up: Proj,
    down: Proj,
    in_norm: RmsNorm,
    post_norm: RmsNorm,
}

/// The decoder.
pub struct TextDecoder {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Proj,
    rotary: Rotary,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

/// One sequence's share of a packed step: how many of the step's rows are its new tokens, and its
/// cache (which already holds its earlier tokens).
pub struct SeqSlice<'a> {
    /// New tokens of this sequence in the step.
    pub tokens: usize,
    /// Its cache.
    pub cache: &'a mut KvCache,
}

impl TextDecoder {
    /// Loads `model.language_model.*` (`vb`) and the LM head (`head_vb`; the embedding when tied).
    pub fn new(cfg: &TextConfig, tied: bool, vb: VarBuilder, head_vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let embed = embedding(cfg.vocab_size, h, vb.pp("embed_tokens"))?;
        let lm_head = if tied {
            Proj::new(Linear::new(embed.embeddings().clone(), None))
        } else {
            proj_b(h, cfg.vocab_size, false, head_vb.pp("lm_head"))?
        };
        let bias = cfg.attention_bias;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("layers.{i}"));
                let a = l.pp("self_attn");
                let m = l.pp("mlp");
                Ok(Layer {
                    q: proj_b(h, cfg.num_attention_heads * hd, bias, a.pp("q_proj"))?,
                    k: proj_b(h, cfg.num_key_value_heads * hd, bias, a.pp("k_proj"))?,
                    v: proj_b(h, cfg.num_key_value_heads * hd, bias, a.pp("v_proj"))?,
                    o: proj_b(cfg.num_attention_heads * hd, h, bias, a.pp("o_proj"))?,
                    q_norm: rms_norm(hd, cfg.rms_norm_eps, a.pp("q_norm"))?,
                    k_norm: rms_norm(hd, cfg.rms_norm_eps, a.pp("k_norm"))?,
                    gate: proj_b(h, cfg.intermediate_size, false, m.pp("gate_proj"))?,
                    up: proj_b(h, cfg.intermediate_size, false, m.pp("up_proj"))?,
                    down: proj_b(cfg.intermediate_size, h, false, m.pp("down_proj"))?,
                    in_norm: rms_norm(h, cfg.rms_norm_eps, l.pp("input_layernorm"))?,
                    post_norm: rms_norm(h, cfg.rms_norm_eps, l.pp("post_attention_layernorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TextDecoder {
            embed,
            layers,
            norm: rms_norm(h, cfg.rms_norm_eps, vb.pp("norm"))?,
            lm_head,
            rotary: Rotary::new(cfg),
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Token embeddings, `[n, hidden]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(tokens, &self.device)?;
        self.embed.forward(&ids)
    }

    /// The dtype the decoder computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs one packed step. `x` is `[tokens, hidden]` (every sequence's new tokens, in `seqs`
    /// order), `positions` their 3-D rotary positions; `deepstack` adds `rows(layer)` after layer
    /// `layer` for the first layers (visual features; zero rows for text tokens). Returns the final
    /// hidden states of the rows in `keep` (after the final norm), `[keep.len(), hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &[[u32; 3]],
        seqs: &mut [SeqSlice<'_>],
        deepstack: &[Tensor],
        keep: &[u32],
    ) -> Result<Tensor> {
        let total: usize = seqs.iter().map(|s| s.tokens).sum();
        if total != x.dim(0)? || total != positions.len() {
            candle_core::bail!(
                "packed step: {total} tokens by sequence, {} rows, {} positions",
                x.dim(0)?,
                positions.len()
            );
        }
        for s in seqs.iter_mut() {
            s.cache.reserve(s.cache.len + s.tokens)?;
        }
        let (cos, sin) = self.rotary.angles(positions, self.dtype, &self.device)?;
        let direct = direct_attention(self.dtype, &self.device, self.head_dim);
        let masks = step_masks(seqs, self.heads / self.kv_heads, direct, &self.device)?;
        let mut x = x.clone();
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.in_norm.forward(&x)?;
            let attn = self.attention(li, layer, &h, &cos, &sin, seqs, &masks)?;
            x = (x + layer.o.forward(&attn)?)?;
            let h = layer.post_norm.forward(&x)?;
            let mlp = layer
                .down
                .forward(&(layer.gate.forward(&h)?.silu()? * layer.up.forward(&h)?)?)?;
            x = (x + mlp)?;
            if let Some(add) = deepstack.get(li) {
                x = (x + add)?;
            }
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.tokens;
        }
        let keep_t = Tensor::new(keep, &self.device)?;
        self.norm.forward(&x.index_select(&keep_t, 0)?)
    }

    /// Logits (F32) of final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)?.to_dtype(DType::F32)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        seqs: &mut [SeqSlice<'_>],
        masks: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let n = h.dim(0)?;
        let hd = self.head_dim;
        let heads = |t: Tensor, count: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let t = t.reshape((n, count, hd))?;
            let t = match norm {
                Some(nm) => nm.forward(&t)?,
                None => t,
            };
            t.transpose(0, 1)?.contiguous()?.unsqueeze(0) // [1, count, n, hd]
        };
        let q = heads(layer.q.forward(h)?, self.heads, Some(&layer.q_norm))?;
        let k = heads(layer.k.forward(h)?, self.kv_heads, Some(&layer.k_norm))?;
        let v = heads(layer.v.forward(h)?, self.kv_heads, None)?.squeeze(0)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.squeeze(0)?;
        packed_attention(li, &q, &k, &v, seqs, masks)
    }
}

/// Causal masks of one packed step, one per sequence (`None` for a single new token, which sees
/// its whole cache), built once and used by every layer.
pub(crate) fn step_masks(
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
pub(crate) fn direct_attention(dtype: DType, device: &Device, hd: usize) -> bool {
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
pub(crate) fn packed_attention(
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
pub(crate) fn causal_mask(rep: usize, len: usize, past: usize, device: &Device) -> Result<Tensor> {
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

    fn cfg() -> TextConfig {
        TextConfig {
            vocab_size: 10,
            hidden_size: 32,
            intermediate_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            mrope_section: [2, 3, 3],
            attention_bias: false,
            max_position_embeddings: 64,
        }
    }

    #[test]
    fn interleaved_mrope_axes_follow_hf() {
        // HF: start from T everywhere, then H at 1::3 below 3*3=9 and W at 2::3 below 9.
        // With [2, 3, 3] over 8 frequencies that is T {0, 3, 6}, H {1, 4, 7}, W {2, 5}.
        assert_eq!(Rotary::new(&cfg()).axis, vec![0, 1, 2, 0, 1, 2, 0, 1]);
        let mut real = cfg();
        real.head_dim = 128;
        real.mrope_section = [24, 20, 20];
        let axis = Rotary::new(&real).axis;
        assert_eq!(axis.iter().filter(|&&a| a == 0).count(), 24);
        assert_eq!(axis.iter().filter(|&&a| a == 1).count(), 20);
        assert_eq!(axis.iter().filter(|&&a| a == 2).count(), 20);
    }

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
