//! A quantized llama-family decoder from GGUF over *packed* sequences (the `llama` architecture,
//! the default model's, and `qwen2`, which adds q/k/v biases and rotates half-split pairs), so
//! the engine can batch it: every sequence's new tokens in a step share one `[tokens, hidden]`
//! matrix for the quantized projections and the MLP, and attention runs per sequence against
//! that sequence's own KV cache (the Qwen3-VL decoder's scheme, `qwen3vl::text`).
//!
//! It computes what candle-transformers' `quantized_llama` and `quantized_qwen2` compute, op for op
//! (the same GGUF tensors, quantized matmuls, RMSNorms, RoPE with the same angle table, softmax
//! attention), but candle's models hold one sequence's cache. No sequence is padded and every op
//! is row-wise or per sequence, so a sequence's logits do not depend on what it is batched with
//! (`tests/it/model.rs` checks batched == alone, exactly); the llama.cpp parity tests run through
//! this code.

use std::io::{Read, Seek};

use candle_core::{quantized::gguf_file, DType, Device, Module, Result, Tensor};
use candle_nn::Embedding;
use candle_transformers::quantized_nn::RmsNorm;

use super::attention::{direct_attention, packed_attention, step_masks, KvCache, SeqSlice};
use tagllm_kernels::Projections;

struct Layer {
    /// q, k and v, one packed matrix on CPUs with AVX-512 VNNI (`qmatmul`).
    qkv: Projections,
    /// q, k and v biases (`qwen2`).
    qkv_bias: Option<[Tensor; 3]>,
    wo: Projections,
    attn_norm: RmsNorm,
    /// gate and up.
    gate_up: Projections,
    down: Projections,
    ffn_norm: RmsNorm,
}

/// How the pairs of a head's dimensions are rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rope {
    /// Adjacent pairs `(2i, 2i+1)`: llama GGUFs, whose q/k rows llama.cpp's converter permuted.
    Interleaved,
    /// Pairs `(i, i + d/2)` ("neox"): qwen2.
    Halves,
}

/// What a supported architecture changes in the llama decoder.
struct Family {
    /// Whether q, k and v have biases.
    qkv_bias: bool,
    rope: Rope,
}

fn family(arch: &str) -> Result<Family> {
    Ok(match arch {
        "llama" => Family {
            qkv_bias: false,
            rope: Rope::Interleaved,
        },
        "qwen2" => Family {
            qkv_bias: true,
            rope: Rope::Halves,
        },
        _ => candle_core::bail!("architecture {arch:?} is not a llama-family decoder we run"),
    })
}

/// The decoder.
pub struct Llama {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Projections,
    /// `1 / base^(2i/d)`, the rotary frequencies.
    theta: Vec<f32>,
    rope: Rope,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    device: Device,
}

impl Llama {
    /// Loads a GGUF of architecture `arch`, `llama` or `qwen2` (dense MLP; mixture-of-experts
    /// files are refused).
    pub fn from_gguf<R: Read + Seek>(
        arch: &str,
        ct: &gguf_file::Content,
        r: &mut R,
        device: &Device,
    ) -> Result<Llama> {
        let fam = family(arch)?;
        let md = |k: &str| {
            let key = format!("{arch}.{k}");
            ct.metadata
                .get(&key)
                .ok_or_else(|| candle_core::Error::Msg(format!("GGUF metadata {key} missing")))
        };
        if md("expert_count").and_then(|v| v.to_u32()).unwrap_or(0) > 1 {
            candle_core::bail!("mixture-of-experts {arch} models are not supported");
        }
        let heads = md("attention.head_count")?.to_u32()? as usize;
        let kv_heads = md("attention.head_count_kv")?.to_u32()? as usize;
        let blocks = md("block_count")?.to_u32()? as usize;
        let hidden = md("embedding_length")?.to_u32()? as usize;
        let eps = md("attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let base = md("rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!("unsupported {arch} shape: {heads} heads, {kv_heads} KV heads");
        }
        let head_dim = hidden / heads;
        // qwen2 files leave the rotary dimension out: the whole head rotates.
        let rope_dim = md("rope.dimension_count")
            .and_then(|v| v.to_u32())
            .map_or(head_dim, |d| d as usize);
        if rope_dim != head_dim || hidden != heads * head_dim {
            candle_core::bail!(
                "unsupported {arch} shape: rope dim {rope_dim}, head dim {head_dim}, hidden {hidden}, {heads} heads"
            );
        }
        let mut t = |name: &str| ct.tensor(r, name, device);
        let embed_q = t("token_embd.weight")?;
        let embed = Embedding::new(embed_q.dequantize(device)?, hidden);
        let norm = RmsNorm::from_qtensor(t("output_norm.weight")?, eps)?;
        let output = match t("output.weight") {
            Ok(w) => w,
            Err(_) => embed_q, // tied
        };
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut q = |n: &str| t(&format!("blk.{i}.{n}.weight"));
            let qkv = vec![q("attn_q")?, q("attn_k")?, q("attn_v")?];
            let wo = vec![q("attn_output")?];
            let (gate_up, down) = (vec![q("ffn_gate")?, q("ffn_up")?], vec![q("ffn_down")?]);
            let qkv_bias = if fam.qkv_bias {
                let mut b = |n: &str| t(&format!("blk.{i}.{n}.bias"))?.dequantize(device);
                Some([b("attn_q")?, b("attn_k")?, b("attn_v")?])
            } else {
                None
            };
            layers.push(Layer {
                qkv: Projections::new(qkv, true)?,
                qkv_bias,
                wo: Projections::new(wo, true)?,
                gate_up: Projections::new(gate_up, true)?,
                down: Projections::new(down, true)?,
                attn_norm: RmsNorm::from_qtensor(t(&format!("blk.{i}.attn_norm.weight"))?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(t(&format!("blk.{i}.ffn_norm.weight"))?, eps)?,
            });
        }
        Ok(Llama {
            embed,
            layers,
            norm,
            output: Projections::new(vec![output], true)?,
            theta: (0..head_dim)
                .step_by(2)
                .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
                .collect(),
            rope: fam.rope,
            heads,
            kv_heads,
            head_dim,
            device: device.clone(),
        })
    }

    /// An empty cache for one sequence of up to `cap` positions.
    pub fn new_cache(&self, cap: usize) -> Result<KvCache> {
        KvCache::with_shape(
            self.layers.len(),
            self.kv_heads,
            self.head_dim,
            cap,
            DType::F32,
            &self.device,
        )
    }

    /// One packed step: `tokens` holds every sequence's new tokens in `seqs` order, each
    /// continuing its cache. Returns the logits (F32) after each sequence's last new token,
    /// `[seqs.len(), vocab]`.
    pub fn forward(&self, tokens: &[u32], seqs: &mut [SeqSlice<'_>]) -> Result<Tensor> {
        let total: usize = seqs.iter().map(|s| s.tokens).sum();
        if total != tokens.len() || seqs.iter().any(|s| s.tokens == 0) {
            candle_core::bail!(
                "packed step: {total} tokens by sequence, {} given",
                tokens.len()
            );
        }
        let mut positions = Vec::with_capacity(total);
        let mut last = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            let past = s.cache.len();
            s.cache.reserve(past + s.tokens)?;
            positions.extend(past..past + s.tokens);
            last.push((positions.len() - 1) as u32);
        }
        // cos/sin rows as candle's table holds them: position x theta in F32.
        let half = self.theta.len();
        let angles: Vec<f32> = positions
            .iter()
            .flat_map(|&p| self.theta.iter().map(move |&t| p as f32 * t))
            .collect();
        let angles = Tensor::from_vec(angles, (total, half), &self.device)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);

        // Each sequence's causal mask, built once for every layer.
        let direct = direct_attention(DType::F32, &self.device, self.head_dim);
        let masks = step_masks(seqs, self.heads / self.kv_heads, direct, &self.device)?;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.forward(&ids)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let attn = self.attention(li, layer, &h, &cos, &sin, &masks, seqs)?;
            x = (x + layer.wo.forward1(&attn)?)?;
            let h = layer.ffn_norm.forward(&x)?;
            let [gate, up]: [Tensor; 2] = layer.gate_up.forward(&h)?.try_into().map_err(|_| {
                candle_core::Error::Msg("gate/up projections: two outputs expected".into())
            })?;
            let mlp = layer.down.forward1(&(candle_nn::ops::silu(&gate)? * up)?)?;
            x = (x + mlp)?;
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.tokens;
        }
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = self.norm.forward(&x.index_select(&last, 0)?)?;
        self.output.forward1(&x)?.to_dtype(DType::F32)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        masks: &[Option<Tensor>],
        seqs: &mut [SeqSlice<'_>],
    ) -> Result<Tensor> {
        let n = h.dim(0)?;
        let hd = self.head_dim;
        let heads = |t: Tensor, count: usize| -> Result<Tensor> {
            t.reshape((n, count, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0) // [1, count, n, hd]
        };
        let [mut q, mut k, mut v]: [Tensor; 3] =
            layer.qkv.forward(h)?.try_into().map_err(|_| {
                candle_core::Error::Msg("q/k/v projections: three outputs expected".into())
            })?;
        if let Some([bq, bk, bv]) = &layer.qkv_bias {
            q = q.broadcast_add(bq)?;
            k = k.broadcast_add(bk)?;
            v = v.broadcast_add(bv)?;
        }
        let q = heads(q, self.heads)?;
        let k = heads(k, self.kv_heads)?;
        let v = heads(v, self.kv_heads)?.squeeze(0)?;
        let rotate = match self.rope {
            Rope::Interleaved => candle_nn::rotary_emb::rope_i,
            Rope::Halves => candle_nn::rotary_emb::rope,
        };
        let q = rotate(&q, cos, sin)?.squeeze(0)?;
        let k = rotate(&k, cos, sin)?.squeeze(0)?;
        packed_attention(li, &q, &k, &v, seqs, masks)
    }
}
