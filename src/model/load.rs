//! Loading a model: a quantized GGUF text model of the llama family (`llama` or `qwen2`, our
//! batched decoder), optionally rewritten at load (other quantizations -> Q8_0, a LoRA adapter
//! merged), or a Qwen3-VL checkpoint directory in Hugging Face layout; the tokenizer and chat
//! template come from the model's own metadata.

use std::{
    fs::File,
    io::{Cursor, Read, Seek},
    path::{Path, PathBuf},
    sync::Arc,
};

use candle_core::{
    quantized::{gguf_file, GgmlDType, QTensor},
    DType, Device,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    adapter,
    chat::{ChatTemplate, CHATML, CHATML_VL},
    constrain, prefix, qwen3vl,
    qwen3vl::image_proc::ProcessorConfig,
    tokenizer,
    weights::{Slot, VlWeights, Weights},
    ModelError, ModelInfo, TextModel,
};

/// How the model's weights are held in memory.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Requantize {
    /// As stored in the file.
    None,
    /// Matrices in other block quantizations (Q4_1, Q5_0, the K-quants, ...) re-quantized to
    /// Q8_0 at load, so that they run on our Q8_0 kernels (`tagllm-kernels`): candle has only a
    /// scalar loop for Q4_1 (measured ~3-9x faster here; near-lossless, ~1.7x weight memory).
    Q8_0,
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

pub(super) fn load_err(path: &Path, reason: impl std::fmt::Display) -> ModelError {
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

/// Whether [`Requantize::Q8_0`] rewrites a matrix stored as `dtype`: every block quantization
/// but Q8_0 itself (float tensors, norms and biases among them, stay as they are).
fn requantized_to_q8_0(dtype: GgmlDType) -> bool {
    !matches!(
        dtype,
        GgmlDType::Q8_0 | GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
    )
}

/// Rewrites a GGUF in memory: an adapter's updates merged into their matrices (stored as Q8_0),
/// and, with `to_q8_0`, the other quantized matrices as Q8_0 (see [`Requantize::Q8_0`]). `None`
/// when nothing changes.
fn rewrite_gguf<R: Read + Seek>(
    ct: &gguf_file::Content,
    reader: &mut R,
    to_q8_0: bool,
    adapter: Option<&adapter::LoraAdapter>,
) -> candle_core::Result<Option<Cursor<Vec<u8>>>> {
    let requant = to_q8_0
        && ct
            .tensor_infos
            .values()
            .any(|t| requantized_to_q8_0(t.ggml_dtype));
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
            None if requant && requantized_to_q8_0(t.dtype()) => {
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
    /// [`qwen3vl`]); a file is a quantized GGUF text model of the llama family, `llama` or
    /// `qwen2`, which runs on our batched decoder ([`super::llama`]).
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
        Ok(TextModel {
            weights,
            text_tokenizer: text_tokenizer(&tokenizer),
            tokenizer,
            special,
            template,
            constrainer,
            prefixes: prefix::PrefixCache::new(opts.prefix_cache),
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
}
