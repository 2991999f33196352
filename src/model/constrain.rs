//! Constrained decoding with llguidance: the grammar of [`crate::tagging::grammar`] is compiled once per
//! category (cached; each note gets a cheap clone of the compiled matcher) and masks the logits at
//! every step, so every output parses and holds only handbook dimensions within the limits.
//!
//! On top of the grammar's mask, two decoding rules:
//! - **no repeated values**: a token that would close a value equal (after normalization) to one
//!   already written for this note is masked, unless nothing else is allowed;
//! - **closing in time**: when few new tokens are left, only tokens that close the value, the list
//!   or the object are allowed wherever the grammar permits one, so the answer always ends
//!   well-formed.

use std::{collections::HashMap, collections::HashSet, sync::Arc, time::Instant};

use llguidance::{
    api::TopLevelGrammar,
    toktrie::{SimpleVob, TokEnv, TokenId},
    Matcher, ParserFactory,
};

use super::values::ValueTracker;
use crate::domain::normalize;

/// Tokens left at which [`Constraint`] starts closing the answer. The longest forced path to the
/// end is a key literal (a few tokens), one value character, then `"`, `]` and `}`.
pub const CLOSING_MARGIN: usize = 16;

/// Compiled grammars for one tokenizer.
pub struct Constrainer {
    factory: ParserFactory,
    tok_env: TokEnv,
    cache: HashMap<Arc<str>, Matcher>,
    /// Tokens whose bytes contain `"`, with the bytes before the first one.
    quote_tokens: Arc<Vec<(TokenId, Vec<u8>)>>,
    /// Tokens that close the value being written: `"` then only `"`, `]`, `}`.
    value_closers: Arc<SimpleVob>,
    /// Tokens that close lists and the object: `]` or `}` then only `"`, `]`, `}`.
    closers: Arc<SimpleVob>,
    /// End-of-turn tokens.
    eos: Arc<SimpleVob>,
}

/// A constraint failure: the tokenizer could not be handed over, the grammar did not compile,
/// or llguidance's parser failed.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The tokenizer did not serialize.
    #[error("constraint: tokenizer: {0}")]
    Tokenizer(#[source] tokenizers::Error),
    /// The grammar did not compile.
    #[error("constraint: grammar: {0}")]
    Grammar(String),
    /// llguidance failed.
    #[error("constraint: {0}")]
    Llguidance(#[from] anyhow::Error),
}

impl Constrainer {
    /// Builds the token trie of `tokenizer` (handed over as JSON: llguidance links its own
    /// `tokenizers`); `stop` are the end-of-turn tokens the grammar's end allows.
    pub fn new(
        tokenizer: &tokenizers::Tokenizer,
        stop: &[u32],
    ) -> Result<Constrainer, ConstraintError> {
        let json = tokenizer
            .to_string(false)
            .map_err(ConstraintError::Tokenizer)?;
        let mut bt = toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(json.as_bytes())?;
        bt.set_eos_tokens(stop);
        let tok_env = bt.into_tok_env(Some(tokenizer.get_vocab_size(true)))?;
        let mut factory = ParserFactory::new_simple(&tok_env)?;
        factory.quiet();
        let trie = tok_env.tok_trie();
        let n = trie.vocab_size();
        let mut quote_tokens = Vec::new();
        let mut closers = SimpleVob::alloc(n);
        let mut value_closers = SimpleVob::alloc(n);
        for id in 0..n as TokenId {
            let bytes = trie.token(id);
            if bytes.is_empty() || bytes[0] == 0xFF {
                continue; // special tokens
            }
            if let Some(q) = bytes.iter().position(|&b| b == b'"') {
                quote_tokens.push((id, bytes[..q].to_vec()));
            }
            if bytes.iter().all(|b| matches!(b, b'"' | b']' | b'}')) {
                if bytes[0] == b'"' {
                    value_closers.allow_token(id);
                } else {
                    closers.allow_token(id);
                }
            }
        }
        let eos = Arc::new(trie.eos_token_set());
        Ok(Constrainer {
            eos,
            factory,
            tok_env,
            cache: HashMap::new(),
            quote_tokens: Arc::new(quote_tokens),
            value_closers: Arc::new(value_closers),
            closers: Arc::new(closers),
        })
    }

    /// Compiles `grammar` (cached by its text) and returns a fresh constraint for one generation,
    /// with the compile time in ms (0 when cached).
    pub fn start(&mut self, grammar: &Arc<str>) -> Result<(Constraint, f64), ConstraintError> {
        let mut compile_ms = 0.0;
        if !self.cache.contains_key(grammar) {
            let t = Instant::now();
            let parser = self
                .factory
                .create_parser(TopLevelGrammar::from_lark(grammar.to_string()))?;
            let m = Matcher::new(Ok(parser));
            if let Some(e) = m.get_error() {
                return Err(ConstraintError::Grammar(e.to_string()));
            }
            compile_ms = t.elapsed().as_secs_f64() * 1e3;
            self.cache.insert(grammar.clone(), m);
        }
        let matcher = self.cache[grammar].deep_clone();
        Ok((
            Constraint {
                matcher,
                quote_tokens: self.quote_tokens.clone(),
                value_closers: self.value_closers.clone(),
                closers: self.closers.clone(),
                eos: self.eos.clone(),
                seen: HashSet::new(),
                seen_count: 0,
                mask_us: 0.0,
                steps: 0,
            },
            compile_ms,
        ))
    }

    /// The token environment (token bytes by id).
    pub fn tok_env(&self) -> &TokEnv {
        &self.tok_env
    }
}

/// The constraint state of one generation.
pub struct Constraint {
    matcher: Matcher,
    quote_tokens: Arc<Vec<(TokenId, Vec<u8>)>>,
    value_closers: Arc<SimpleVob>,
    closers: Arc<SimpleVob>,
    eos: Arc<SimpleVob>,
    seen: HashSet<String>,
    seen_count: usize,
    /// Time spent choosing tokens (grammar mask, decoding rules, masked argmax; µs).
    pub mask_us: f64,
    /// Tokens chosen.
    pub steps: usize,
}

impl Constraint {
    /// Chooses the next token: the highest logit the grammar and the decoding rules allow, or
    /// `None` when the answer is complete. `tracker` holds the output so far; `left` is how many
    /// new tokens may still be generated.
    pub fn choose(
        &mut self,
        logits: &[f32],
        tracker: &ValueTracker,
        left: usize,
    ) -> Result<Option<TokenId>, ConstraintError> {
        let t = Instant::now();
        let r = self.choose_inner(logits, tracker, left);
        self.mask_us += t.elapsed().as_secs_f64() * 1e6;
        self.steps += 1;
        r
    }

    fn choose_inner(
        &mut self,
        logits: &[f32],
        tracker: &ValueTracker,
        left: usize,
    ) -> Result<Option<TokenId>, ConstraintError> {
        if self.matcher.is_stopped() {
            return Ok(None);
        }
        let mut mask = self.matcher.compute_mask()?;
        mask.sub(&self.eos);
        if mask.is_zero() {
            return Ok(None); // only end-of-turn is left: the answer is complete
        }
        if tracker.in_value() && !self.seen.is_empty() {
            let mut pruned = mask.clone();
            // One buffer for every candidate: the value so far, then each token's bytes before its quote.
            let value = tracker.current_value();
            let mut v = Vec::with_capacity(value.len() + 16);
            for (tok, before) in self.quote_tokens.iter() {
                if pruned.is_allowed(*tok) {
                    v.clear();
                    v.extend_from_slice(value);
                    v.extend_from_slice(before);
                    if let Ok(s) = std::str::from_utf8(&v) {
                        if self.seen.contains(&normalize(s)) {
                            pruned.disallow_token(*tok);
                        }
                    }
                }
            }
            if !pruned.is_zero() {
                mask = pruned;
            }
        }
        if left <= CLOSING_MARGIN {
            // Inside a value `]` and `}` are ordinary characters: only a quote closes it.
            let closers = if tracker.in_value() {
                &self.value_closers
            } else {
                &self.closers
            };
            if !mask.and_is_zero(closers) {
                mask.and(closers);
            }
        }
        let mut best: Option<(TokenId, f32)> = None;
        mask.iter_set_entries(|i| {
            if let Some(&l) = logits.get(i) {
                if best.is_none_or(|(_, b)| l > b) {
                    best = Some((i as TokenId, l));
                }
            }
        });
        Ok(best.map(|(t, _)| t))
    }

    /// Whether the grammar accepts exactly this token sequence as a complete answer (for tests and
    /// tools; consumes the constraint).
    pub fn accepts(mut self, tokens: &[TokenId]) -> bool {
        match self.matcher.validate_tokens(tokens) {
            Ok(n) if n == tokens.len() => {}
            _ => return false,
        }
        if self.matcher.consume_tokens(tokens).is_err() {
            return false;
        }
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// Advances the grammar by `token`; `tracker` must already include the token's bytes.
    pub fn consume(
        &mut self,
        token: TokenId,
        tracker: &ValueTracker,
    ) -> Result<(), ConstraintError> {
        self.matcher.consume_token(token)?;
        for v in &tracker.values()[self.seen_count..] {
            self.seen.insert(normalize(&v.value));
        }
        self.seen_count = tracker.values().len();
        Ok(())
    }
}
