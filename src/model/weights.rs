//! The loaded network, one variant per implementation, and its batch slots (one KV cache each).

use std::io::{Read, Seek};

use candle_core::{quantized::gguf_file, Tensor};

use super::{llama, qwen3vl, LoadOptions, ModelError};

/// The loaded network and its caches.
pub(super) enum Weights {
    /// A llama or qwen2 GGUF through our batched decoder ([`llama`]), with its batch slots.
    Llama(Box<LlamaWeights>),
    /// A Qwen3-VL checkpoint in Hugging Face layout, with its batch slots.
    Vl(Box<VlWeights>),
}

pub(super) struct LlamaWeights {
    pub(super) model: llama::Llama,
    /// The caches, allocated on first use and reused; the single-sequence path uses slot 0.
    pub(super) slots: Vec<Slot>,
}

/// The state after a shared prompt prefix: each layer's keys and values over its positions.
pub(super) type PrefixState = Vec<(Tensor, Tensor)>;

pub(super) struct VlWeights {
    pub(super) model: qwen3vl::Qwen3Vl,
    /// The caches, allocated on first use and reused; the single-sequence path uses slot 0.
    pub(super) slots: Vec<Slot>,
}

/// One batch slot: a lazily allocated cache of `cap` positions and its sequence's rope delta
/// (Qwen3-VL; 0 otherwise).
pub(super) struct Slot {
    pub(super) cache: Option<qwen3vl::KvCache>,
    pub(super) cap: usize,
    pub(super) rope_delta: i64,
}

impl Slot {
    pub(super) fn new(cap: usize) -> Slot {
        Slot {
            cache: None,
            cap,
            rope_delta: 0,
        }
    }

    pub(super) fn cache_with(
        &mut self,
        new: impl FnOnce(usize) -> candle_core::Result<qwen3vl::KvCache>,
    ) -> candle_core::Result<&mut qwen3vl::KvCache> {
        if self.cache.is_none() {
            self.cache = Some(new(self.cap)?);
        }
        Ok(self.cache.as_mut().expect("just allocated"))
    }

    pub(super) fn cache(
        &mut self,
        model: &qwen3vl::Qwen3Vl,
    ) -> candle_core::Result<&mut qwen3vl::KvCache> {
        self.cache_with(|cap| model.new_cache(cap))
    }
}

impl Weights {
    pub(super) fn from_gguf<R: Read + Seek>(
        arch: &str,
        ct: gguf_file::Content,
        r: &mut R,
        opts: &LoadOptions,
    ) -> candle_core::Result<Weights> {
        Ok(Weights::Llama(Box::new(LlamaWeights {
            model: llama::Llama::from_gguf(arch, &ct, r, &opts.device)?,
            slots: (0..opts.max_batch.max(1))
                .map(|_| Slot::new(opts.context_tokens))
                .collect(),
        })))
    }
}

/// Mutable borrows of distinct cache slots, in the order asked.
pub(super) fn slot_caches(
    slots: &mut [Slot],
    which: impl Iterator<Item = usize>,
) -> Result<Vec<&mut qwen3vl::KvCache>, ModelError> {
    let which: Vec<usize> = which.collect();
    let mut seen = vec![false; slots.len()];
    for &i in &which {
        if i >= slots.len() || std::mem::replace(&mut seen[i], true) {
            return Err(ModelError::internal(format!(
                "cache slot {i} is out of range or used twice"
            )));
        }
    }
    let mut by_index: Vec<Option<&mut qwen3vl::KvCache>> =
        slots.iter_mut().map(|s| s.cache.as_mut()).collect();
    which
        .iter()
        .map(|&i| {
            by_index[i]
                .take()
                .ok_or_else(|| ModelError::internal("cache slot not allocated"))
        })
        .collect()
}
