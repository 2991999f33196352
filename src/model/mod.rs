//! Everything candle: loading a quantized GGUF text model of the llama family, its tokenizer and
//! chat template from the file's metadata, and greedy generation. The model is owned by the engine
//! thread ([`engine`]); nothing here runs on a Tokio worker.

pub mod adapter;
pub mod chat;
pub mod constrain;
pub mod engine;
pub mod llama;
pub mod prefix;
pub mod qwen3vl;
pub mod tokenizer;

use std::{
    fs::File,
    io::{Cursor, Read, Seek},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use candle_core::{
    quantized::{gguf_file, GgmlDType, QTensor},
    DType, Device, Tensor,
};
use candle_transformers::models::quantized_qwen2;
use sha2::{Digest, Sha256};

use crate::config::Requantize;
use crate::tags::ValueTracker;
use chat::{ChatTemplate, Message, CHATML, CHATML_VL};
use qwen3vl::image_proc::{ProcessedImage, ProcessorConfig};
use tokenizer::SpecialTokens;

/// Shared message heads whose token ids are memoized (one per category in practice); the memo
/// is emptied when full.
const HEAD_MEMO_ENTRIES: usize = 256;

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
    /// candle, the tokenizer or the template failed at run time.
    #[error("model: {0}")]
    Runtime(String),
}

fn rt(e: impl std::fmt::Display) -> ModelError {
    ModelError::Runtime(e.to_string())
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

/// The loaded network and its caches.
enum Weights {
    /// A llama GGUF through our batched decoder ([`llama`]), with its batch slots.
    Llama(Box<LlamaWeights>),
    /// A qwen2 GGUF through candle-transformers (one sequence).
    Qwen2(Box<quantized_qwen2::ModelWeights>),
    /// A Qwen3-VL checkpoint in Hugging Face layout, with its batch slots.
    Vl(Box<VlWeights>),
}

struct LlamaWeights {
    model: llama::Llama,
    /// The caches, allocated on first use and reused; the single-sequence path uses slot 0.
    slots: Vec<Slot>,
}

/// The state after a shared prompt prefix: each layer's keys and values over its positions.
type PrefixState = Vec<(Tensor, Tensor)>;

struct VlWeights {
    model: qwen3vl::Qwen3Vl,
    /// The caches, allocated on first use and reused; the single-sequence path uses slot 0.
    slots: Vec<Slot>,
}

/// One batch slot: a lazily allocated cache of `cap` positions and its sequence's rope delta
/// (Qwen3-VL; 0 otherwise).
struct Slot {
    cache: Option<qwen3vl::KvCache>,
    cap: usize,
    rope_delta: i64,
}

impl Slot {
    fn new(cap: usize) -> Slot {
        Slot {
            cache: None,
            cap,
            rope_delta: 0,
        }
    }

    fn cache_with(
        &mut self,
        new: impl FnOnce(usize) -> candle_core::Result<qwen3vl::KvCache>,
    ) -> candle_core::Result<&mut qwen3vl::KvCache> {
        if self.cache.is_none() {
            self.cache = Some(new(self.cap)?);
        }
        Ok(self.cache.as_mut().expect("just allocated"))
    }

    fn cache(&mut self, model: &qwen3vl::Qwen3Vl) -> candle_core::Result<&mut qwen3vl::KvCache> {
        self.cache_with(|cap| model.new_cache(cap))
    }
}

impl Weights {
    fn from_gguf<R: Read + Seek>(
        arch: &str,
        ct: gguf_file::Content,
        r: &mut R,
        opts: &LoadOptions,
    ) -> candle_core::Result<Weights> {
        let device = &opts.device;
        Ok(match arch {
            "qwen2" => Weights::Qwen2(Box::new(quantized_qwen2::ModelWeights::from_gguf(
                ct, r, device,
            )?)),
            _ => Weights::Llama(Box::new(LlamaWeights {
                model: llama::Llama::from_gguf(&ct, r, device)?,
                slots: (0..opts.max_batch.max(1))
                    .map(|_| Slot::new(opts.context_tokens))
                    .collect(),
            })),
        })
    }

    /// Logits of the last position; `pos == 0` starts a new sequence (the KV cache is reset).
    /// candle-transformers' models only (the others step through their slots).
    fn forward(&mut self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        match self {
            Weights::Qwen2(m) => m.forward(x, pos),
            Weights::Llama(_) | Weights::Vl(_) => {
                candle_core::bail!("batching models step through their slots")
            }
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Weight format of GGUF models in memory.
    pub requantize: Requantize,
    /// Prompt + generation limit; Qwen3-VL's KV cache is allocated to this size once.
    pub context_tokens: usize,
    /// Where the model runs.
    pub device: Device,
    /// Weight dtype of Hugging Face checkpoints (`None`: F32 on CPU, BF16 on CUDA).
    pub dtype: Option<DType>,
    /// Images are resized to at most this many pixels (one LLM token per 32x32 pixels).
    pub image_max_pixels: usize,
    /// Sequences decoded together (models that batch: Qwen3-VL and llama-family GGUFs); each has
    /// its own KV cache, which grows with use up to `context_tokens` positions.
    pub max_batch: usize,
    /// Model states after shared prompt prefixes kept for reuse (GGUF models; 0 disables).
    pub prefix_cache: usize,
    /// A LoRA adapter in PEFT's format, merged into a GGUF model at load ([`adapter`]).
    pub adapter: Option<PathBuf>,
}

impl LoadOptions {
    /// CPU defaults with `requantize`.
    pub fn cpu(requantize: Requantize) -> LoadOptions {
        LoadOptions {
            requantize,
            context_tokens: 4096,
            device: Device::Cpu,
            dtype: None,
            image_max_pixels: 200_704,
            max_batch: 1,
            prefix_cache: 8,
            adapter: None,
        }
    }
}

/// Parses a device name: `cpu`, `cuda` or `cuda:N` (the latter two need the `cuda` feature).
pub fn parse_device(name: &str) -> Result<Device, String> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match name.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| format!("{name:?} is not \"cpu\", \"cuda\" or \"cuda:N\""))?,
                None => return Err(format!("{name:?} is not \"cpu\", \"cuda\" or \"cuda:N\"")),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(format!(
                    "device {name:?}: this build has no CUDA support (build with --features cuda)"
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| format!("device {name:?}: {e}"))
        }
    }
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match d.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".into(),
        },
        _ => format!("{:?}", d.location()),
    }
}

/// The same tokenizer with special tokens treated as text, for untrusted message contents.
fn text_tokenizer(tokenizer: &tokenizers::Tokenizer) -> tokenizers::Tokenizer {
    let mut t = tokenizer.clone();
    t.set_encode_special_tokens(true);
    t
}

/// GGUF architectures (`general.architecture`) that load (a Qwen3-VL checkpoint is a directory).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2"];

/// A loaded text model with its tokenizer and chat template.
pub struct TextModel {
    weights: Weights,
    tokenizer: tokenizers::Tokenizer,
    /// The same tokenizer with special tokens treated as text, for untrusted message contents.
    text_tokenizer: tokenizers::Tokenizer,
    special: SpecialTokens,
    template: ChatTemplate,
    constrainer: constrain::Constrainer,
    device: Device,
    /// States after shared prompt prefixes (GGUF models).
    prefixes: prefix::PrefixCache<PrefixState>,
    /// Token ids of shared message heads, by text ([`TextModel::head_ids`]).
    head_memo: std::sync::Mutex<std::collections::HashMap<String, Arc<[u32]>>>,
    /// Prompt tokens the last [`TextModel::prefill`] took from the prefix cache.
    last_cached: usize,
    /// What it is.
    pub info: ModelInfo,
}

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
    pub values: Vec<crate::tags::ScoredValue>,
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
    /// Lark grammar the output must follow ([`crate::grammar`]); `None` decodes freely.
    pub grammar: Option<Arc<str>>,
    /// Leading prompt tokens that other prompts share ([`EncodedPrompt::shared_prefix`]); 0 for
    /// none. See [`prefix`].
    pub shared_prefix: usize,
}

/// A chat prompt's token ids, from [`TextModel::encode_chat_within`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    /// The ids.
    pub ids: Vec<u32>,
    /// Whether the last message was cut to fit.
    pub truncated: bool,
    /// Ids before the last message's content (the template's turns before it and its opening),
    /// plus those of the content's shared head ([`Message::shared_head`], the handbook guidance):
    /// the part that prompts of the same category share.
    pub shared_prefix: usize,
}

fn load_err(path: &Path, reason: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn file_digest(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Rewrites a GGUF in memory: an adapter's updates merged into their matrices (stored as Q8_0),
/// and, with `q4_1_to_q8_0`, the other Q4_1 matrices as Q8_0 (see [`Requantize::Q8_0`]). `None`
/// when nothing changes.
fn rewrite_gguf<R: Read + Seek>(
    ct: &gguf_file::Content,
    reader: &mut R,
    q4_1_to_q8_0: bool,
    adapter: Option<&adapter::LoraAdapter>,
) -> candle_core::Result<Option<Cursor<Vec<u8>>>> {
    let requant = q4_1_to_q8_0
        && ct
            .tensor_infos
            .values()
            .any(|t| t.ggml_dtype == GgmlDType::Q4_1);
    if !requant && adapter.is_none() {
        return Ok(None);
    }
    if let Some(a) = adapter {
        if let Some(missing) = a.deltas.keys().find(|k| !ct.tensor_infos.contains_key(*k)) {
            candle_core::bail!("adapter {}: the model has no {missing}", a.name);
        }
    }
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = ct.tensor(reader, name, &Device::Cpu)?;
        let t = match adapter.and_then(|a| a.deltas.get(name)) {
            Some(delta) => {
                let w = t.dequantize(&Device::Cpu)?;
                if w.dims() != delta.dims() {
                    candle_core::bail!(
                        "adapter update for {name} is {:?}, the matrix is {:?}",
                        delta.dims(),
                        w.dims()
                    );
                }
                QTensor::quantize(&(w + delta)?, GgmlDType::Q8_0)?
            }
            None if requant && t.dtype() == GgmlDType::Q4_1 => {
                QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
            }
            None => t,
        };
        tensors.push((name.as_str(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &metadata, &tensor_refs)?;
    buf.set_position(0);
    Ok(Some(buf))
}

impl TextModel {
    /// Loads a model on the CPU with default options: see [`TextModel::load_with`].
    pub fn load(path: &Path, requantize: Requantize) -> Result<TextModel, ModelError> {
        TextModel::load_with(path, &LoadOptions::cpu(requantize))
    }

    /// Loads `path`: a directory is a Hugging Face checkpoint (Qwen3-VL, our own implementation,
    /// [`qwen3vl`]); a file is a quantized GGUF text model of the llama family: `llama` (our
    /// batched decoder, [`llama`]) or `qwen2` (candle-transformers' quantized implementation, one
    /// sequence at a time).
    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<TextModel, ModelError> {
        if path.is_dir() {
            if let Some(a) = &opts.adapter {
                return Err(load_err(
                    a,
                    "adapters are merged into GGUF models only (Qwen3-VL checkpoints: merge it with PEFT first)",
                ));
            }
            return TextModel::load_hf_dir(path, opts);
        }
        let requantize = opts.requantize;
        let device = opts.device.clone();
        let digest = file_digest(path).map_err(|e| load_err(path, e))?;
        let mut file = File::open(path).map_err(|e| load_err(path, e))?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| load_err(path, e))?;
        let md_str = |k: &str| ct.metadata.get(k).and_then(|v| v.to_string().ok()).cloned();
        let architecture = md_str("general.architecture").unwrap_or_default();
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(load_err(
                path,
                format!(
                    "architecture {architecture:?} is not supported (supported: {})",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            ));
        }
        let (tokenizer, special) = tokenizer::from_gguf(&ct).map_err(|e| load_err(path, e))?;
        let template_src = md_str("tokenizer.chat_template").unwrap_or_else(|| CHATML.to_string());
        let template = ChatTemplate::new(&template_src, &special.bos_text, &special.eos_text)
            .map_err(|e| load_err(path, e))?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = md_str("general.name").unwrap_or_else(|| stem.clone());
        let adapter = match &opts.adapter {
            Some(dir) => {
                let md_u = |k: &str| {
                    ct.metadata
                        .get(&format!("{architecture}.{k}"))
                        .and_then(|v| v.to_u32().ok())
                        .unwrap_or(0) as usize
                };
                let layout = adapter::Layout {
                    permuted_qk: architecture == "llama",
                    heads: md_u("attention.head_count"),
                    kv_heads: md_u("attention.head_count_kv"),
                };
                Some(adapter::LoraAdapter::load(dir, layout).map_err(|e| load_err(dir, e))?)
            }
            None => None,
        };
        let requantized = rewrite_gguf(
            &ct,
            &mut file,
            requantize == Requantize::Q8_0,
            adapter.as_ref(),
        )
        .map_err(|e| load_err(path, e))?;
        let mut format = match requantize {
            Requantize::Q8_0 if requantized.is_some() => "q8_0".to_string(),
            _ => "as-stored".to_string(),
        };
        if let Some(a) = &adapter {
            format.push_str(&format!("+{}@{}", a.name, &a.digest[..12]));
        }
        let weights = match requantized {
            Some(mut buf) => {
                let ct2 = gguf_file::Content::read(&mut buf).map_err(|e| load_err(path, e))?;
                Weights::from_gguf(&architecture, ct2, &mut buf, opts)
            }
            None => Weights::from_gguf(&architecture, ct, &mut file, opts),
        }
        .map_err(|e| load_err(path, e))?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let constrainer = constrain::Constrainer::new(&tokenizer, &special.stop)
            .map_err(|e| load_err(path, e))?;
        let prefix_cache = if matches!(weights, Weights::Llama(_)) {
            opts.prefix_cache
        } else {
            0
        };
        Ok(TextModel {
            weights,
            text_tokenizer: text_tokenizer(&tokenizer),
            tokenizer,
            special,
            template,
            constrainer,
            prefixes: prefix::PrefixCache::new(prefix_cache),
            head_memo: Default::default(),
            last_cached: 0,
            info: ModelInfo {
                version: format!("{stem}@{}:{format}", &digest[..12]),
                name,
                architecture,
                multimodal: false,
                vocab_size,
                image_processor: None,
                device: device_name(&device),
            },
            device,
        })
    }

    fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<TextModel, ModelError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| load_err(&dir.join(name), e))
        };
        let config = qwen3vl::Config::parse(&read("config.json")?).map_err(|e| load_err(dir, e))?;
        let device = opts.device.clone();
        let dtype = match opts.dtype {
            Some(d) => d,
            None if device.is_cpu() => DType::F32,
            None => DType::BF16,
        };
        // BF16 vision on CPU fails in candle 0.11; the tower is small next to the decoder.
        let vision_dtype = if device.is_cpu() { DType::F32 } else { dtype };
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| load_err(&tokenizer_path, e))?;
        let special = tokenizer::from_hf_dir(dir, &tokenizer).map_err(|e| load_err(dir, e))?;
        let template_src = tokenizer::hf_chat_template(dir)
            .map_err(|e| load_err(dir, e))?
            .unwrap_or_else(|| CHATML_VL.to_string());
        let template = ChatTemplate::new(&template_src, &special.bos_text, &special.eos_text)
            .map_err(|e| load_err(dir, e))?;
        let mut proc = match std::fs::read_to_string(dir.join("preprocessor_config.json")) {
            Ok(text) => ProcessorConfig::from_json(&text).map_err(|e| load_err(dir, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ProcessorConfig::default(),
            Err(e) => return Err(load_err(&dir.join("preprocessor_config.json"), e)),
        };
        let v = &config.vision;
        if proc.patch_size != v.patch_size
            || proc.merge_size != v.spatial_merge_size
            || proc.temporal_patch_size != v.temporal_patch_size
        {
            return Err(load_err(
                dir,
                "preprocessor_config.json and config.json disagree on patch, merge or temporal size",
            ));
        }
        let factor = proc.factor() * proc.factor();
        proc.max_pixels = proc.max_pixels.min(opts.image_max_pixels.max(factor));
        proc.min_pixels = proc.min_pixels.min(proc.max_pixels);
        let digest = tokenizer::dir_digest(dir).map_err(|e| load_err(dir, e))?;
        let model = qwen3vl::Qwen3Vl::load(dir, config, dtype, vision_dtype, &device)
            .map_err(|e| load_err(dir, e))?;
        let vocab_size = model.config.text.vocab_size;
        let constrainer =
            constrain::Constrainer::new(&tokenizer, &special.stop).map_err(|e| load_err(dir, e))?;
        let stem = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let format = format!("{dtype:?}").to_lowercase();
        Ok(TextModel {
            weights: Weights::Vl(Box::new(VlWeights {
                model,
                slots: (0..opts.max_batch.max(1))
                    .map(|_| Slot {
                        cache: None,
                        cap: opts.context_tokens,
                        rope_delta: 0,
                    })
                    .collect(),
            })),
            text_tokenizer: text_tokenizer(&tokenizer),
            tokenizer,
            special,
            template,
            constrainer,
            device: device.clone(),
            // Qwen3-VL keeps per-slot caches; its prefix reuse is not built yet.
            prefixes: prefix::PrefixCache::new(0),
            head_memo: Default::default(),
            last_cached: 0,
            info: ModelInfo {
                // The pixel cap shapes what the model sees: a different cap is a different version.
                version: format!("{stem}@{}:{format}:px{}", &digest[..12], proc.max_pixels),
                name: stem,
                architecture: "qwen3_vl".into(),
                multimodal: true,
                vocab_size,
                image_processor: Some(Arc::new(proc)),
                device: device_name(&device),
            },
        })
    }

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

    /// Ids of `text` as message content: plain text, special-token strings not parsed.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        self.encode_into(&self.text_tokenizer, text, &mut ids)?;
        Ok(ids)
    }

    /// The token that ends an assistant turn: the chat template's end-of-turn token (ChatML's
    /// `<|im_end|>`), else the first stop token.
    pub fn end_of_turn(&self) -> Option<u32> {
        self.tokenizer
            .token_to_id(&self.special.eos_text)
            .or_else(|| self.special.stop.first().copied())
    }

    /// Renders `messages` with the chat template, opens the assistant turn and appends
    /// `assistant_prefix`, then tokenizes. Special tokens are parsed in the template's own text
    /// only: message contents (the note, which is untrusted) are tokenized as plain text, so a note
    /// that writes `<|im_end|><|im_start|>system` cannot open a turn of its own.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        assistant_prefix: &str,
    ) -> Result<Vec<u32>, ModelError> {
        Ok(self.encode_chat_parts(messages, assistant_prefix)?.0)
    }

    /// [`TextModel::encode_chat`], also returning the shared prefix's length
    /// ([`EncodedPrompt::shared_prefix`]).
    fn encode_chat_parts(
        &self,
        messages: &[Message],
        assistant_prefix: &str,
    ) -> Result<(Vec<u32>, usize), ModelError> {
        // Render with a placeholder per content, then tokenize the template's pieces with special
        // tokens and each content as text. Private-use characters never occur in a template.
        let placeholder = |i: usize| format!("\u{F8F0}{i}\u{F8F1}");
        let masked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message::with_images(&m.role, placeholder(i), m.images))
            .collect();
        let mut text = self.template.render(&masked, true).map_err(rt)?;
        text.push_str(assistant_prefix);
        let mut ids = Vec::with_capacity(text.len() / 2);
        if self.special.add_bos {
            ids.extend(self.special.bos);
        }
        let mut rest = text.as_str();
        let mut used = 0;
        let mut shared = 0;
        while let Some(start) = rest.find('\u{F8F0}') {
            let end = rest[start..]
                .find('\u{F8F1}')
                .map(|e| start + e)
                .ok_or_else(|| rt("chat template mangled a message placeholder"))?;
            let i: usize = rest[start + '\u{F8F0}'.len_utf8()..end]
                .parse()
                .map_err(|_| rt("chat template mangled a message placeholder"))?;
            let message = messages
                .get(i)
                .ok_or_else(|| rt("chat template invented a message"))?;
            self.encode_into(&self.tokenizer, &rest[..start], &mut ids)?;
            let content_start = ids.len();
            self.encode_into(&self.text_tokenizer, &message.content, &mut ids)?;
            if i + 1 == messages.len() {
                shared = content_start;
                // The content's shared head counts only where it tokenizes on its own exactly
                // as it does inside the content (a merge across the boundary would differ).
                // (A cut to fit the context may have shortened the content below its head.)
                let head = message.content.get(..message.shared_head).unwrap_or("");
                if !head.is_empty() {
                    let head_ids = self.head_ids(head)?;
                    if ids[content_start..].starts_with(&head_ids) {
                        shared += head_ids.len();
                    }
                }
            }
            used += 1;
            rest = &rest[end + '\u{F8F1}'.len_utf8()..];
        }
        self.encode_into(&self.tokenizer, rest, &mut ids)?;
        if used != messages.len() {
            return Err(rt(format!(
                "chat template rendered {used} of {} message contents",
                messages.len()
            )));
        }
        Ok((ids, shared))
    }

    /// Ids of a message's shared head on its own, memoized: every note of a category has the
    /// same head (its guidance, ~600 tokens), so it is tokenized once, not once per note.
    fn head_ids(&self, head: &str) -> Result<Arc<[u32]>, ModelError> {
        let mut memo = self.head_memo.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ids) = memo.get(head) {
            return Ok(ids.clone());
        }
        let mut ids = Vec::new();
        self.encode_into(&self.text_tokenizer, head, &mut ids)?;
        let ids: Arc<[u32]> = ids.into();
        if memo.len() >= HEAD_MEMO_ENTRIES {
            memo.clear();
        }
        memo.insert(head.to_string(), ids.clone());
        Ok(ids)
    }

    fn encode_into(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        text: &str,
        ids: &mut Vec<u32>,
    ) -> Result<(), ModelError> {
        if !text.is_empty() {
            ids.extend_from_slice(tokenizer.encode(text, false).map_err(rt)?.get_ids());
        }
        Ok(())
    }

    /// Like [`TextModel::encode_chat`], but when the prompt exceeds `max_tokens` it cuts the end of
    /// the last message (where the note's body is) until it fits; returns the ids and whether it
    /// cut. Errors only when even an empty last message does not fit.
    pub fn encode_chat_within(
        &self,
        messages: &[Message],
        assistant_prefix: &str,
        max_tokens: usize,
    ) -> Result<EncodedPrompt, ModelError> {
        let (ids, shared_prefix) = self.encode_chat_parts(messages, assistant_prefix)?;
        if ids.len() <= max_tokens {
            return Ok(EncodedPrompt {
                ids,
                truncated: false,
                shared_prefix,
            });
        }
        let mut msgs = messages.to_vec();
        let Some(last) = msgs.len().checked_sub(1) else {
            return Err(ModelError::PromptTooLong {
                tokens: ids.len(),
                limit: max_tokens,
            });
        };
        let content = self
            .text_tokenizer
            .encode(msgs[last].content.as_str(), false)
            .map_err(rt)?;
        let content_ids = content.get_ids();
        let mut excess = ids.len() - max_tokens;
        // Token boundaries can shift when text is re-encoded: cut, re-check, cut a little more.
        for _ in 0..4 {
            let keep = content_ids.len().saturating_sub(excess + 4);
            if keep == 0 {
                break;
            }
            let mut cut = self
                .tokenizer
                .decode(&content_ids[..keep], false)
                .map_err(rt)?;
            // A cut may end inside a multi-byte character, which decodes as U+FFFD: drop it.
            while cut.ends_with('\u{FFFD}') {
                cut.pop();
            }
            msgs[last].content = cut;
            let (ids, shared_prefix) = self.encode_chat_parts(&msgs, assistant_prefix)?;
            if ids.len() <= max_tokens {
                return Ok(EncodedPrompt {
                    ids,
                    truncated: true,
                    shared_prefix,
                });
            }
            excess += ids.len() - max_tokens;
        }
        Err(ModelError::PromptTooLong {
            tokens: ids.len(),
            limit: max_tokens,
        })
    }

    /// Next-token logits (f32, vocabulary-sized) after feeding `tokens` at `pos`.
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, ModelError> {
        if !matches!(self.weights, Weights::Qwen2(_)) {
            // The single-sequence path is batch slot 0.
            if pos == 0 {
                return self.prefill(tokens, &[]).map(|(l, _)| l);
            }
            if let Weights::Llama(w) = &mut self.weights {
                let cached = w.slots[0].cache.as_ref().map_or(0, |c| c.len());
                if cached != pos {
                    return Err(rt(format!("position {pos} after {cached} cached tokens")));
                }
                return Ok(llama_step(w, &[(tokens, 0)])?.remove(0));
            }
            let mut last = None;
            for &t in tokens {
                last = self.decode_batch(&[(t, 0)])?.pop();
            }
            return last.ok_or_else(|| rt("no tokens"));
        }
        let input = Tensor::new(tokens, &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(rt)?;
        let logits = self.weights.forward(&input, pos).map_err(rt)?;
        logits
            .squeeze(0)
            .and_then(|l| l.to_dtype(DType::F32))
            .and_then(|l| l.to_vec1::<f32>())
            .map_err(rt)
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
        if matches!(self.weights, Weights::Qwen2(_)) {
            if !images.is_empty() {
                return Err(rt("this model reads no images"));
            }
            self.last_cached = 0;
            return Ok((self.forward(prompt, 0)?, prompt.len()));
        }
        // The single-sequence path is batch slot 0.
        let p = self
            .prefill_batch(&[(prompt, images, 0, shared_prefix)])?
            .pop()
            .ok_or_else(|| rt("no logits"))?;
        self.last_cached = p.cached;
        Ok((p.logits, p.tokens))
    }

    /// Prompt tokens the last single-sequence prefill took from the prefix cache, and the total
    /// since load.
    /// Whether the model state after exactly `ids` is in the prefix cache (so a prompt starting
    /// with them computes only the rest).
    pub fn prefix_cached(&self, ids: &[u32]) -> bool {
        self.prefixes.contains(ids)
    }

    pub fn prefix_cache_hits(&self) -> (usize, u64) {
        (self.last_cached, self.prefixes.hit_tokens)
    }

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
            return Err(rt("empty prompt"));
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
            let text = self.tokenizer.decode(&seq.out, true).map_err(rt)?;
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
        let text = self.tokenizer.decode(&seq.out, true).map_err(rt)?;
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

    /// Sequences this model can run in one step: more than one only for Qwen3-VL (the GGUF
    /// models run through candle-transformers, whose KV cache holds one sequence).
    pub fn max_batch(&self) -> usize {
        match &self.weights {
            Weights::Vl(w) => w.slots.len(),
            Weights::Llama(w) => w.slots.len(),
            Weights::Qwen2(_) => 1,
        }
    }

    /// Whether the engine can batch this model (its sequences run through cache slots).
    pub fn batches(&self) -> bool {
        !matches!(self.weights, Weights::Qwen2(_))
    }

    /// Prefills several prompts at once into the given free cache slots (batching models only):
    /// `(ids, images, slot, shared_prefix)` each ([`EncodedPrompt::shared_prefix`]; the llama
    /// models take it from, or add it to, the prefix cache).
    pub fn prefill_batch(
        &mut self,
        prompts: &[(&[u32], &[ProcessedImage], usize, usize)],
    ) -> Result<Vec<Prefilled>, ModelError> {
        if let Weights::Llama(w) = &mut self.weights {
            return llama_prefill(w, &mut self.prefixes, prompts);
        }
        let Weights::Vl(w) = &mut self.weights else {
            return Err(rt("this model does not batch"));
        };
        let VlWeights { model, slots, .. } = &mut **w;
        let mut prepared = Vec::with_capacity(prompts.len());
        for (ids, images, slot, _) in prompts {
            let p = model.prepare(ids, images).map_err(rt)?;
            let s = slots
                .get_mut(*slot)
                .ok_or_else(|| rt("no such cache slot"))?;
            let cache = s.cache(model).map_err(rt)?;
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
        let mut caches = slot_caches(slots, prompts.iter().map(|p| p.2))?;
        let logits = model.prefill(&refs, &mut caches, false).map_err(rt)?;
        logits
            .into_iter()
            .zip(&prepared)
            .map(|(l, p)| {
                Ok(Prefilled {
                    logits: l.to_vec1::<f32>().map_err(rt)?,
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
            return Err(rt("this model does not batch"));
        };
        let VlWeights { model, slots, .. } = &mut **w;
        let tokens: Vec<u32> = steps.iter().map(|s| s.0).collect();
        let deltas: Vec<i64> = steps
            .iter()
            .map(|s| slots.get(s.1).map(|x| x.rope_delta).unwrap_or(0))
            .collect();
        let mut caches = slot_caches(slots, steps.iter().map(|s| s.1))?;
        let logits = model.decode(&tokens, &deltas, &mut caches).map_err(rt)?;
        logits
            .into_iter()
            .map(|l| l.to_vec1::<f32>().map_err(rt))
            .collect()
    }
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

/// Mutable borrows of distinct cache slots, in the order asked.
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
            .ok_or_else(|| rt("no such cache slot"))?
            .cache_with(|cap| model.new_cache(cap))
            .map_err(rt)?;
    }
    let tokens: Vec<u32> = items.iter().flat_map(|i| i.0.iter().copied()).collect();
    let mut caches = slot_caches(slots, items.iter().map(|i| i.1))?;
    let mut seqs: Vec<qwen3vl::text::SeqSlice<'_>> = caches
        .iter_mut()
        .zip(items)
        .map(|(cache, item)| qwen3vl::text::SeqSlice {
            tokens: item.0.len(),
            cache,
        })
        .collect();
    let logits = model.forward(&tokens, &mut seqs).map_err(rt)?;
    (0..items.len())
        .map(|i| logits.get(i).and_then(|l| l.to_vec1::<f32>()).map_err(rt))
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
    prompts: &[(&[u32], &[ProcessedImage], usize, usize)],
) -> Result<Vec<Prefilled>, ModelError> {
    let mut starts = Vec::with_capacity(prompts.len());
    let mut cached = Vec::with_capacity(prompts.len());
    // Prefixes to compute (once each), and prompts that wait for one of them.
    let mut first: Vec<(&[u32], usize)> = Vec::new();
    let mut later: Vec<(usize, usize, &[u32])> = Vec::new();
    for (i, &(ids, images, slot, shared)) in prompts.iter().enumerate() {
        if !images.is_empty() {
            return Err(rt("this model reads no images"));
        }
        if ids.is_empty() {
            return Err(rt("empty prompt"));
        }
        let s = w
            .slots
            .get_mut(slot)
            .ok_or_else(|| rt("no such cache slot"))?;
        let model = &w.model;
        let cache = s.cache_with(|cap| model.new_cache(cap)).map_err(rt)?;
        if ids.len() > cache.capacity() {
            return Err(ModelError::PromptTooLong {
                tokens: ids.len(),
                limit: cache.capacity(),
            });
        }
        cache.reset();
        let chunked =
            shared >= prefix::PrefixCache::<PrefixState>::MIN_TOKENS && shared < ids.len();
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
            let cache = w.slots[slot].cache.as_ref().ok_or_else(|| rt("no cache"))?;
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
                .collect::<candle_core::Result<PrefixState>>()
                .map_err(rt)?;
            prefixes.insert(ids, state);
        }
        for &(i, slot, head) in &later {
            let state = prefixes
                .get(head)
                .ok_or_else(|| rt("prefix state evicted"))?;
            let cache = w.slots[slot].cache.as_mut().ok_or_else(|| rt("no cache"))?;
            restore(cache, state)?;
            cached[i] = head.len();
        }
    }
    let rest: Vec<(&[u32], usize)> = prompts
        .iter()
        .zip(&starts)
        .map(|(p, &start)| (&p.0[start..], p.2))
        .collect();
    let logits = llama_step(w, &rest)?;
    Ok(logits
        .into_iter()
        .zip(prompts)
        .zip(cached)
        .map(|((logits, p), cached)| Prefilled {
            logits,
            tokens: p.0.len(),
            cached,
        })
        .collect())
}

/// Puts a prefix state into an empty cache.
fn restore(cache: &mut qwen3vl::KvCache, state: &PrefixState) -> Result<(), ModelError> {
    let len = state.first().map_or(0, |(k, _)| k.dims()[1]);
    cache.reserve(len).map_err(rt)?;
    for ((k, v), (kc, vc)) in state.iter().zip(&cache.layers) {
        kc.slice_set(k, 1, 0).map_err(rt)?;
        vc.slice_set(v, 1, 0).map_err(rt)?;
    }
    cache.len = len;
    Ok(())
}

fn slot_caches(
    slots: &mut [Slot],
    which: impl Iterator<Item = usize>,
) -> Result<Vec<&mut qwen3vl::KvCache>, ModelError> {
    let which: Vec<usize> = which.collect();
    let mut seen = vec![false; slots.len()];
    for &i in &which {
        if i >= slots.len() || std::mem::replace(&mut seen[i], true) {
            return Err(rt(format!("cache slot {i} is out of range or used twice")));
        }
    }
    let mut by_index: Vec<Option<&mut qwen3vl::KvCache>> =
        slots.iter_mut().map(|s| s.cache.as_mut()).collect();
    which
        .iter()
        .map(|&i| {
            by_index[i]
                .take()
                .ok_or_else(|| rt("cache slot not allocated"))
        })
        .collect()
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
