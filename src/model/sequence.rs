//! Generation: one sequence's state between steps (its grammar, its scored values, its counts),
//! choosing the next token (under the grammar, or greedy), and the single-sequence loop.

use std::{sync::Arc, time::Instant};

use super::{
    constrain,
    qwen3vl::image_proc::ProcessedImage,
    values::{ScoredValue, ValueTracker},
    ModelError, TextModel,
};

/// Result of one generation.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// Generated text (special tokens removed).
    pub text: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Prompt tokens taken from the prefix cache instead of computed.
    pub cached_prompt_tokens: usize,
    /// Prefill wall time.
    pub prefill_ms: f64,
    /// Decode wall time.
    pub decode_ms: f64,
    /// Tag values as written, with their confidence.
    pub values: Vec<ScoredValue>,
    /// Grammar compile time (0 without a grammar or when cached).
    pub grammar_compile_ms: f64,
    /// Mean time to compute one token mask (µs; 0 without a grammar).
    pub mask_us: f64,
}

/// How to stop generating.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Prompt + generation limit.
    pub context_tokens: usize,
    /// Text already in the assistant turn (part of the prompt) that generation continues; with
    /// `stop_at_json_end`, it opens the JSON object.
    pub assistant_prefix: String,
    /// Stop once `assistant_prefix + text` holds a complete top-level JSON object.
    pub stop_at_json_end: bool,
    /// Lark grammar the output must follow (the caller's; see [`constrain`]); `None` decodes freely.
    pub grammar: Option<Arc<str>>,
    /// Leading prompt tokens that other prompts share ([`EncodedPrompt::shared_prefix`]); 0 for
    /// none. See [`prefix`].
    pub shared_prefix: usize,
}

/// One sequence's generation state between steps.
pub struct Sequence {
    params: GenParams,
    prompt_tokens: usize,
    out: Vec<u32>,
    tracker: ValueTracker,
    constraint: Option<constrain::Constraint>,
    grammar_compile_ms: f64,
    /// Prefill wall time (set by whoever ran the prefill).
    pub prefill_ms: f64,
    /// Prompt tokens taken from the prefix cache (set by whoever ran the prefill).
    pub cached_prompt_tokens: usize,
    decode_start: Instant,
}

impl Sequence {
    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.out.len()
    }

    /// Restarts the decode clock (when decoding starts after a batched prefill).
    pub fn start_decode_clock(&mut self) {
        self.decode_start = Instant::now();
    }
}

impl TextModel {
    /// Greedy generation from `prompt`, stopping on a stop token, `max_new_tokens`, a complete
    /// JSON object (when asked), or `cancelled()` (checked between steps).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenParams,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Generation, ModelError> {
        self.generate_with_images(prompt, &[], params, cancelled)
    }

    /// [`TextModel::generate`] with images for the prompt's image placeholders.
    pub fn generate_with_images(
        &mut self,
        prompt: &[u32],
        images: &[ProcessedImage],
        params: &GenParams,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Generation, ModelError> {
        let room = params.context_tokens.saturating_sub(params.max_new_tokens);
        let full = prompt.len() + self.extra_image_tokens(images);
        if full > room {
            return Err(ModelError::PromptTooLong {
                tokens: full,
                limit: room,
            });
        }
        if prompt.is_empty() {
            return Err(ModelError::internal("empty prompt"));
        }
        let t0 = Instant::now();
        let (mut logits, prompt_len) = self.prefill_shared(prompt, images, params.shared_prefix)?;
        let mut seq = self.start_sequence(params, prompt_len)?;
        seq.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        seq.cached_prompt_tokens = self.last_cached;
        loop {
            if cancelled() {
                return Err(ModelError::Cancelled);
            }
            match self.advance(&mut seq, &logits)? {
                Some(next) => logits = self.forward(&[next], prompt_len + seq.out.len() - 1)?,
                None => break,
            }
        }
        self.finish(seq)
    }

    /// A new sequence's generation state (compiles or reuses its grammar).
    pub fn start_sequence(
        &mut self,
        params: &GenParams,
        prompt_tokens: usize,
    ) -> Result<Sequence, ModelError> {
        let mut tracker = ValueTracker::default();
        tracker.push(params.assistant_prefix.as_bytes(), None);
        let (constraint, grammar_compile_ms) = match &params.grammar {
            Some(g) => {
                let (c, ms) = self.constrainer.start(g)?;
                (Some(c), ms)
            }
            None => (None, 0.0),
        };
        Ok(Sequence {
            params: params.clone(),
            prompt_tokens,
            out: Vec::with_capacity(params.max_new_tokens),
            tracker,
            constraint,
            grammar_compile_ms,
            prefill_ms: 0.0,
            cached_prompt_tokens: 0,
            decode_start: Instant::now(),
        })
    }

    /// Takes the next token from `logits` (under the sequence's grammar, or greedy): `Some(token)`
    /// to feed back, `None` when the sequence is finished (stop token, grammar complete, JSON
    /// object closed, or `max_new_tokens`).
    pub fn advance(&self, seq: &mut Sequence, logits: &[f32]) -> Result<Option<u32>, ModelError> {
        let params = &seq.params;
        if seq.out.len() >= params.max_new_tokens {
            return Ok(None);
        }
        let left = params.max_new_tokens - seq.out.len();
        let next = match seq.constraint.as_mut() {
            Some(c) => match c.choose(logits, &seq.tracker, left)? {
                Some(t) => t,
                None => return Ok(None),
            },
            None => argmax(logits),
        };
        if self.special.stop.contains(&next) {
            return Ok(None);
        }
        let tok_env = self.constrainer.tok_env();
        seq.tracker
            .push(tok_env.tok_trie().token(next), Some(log_prob(logits, next)));
        if let Some(c) = seq.constraint.as_mut() {
            c.consume(next, &seq.tracker)?;
        }
        seq.out.push(next);
        if params.stop_at_json_end && seq.constraint.is_none() {
            let text = self
                .tokenizer
                .decode(&seq.out, true)
                .map_err(ModelError::Tokenizer)?;
            if json_object_closed(&params.assistant_prefix, &text) {
                return Ok(None);
            }
        }
        if seq.out.len() == params.max_new_tokens {
            return Ok(None);
        }
        Ok(Some(next))
    }

    /// The finished sequence's text, counts and timings.
    pub fn finish(&self, seq: Sequence) -> Result<Generation, ModelError> {
        let text = self
            .tokenizer
            .decode(&seq.out, true)
            .map_err(ModelError::Tokenizer)?;
        let mask_us = seq
            .constraint
            .as_ref()
            .filter(|c| c.steps > 0)
            .map(|c| c.mask_us / c.steps as f64)
            .unwrap_or(0.0);
        Ok(Generation {
            text,
            prompt_tokens: seq.prompt_tokens,
            generated_tokens: seq.out.len(),
            cached_prompt_tokens: seq.cached_prompt_tokens,
            prefill_ms: seq.prefill_ms,
            decode_ms: seq.decode_start.elapsed().as_secs_f64() * 1e3,
            values: seq.tracker.values().to_vec(),
            grammar_compile_ms: seq.grammar_compile_ms,
            mask_us,
        })
    }
}

/// Log-probability of `token` under the softmax of `logits`.
pub fn log_prob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    logits[token as usize] - max - sum.ln()
}

/// Index of the largest logit (the first on ties, as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Whether `prefix + text` contains a complete top-level JSON object (braces balanced outside
/// strings, after the first `{`).
pub fn json_object_closed(prefix: &str, text: &str) -> bool {
    let mut depth = 0i32;
    let mut started = false;
    let mut in_str = false;
    let mut escaped = false;
    for c in prefix.chars().chain(text.chars()) {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' if started => in_str = true,
            '{' => {
                depth += 1;
                started = true;
            }
            '}' if started => {
                depth -= 1;
                if depth == 0 {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_end_detection() {
        assert!(!json_object_closed("{\"", "brand\": [\"a}\"]"));
        assert!(json_object_closed("{\"", "brand\": [\"a}\"]}"));
        assert!(json_object_closed("", "x {\"a\": {\"b\": 1}} y"));
        assert!(!json_object_closed("", "{\"a\": {\"b\": 1}"));
        assert!(!json_object_closed("", "{\"a\": \"\\\"}\""));
    }

    #[test]
    fn argmax_takes_first_max() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, 1.0]), 1);
    }
}
