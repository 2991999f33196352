//! The model layer, candle only, a leaf of the crate: it knows prompts as chat messages and
//! answers as text, never a handbook, a tag or a feature. It loads a quantized GGUF text model of
//! the llama family or a Qwen3-VL checkpoint ([`load`]), encodes chat prompts ([`encode`]),
//! generates under a grammar or freely ([`sequence`], [`constrain`]), runs batches through cache
//! slots ([`batch`]), and owns the engine thread that serves jobs with continuous batching
//! ([`engine`], [`scheduler`]). Nothing here runs on a Tokio worker.

pub mod adapter;
pub mod attention;
pub mod batch;
pub mod chat;
pub mod constrain;
pub mod encode;
pub mod engine;
pub mod llama;
pub mod load;
pub mod prefix;
pub mod qwen3vl;
pub mod scheduler;
pub mod sequence;
pub mod tokenizer;
pub mod values;
mod weights;

use std::sync::Arc;

pub use batch::{Prefilled, PromptInput};
pub use encode::EncodedPrompt;
pub use load::{parse_device, LoadOptions, Requantize, SUPPORTED_ARCHITECTURES};
pub use sequence::{argmax, json_object_closed, log_prob, GenParams, Generation, Sequence};

use chat::ChatTemplate;
use qwen3vl::image_proc::{ProcessedImage, ProcessorConfig};
use tokenizer::SpecialTokens;
use weights::{PrefixState, Weights};

/// A model failure.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be read or is not a supported model.
    #[error("loading {path}: {reason}")]
    Load {
        /// The model file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The prompt does not fit the context.
    #[error("the prompt is {tokens} tokens, over the {limit} the context leaves for it")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Room in the context after `max_new_tokens`.
        limit: usize,
    },
    /// The caller went away.
    #[error("cancelled")]
    Cancelled,
    /// The grammar did not compile, or the constrained parser failed.
    #[error("{0}")]
    Constraint(#[from] constrain::ConstraintError),
    /// candle failed at run time.
    #[error("model: {0}")]
    Candle(#[from] candle_core::Error),
    /// The tokenizer failed.
    #[error("model: tokenizer: {0}")]
    Tokenizer(#[source] tokenizers::Error),
    /// The chat template failed to render.
    #[error("model: {0}")]
    Template(#[from] chat::TemplateError),
    /// Anything else at run time: a broken invariant of this layer, or a failure passed on to
    /// every sequence of a failed batch step. The message says which.
    #[error("model: {0}")]
    Runtime(String),
}

impl ModelError {
    /// A [`ModelError::Runtime`] saying `message`.
    pub(crate) fn internal(message: impl Into<String>) -> ModelError {
        ModelError::Runtime(message.into())
    }
}

/// What the model is, for versions and responses.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Stable id: file stem, digest prefix, weight format. Part of the idempotency key.
    pub version: String,
    /// `general.name` from the file, or the file stem.
    pub name: String,
    /// Architecture (`llama`, `qwen2`, ...).
    pub architecture: String,
    /// Whether the model reads images (GGUF text models do not).
    pub multimodal: bool,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// How images are turned into pixels for the vision tower (multimodal models only), with the
    /// service's pixel cap applied.
    pub image_processor: Option<Arc<ProcessorConfig>>,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

/// A loaded text model with its tokenizer and chat template.
pub struct TextModel {
    weights: Weights,
    tokenizer: tokenizers::Tokenizer,
    /// The same tokenizer with special tokens treated as text, for untrusted message contents.
    text_tokenizer: tokenizers::Tokenizer,
    special: SpecialTokens,
    template: ChatTemplate,
    constrainer: constrain::Constrainer,
    /// States after shared prompt prefixes (llama-family GGUF models).
    prefixes: prefix::PrefixCache<PrefixState>,
    /// Token ids of shared message heads, by text ([`TextModel::head_ids`]).
    head_memo: std::sync::Mutex<std::collections::HashMap<String, Arc<[u32]>>>,
    /// Prompt tokens the last [`TextModel::prefill`] took from the prefix cache.
    last_cached: usize,
    /// What it is.
    pub info: ModelInfo,
}

impl TextModel {
    /// LLM tokens the images add to a prompt beyond their one placeholder each.
    pub fn extra_image_tokens(&self, images: &[ProcessedImage]) -> usize {
        match &self.weights {
            Weights::Vl(w) => {
                let merge = w.model.config.vision.spatial_merge_size;
                images
                    .iter()
                    .map(|p| p.llm_tokens(merge).saturating_sub(1))
                    .sum()
            }
            _ => 0,
        }
    }

    /// The Qwen3-VL model, when that is what this is (for tests and benchmarks of its batch API).
    pub fn qwen3vl(&self) -> Option<&qwen3vl::Qwen3Vl> {
        match &self.weights {
            Weights::Vl(w) => Some(&w.model),
            _ => None,
        }
    }

    /// The grammar compiler for this model's tokenizer.
    pub fn constrainer(&mut self) -> &mut constrain::Constrainer {
        &mut self.constrainer
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }
}
