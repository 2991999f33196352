//! The Qwen3-VL text decoder (Qwen3 blocks: q/k RMSNorm per head, grouped-query attention, SwiGLU)
//! with interleaved multimodal RoPE, run over *packed* sequences: the new tokens of every sequence
//! in a step are stacked into one `[tokens, hidden]` matrix for the projections and MLPs, and
//! attention runs per sequence against that sequence's own KV cache. No sequence is padded, so a
//! row's result does not depend on what it is batched with.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, rms_norm, Embedding, Linear, RmsNorm, VarBuilder};

use super::config::TextConfig;
use super::linear::{proj_b, Proj};
use crate::model::attention::{direct_attention, packed_attention, step_masks, KvCache, SeqSlice};

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

/// A cache of `cap` positions for every layer of `cfg`.
pub fn new_cache(cfg: &TextConfig, cap: usize, dtype: DType, device: &Device) -> Result<KvCache> {
    KvCache::with_shape(
        cfg.num_hidden_layers,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cap,
        dtype,
        device,
    )
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
}
