//! Running prompts through the network: the single-sequence path (slot 0), batched prefill into
//! cache slots, one packed decode step for several sequences, and the llama decoder's prefill
//! through the prefix cache.

use candle_core::Tensor;

use super::{
    prefix, qwen3vl,
    qwen3vl::image_proc::ProcessedImage,
    weights::{slot_caches, LlamaWeights, PrefixState, VlWeights, Weights},
    ModelError, TextModel,
};

/// One prompt of a batched prefill.
#[derive(Debug, Clone, Copy)]
pub struct PromptInput<'a> {
    /// Its token ids.
    pub ids: &'a [u32],
    /// Images for its image placeholders, in order (multimodal models).
    pub images: &'a [ProcessedImage],
    /// The free cache slot it goes into.
    pub slot: usize,
    /// Leading tokens that other prompts share ([`super::EncodedPrompt::shared_prefix`]).
    pub shared_prefix: usize,
}

/// One prompt's prefill: its next-token logits, its length in tokens (images expanded), and how
/// many of them came from the prefix cache.
#[derive(Debug, Clone)]
pub struct Prefilled {
    /// Next-token logits.
    pub logits: Vec<f32>,
    /// Prompt tokens.
    pub tokens: usize,
    /// Prompt tokens restored from the prefix cache instead of computed.
    pub cached: usize,
}

impl TextModel {
    /// Next-token logits (f32, vocabulary-sized) after feeding `tokens` at `pos`.
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        // The single-sequence path is batch slot 0.
        if pos == 0 {
            return self.prefill(tokens, &[]).map(|(l, _)| l);
        }
        if let Weights::Llama(w) = &mut self.weights {
            let cached = w.slots[0].cache.as_ref().map_or(0, |c| c.len());
            if cached != pos {
                return Err(ModelError::internal(format!(
                    "position {pos} after {cached} cached tokens"
                )));
            }
            return Ok(llama_step(w, &[(tokens, 0)])?.remove(0));
        }
        let mut last = None;
        for &t in tokens {
            last = self.decode_batch(&[(t, 0)])?.pop();
        }
        last.ok_or_else(|| ModelError::internal("no tokens"))
    }

    /// Feeds a whole prompt to an empty sequence; `images` fill the prompt's image placeholders,
    /// in order (multimodal models only). Returns the next-token logits and the prompt's length in
    /// tokens once images are expanded.
    pub fn prefill(
        &mut self,
        prompt: &[u32],
        images: &[ProcessedImage],
    ) -> Result<(Vec<f32>, usize), ModelError> {
        self.prefill_shared(prompt, images, 0)
    }

    /// [`TextModel::prefill`] of a prompt whose first `shared_prefix` tokens other prompts share
    /// ([`EncodedPrompt::shared_prefix`]): GGUF models compute them as a chunk of their own and
    /// keep the state after them in the prefix cache, or start from the cached state.
    pub fn prefill_shared(
        &mut self,
        prompt: &[u32],
        images: &[ProcessedImage],
        shared_prefix: usize,
    ) -> Result<(Vec<f32>, usize), ModelError> {
        // The single-sequence path is batch slot 0.
        let p = self
            .prefill_batch(&[PromptInput {
                ids: prompt,
                images,
                slot: 0,
                shared_prefix,
            }])?
            .pop()
            .ok_or_else(|| ModelError::internal("no logits"))?;
        self.last_cached = p.cached;
        Ok((p.logits, p.tokens))
    }

    /// Whether the model state after exactly `ids` is in the prefix cache (so a prompt starting
    /// with them computes only the rest).
    pub fn prefix_cached(&self, ids: &[u32]) -> bool {
        self.prefixes.contains(ids)
    }

    /// Prompt tokens the last single-sequence prefill took from the prefix cache, and the total
    /// since load.
    pub fn prefix_cache_hits(&self) -> (usize, u64) {
        (self.last_cached, self.prefixes.hit_tokens)
    }

    /// Sequences this model can run in one step: its cache slots (`max_batch`).
    pub fn max_batch(&self) -> usize {
        match &self.weights {
            Weights::Vl(w) => w.slots.len(),
            Weights::Llama(w) => w.slots.len(),
        }
    }

    /// Prefills several prompts at once into their free cache slots (batching models only; the
    /// llama models take each shared prefix from, or add it to, the prefix cache).
    pub fn prefill_batch(
        &mut self,
        prompts: &[PromptInput<'_>],
    ) -> Result<Vec<Prefilled>, ModelError> {
        if let Weights::Llama(w) = &mut self.weights {
            return llama_prefill(w, &mut self.prefixes, prompts);
        }
        let Weights::Vl(w) = &mut self.weights else {
            return Err(ModelError::internal("this model does not batch"));
        };
        let VlWeights { model, slots, .. } = &mut **w;
        let mut prepared = Vec::with_capacity(prompts.len());
        for input in prompts {
            let p = model
                .prepare(input.ids, input.images)
                .map_err(ModelError::Runtime)?;
            let s = slots
                .get_mut(input.slot)
                .ok_or_else(|| ModelError::internal("no such cache slot"))?;
            let cache = s.cache(model)?;
            if p.tokens.len() > cache.capacity() {
                return Err(ModelError::PromptTooLong {
                    tokens: p.tokens.len(),
                    limit: cache.capacity(),
                });
            }
            cache.reset();
            s.rope_delta = p.rope_delta;
            prepared.push(p);
        }
        let refs: Vec<&qwen3vl::Prepared> = prepared.iter().collect();
        let mut caches = slot_caches(slots, prompts.iter().map(|p| p.slot))?;
        let logits = model.prefill(&refs, &mut caches, false)?;
        logits
            .into_iter()
            .zip(&prepared)
            .map(|(l, p)| {
                Ok(Prefilled {
                    logits: l.to_vec1::<f32>()?,
                    tokens: p.tokens.len(),
                    cached: 0,
                })
            })
            .collect()
    }

    /// One decode step for several sequences: `steps[i] = (token, slot)`. Returns each
    /// sequence's next-token logits.
    pub fn decode_batch(&mut self, steps: &[(u32, usize)]) -> Result<Vec<Vec<f32>>, ModelError> {
        if let Weights::Llama(w) = &mut self.weights {
            let tokens: Vec<[u32; 1]> = steps.iter().map(|s| [s.0]).collect();
            let items: Vec<(&[u32], usize)> = tokens
                .iter()
                .zip(steps)
                .map(|(t, s)| (&t[..], s.1))
                .collect();
            return llama_step(w, &items);
        }
        let Weights::Vl(w) = &mut self.weights else {
            return Err(ModelError::internal("this model does not batch"));
        };
        let VlWeights { model, slots, .. } = &mut **w;
        let tokens: Vec<u32> = steps.iter().map(|s| s.0).collect();
        let deltas: Vec<i64> = steps
            .iter()
            .map(|s| slots.get(s.1).map(|x| x.rope_delta).unwrap_or(0))
            .collect();
        let mut caches = slot_caches(slots, steps.iter().map(|s| s.1))?;
        let logits = model.decode(&tokens, &deltas, &mut caches)?;
        logits
            .into_iter()
            .map(|l| l.to_vec1::<f32>().map_err(ModelError::from))
            .collect()
    }
}

/// One packed step of the llama decoder: `(new tokens, slot)` each, every slot continuing its
/// cache (allocated on first use). Returns each item's next-token logits.
fn llama_step(
    w: &mut LlamaWeights,
    items: &[(&[u32], usize)],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let LlamaWeights { model, slots } = w;
    for &(_, slot) in items {
        slots
            .get_mut(slot)
            .ok_or_else(|| ModelError::internal("no such cache slot"))?
            .cache_with(|cap| model.new_cache(cap))?;
    }
    let tokens: Vec<u32> = items.iter().flat_map(|i| i.0.iter().copied()).collect();
    let mut caches = slot_caches(slots, items.iter().map(|i| i.1))?;
    let mut seqs: Vec<super::attention::SeqSlice<'_>> = caches
        .iter_mut()
        .zip(items)
        .map(|(cache, item)| super::attention::SeqSlice {
            tokens: item.0.len(),
            cache,
        })
        .collect();
    let logits = model.forward(&tokens, &mut seqs)?;
    (0..items.len())
        .map(|i| {
            logits
                .get(i)
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(ModelError::from)
        })
        .collect()
}

/// Prefill for the llama decoder. A prompt's shared prefix (at least
/// [`prefix::PrefixCache::MIN_TOKENS`] and short of the whole prompt) is always its own chunk:
/// restored from the prefix cache, or computed in a first packed step and then stored; the rest
/// of every prompt goes in a second packed step. So a cached prefix gives the same bits as a
/// fresh one.
fn llama_prefill(
    w: &mut LlamaWeights,
    prefixes: &mut prefix::PrefixCache<PrefixState>,
    prompts: &[PromptInput<'_>],
) -> Result<Vec<Prefilled>, ModelError> {
    let mut starts = Vec::with_capacity(prompts.len());
    let mut cached = Vec::with_capacity(prompts.len());
    // Prefixes to compute (once each), and prompts that wait for one of them.
    let mut first: Vec<(&[u32], usize)> = Vec::new();
    let mut later: Vec<(usize, usize, &[u32])> = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (ids, images, slot, shared) = (p.ids, p.images, p.slot, p.shared_prefix);
        if !images.is_empty() {
            return Err(ModelError::internal("this model reads no images"));
        }
        if ids.is_empty() {
            return Err(ModelError::internal("empty prompt"));
        }
        let s = w
            .slots
            .get_mut(slot)
            .ok_or_else(|| ModelError::internal("no such cache slot"))?;
        let model = &w.model;
        let cache = s.cache_with(|cap| model.new_cache(cap))?;
        if ids.len() > cache.capacity() {
            return Err(ModelError::PromptTooLong {
                tokens: ids.len(),
                limit: cache.capacity(),
            });
        }
        cache.reset();
        let chunked = prefix::is_chunk(shared, ids.len());
        let mut hit = 0;
        if chunked {
            let head = &ids[..shared];
            let enabled = prefixes.enabled();
            match prefixes.get(head) {
                Some(state) => {
                    restore(cache, state)?;
                    hit = shared;
                }
                // Another prompt of this batch computes the same prefix: take it from there.
                None if enabled && first.iter().any(|f| f.0 == head) => later.push((i, slot, head)),
                None => first.push((head, slot)),
            }
        }
        starts.push(if chunked { shared } else { 0 });
        cached.push(hit);
    }
    if !first.is_empty() {
        llama_step(w, &first)?;
        for &(ids, slot) in &first {
            let cache = w.slots[slot]
                .cache
                .as_ref()
                .ok_or_else(|| ModelError::internal("no cache"))?;
            let state = cache
                .layers
                .iter()
                .map(|(k, v)| {
                    // A compact copy of its own, never a view of the slot's cache (a
                    // non-contiguous narrow is copied by `contiguous`; a contiguous one is a
                    // view, so it is copied explicitly).
                    let own = |t: &Tensor| {
                        let v = t.narrow(1, 0, ids.len())?;
                        if v.is_contiguous() {
                            v.copy()
                        } else {
                            v.contiguous()
                        }
                    };
                    Ok((own(k)?, own(v)?))
                })
                .collect::<candle_core::Result<PrefixState>>()?;
            prefixes.insert(ids, state);
        }
        for &(i, slot, head) in &later {
            let state = prefixes
                .get(head)
                .ok_or_else(|| ModelError::internal("prefix state evicted"))?;
            let cache = w.slots[slot]
                .cache
                .as_mut()
                .ok_or_else(|| ModelError::internal("no cache"))?;
            restore(cache, state)?;
            cached[i] = head.len();
        }
    }
    let rest: Vec<(&[u32], usize)> = prompts
        .iter()
        .zip(&starts)
        .map(|(p, &start)| (&p.ids[start..], p.slot))
        .collect();
    let logits = llama_step(w, &rest)?;
    Ok(logits
        .into_iter()
        .zip(prompts)
        .zip(cached)
        .map(|((logits, p), cached)| Prefilled {
            logits,
            tokens: p.ids.len(),
            cached,
        })
        .collect())
}

/// Puts a prefix state into an empty cache.
fn restore(cache: &mut qwen3vl::KvCache, state: &PrefixState) -> Result<(), ModelError> {
    let len = state.first().map_or(0, |(k, _)| k.dims()[1]);
    cache.reserve(len)?;
    for ((k, v), (kc, vc)) in state.iter().zip(&cache.layers) {
        kc.slice_set(k, 1, 0)?;
        vc.slice_set(v, 1, 0)?;
    }
    cache.len = len;
    Ok(())
}
