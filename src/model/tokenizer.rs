//! A `tokenizers` tokenizer built from GGUF metadata, following llama.cpp's pre-tokenizer for the
//! file's `tokenizer.ggml.pre` type. candle-core's own `TokenizerFromGguf` maps unknown `pre` types
//! (smollm among them) to a generic byte-level setup with a prefix space and no digit splitting,
//! which disagreed with llama.cpp on most of our test corpus; this builder agrees on all of it
//! (`tests/fixtures/tokenizer_llamacpp.json`).

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use tokenizers::{
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::BPE,
    pre_tokenizers::{
        byte_level::ByteLevel,
        sequence::Sequence,
        split::{Split, SplitPattern},
    },
    AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The pre-tokenizer regexes llama.cpp uses per `pre` type (llama-vocab.cpp), for byte-level BPE.
enum PreTok {
    /// Split every digit on its own, then the GPT-2 regex (byte-level's own).
    DigitsThenGpt2,
    /// The GPT-2 regex alone.
    Gpt2,
    /// One custom regex, then byte-level without its own regex.
    Regex(&'static str),
}

fn pre_tokenizer_for(pre: &str) -> Option<PreTok> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            PreTok::DigitsThenGpt2
        }
        "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "olmo" | "jais" => PreTok::Gpt2,
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" | "smaug-bpe" => {
            PreTok::Regex(LLAMA3)
        }
        "qwen2" | "deepseek-r1-qwen" | "qwen35" => PreTok::Regex(QWEN2),
        _ => return None,
    })
}

/// Why a tokenizer, its special tokens or its chat template could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The model's metadata does not describe a tokenizer we build the way llama.cpp does.
    #[error("tokenizer: {0}")]
    Unsupported(String),
    /// A GGUF metadata value has the wrong type.
    #[error("tokenizer: GGUF metadata: {0}")]
    Gguf(#[from] candle_core::Error),
    /// The `tokenizers` crate refused what we built.
    #[error("tokenizer: {0}")]
    Build(#[source] tokenizers::Error),
    /// A checkpoint file could not be read.
    #[error("tokenizer: {0}")]
    Io(#[from] std::io::Error),
    /// A checkpoint's JSON file does not parse.
    #[error("tokenizer: {file}: {source}")]
    Json {
        /// The file.
        file: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// Token ids the model needs besides the vocabulary.
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// Whether a BOS is prepended to prompts (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    /// Generation stops on any of these.
    pub stop: Vec<u32>,
    /// Text of the BOS token (for chat templates).
    pub bos_text: String,
    /// Text of the EOS token (for chat templates).
    pub eos_text: String,
}

/// Builds the tokenizer and special tokens described by a GGUF file's metadata.
pub fn from_gguf(ct: &Content) -> Result<(Tokenizer, SpecialTokens), TokenizerError> {
    let md = |k: &str| ct.metadata.get(k);
    let model = md("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| TokenizerError::Unsupported("tokenizer.ggml.model missing".into()))?;
    if model != "gpt2" {
        return Err(TokenizerError::Unsupported(format!(
            "tokenizer.ggml.model = {model:?} is not supported (byte-level BPE, \"gpt2\", is)"
        )));
    }
    let pre = md("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let pretok = pre_tokenizer_for(pre).ok_or_else(|| {
        TokenizerError::Unsupported(format!(
            "tokenizer.ggml.pre = {pre:?} is not supported; tokenizing it differently from llama.cpp would silently change the model's input"
        ))
    })?;
    let tokens: Vec<String> = md("tokenizer.ggml.tokens")
        .ok_or_else(|| TokenizerError::Unsupported("tokenizer.ggml.tokens missing".into()))?
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<_, _>>()?;
    let types: Vec<i32> = match md("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|t| t.to_i32())
            .collect::<Result<_, _>>()?,
        None => vec![1; tokens.len()],
    };
    let merges: Vec<(String, String)> = md("tokenizer.ggml.merges")
        .ok_or_else(|| TokenizerError::Unsupported("tokenizer.ggml.merges missing".into()))?
        .to_vec()?
        .iter()
        .map(|v| {
            let s = v.to_string()?;
            let (a, b) = s
                .split_once(' ')
                .ok_or_else(|| TokenizerError::Unsupported(format!("merge {s:?} has no space")))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_, TokenizerError>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(TokenizerError::Build)?;
    let mut tok = Tokenizer::new(bpe);
    let pre_tokenizer: PreTokenizerWrapper = match pretok {
        PreTok::DigitsThenGpt2 => Sequence::new(vec![
            Split::new(
                SplitPattern::Regex(r"\p{N}".into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(TokenizerError::Build)?
            .into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        PreTok::Gpt2 => ByteLevel::new(false, true, true).into(),
        PreTok::Regex(re) => Sequence::new(vec![
            Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(TokenizerError::Build)?
            .into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    // Control and user-defined tokens are matched whole in text, as llama.cpp does with
    // `parse_special`; control tokens are skipped when decoding.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(s, &t)| AddedToken::from(s.clone(), t == TOKEN_TYPE_CONTROL).normalized(false))
        .collect();
    tok.add_special_tokens(added)
        .map_err(TokenizerError::Build)?;

    let id = |k: &str| md(k).and_then(|v| v.to_u32().ok());
    let bos = id("tokenizer.ggml.bos_token_id");
    let eos = id("tokenizer.ggml.eos_token_id");
    let add_bos = md("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let mut stop: Vec<u32> = [eos, id("tokenizer.ggml.eot_token_id")]
        .into_iter()
        .flatten()
        .collect();
    for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"] {
        if let Some(i) = tok.token_to_id(name) {
            stop.push(i);
        }
    }
    stop.sort_unstable();
    stop.dedup();
    let text_of = |i: Option<u32>| {
        i.and_then(|i| tokens.get(i as usize).cloned())
            .unwrap_or_default()
    };
    let special = SpecialTokens {
        bos,
        add_bos,
        stop,
        bos_text: text_of(bos),
        eos_text: text_of(eos),
    };
    Ok((tok, special))
}
/// Special tokens of a Hugging Face checkpoint: generation stops on every id of
/// `generation_config.json`'s `eos_token_id` (an id or a list) and on `tokenizer_config.json`'s
/// `eos_token`; a BOS is prepended only when `tokenizer_config.json` says `add_bos_token`.
pub fn from_hf_dir(dir: &Path, tokenizer: &Tokenizer) -> Result<SpecialTokens, TokenizerError> {
    let json = |name: &str| -> Result<Option<serde_json::Value>, TokenizerError> {
        match std::fs::read_to_string(dir.join(name)) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|source| TokenizerError::Json {
                    file: name.to_string(),
                    source,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    let tok_cfg = json("tokenizer_config.json")?.unwrap_or_default();
    let gen_cfg = json("generation_config.json")?.unwrap_or_default();
    // A token is written as a string or as {"content": ...}.
    let token_text = |v: Option<&serde_json::Value>| -> Option<String> {
        match v? {
            serde_json::Value::String(s) => Some(s.clone()),
            o => o.get("content")?.as_str().map(str::to_string),
        }
    };
    let eos_text = token_text(tok_cfg.get("eos_token")).unwrap_or_default();
    let bos_text = token_text(tok_cfg.get("bos_token")).unwrap_or_default();
    let mut stop: Vec<u32> = match gen_cfg.get("eos_token_id") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64().map(|x| x as u32))
            .collect(),
        Some(v) => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        None => Vec::new(),
    };
    if let Some(id) = tokenizer.token_to_id(&eos_text) {
        stop.push(id);
    }
    stop.sort_unstable();
    stop.dedup();
    if stop.is_empty() {
        return Err(TokenizerError::Unsupported(
            "no end-of-sequence token: neither generation_config.json eos_token_id nor tokenizer_config.json eos_token".into(),
        ));
    }
    let add_bos = tok_cfg
        .get("add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    Ok(SpecialTokens {
        bos: tokenizer.token_to_id(&bos_text),
        add_bos,
        stop,
        bos_text,
        eos_text,
    })
}

/// The chat template of a Hugging Face checkpoint: `chat_template.jinja`, else
/// `chat_template.json`, else `tokenizer_config.json`'s `chat_template` (a string, or a list of
/// named templates of which `default` is used); `None` when there is none.
pub fn hf_chat_template(dir: &Path) -> Result<Option<String>, TokenizerError> {
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Ok(Some(t));
    }
    for name in ["chat_template.json", "tokenizer_config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
            continue;
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
                file: name.to_string(),
                source,
            })?;
        match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
            Some(serde_json::Value::Array(list)) => {
                let pick = list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first());
                if let Some(t) = pick
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                {
                    return Ok(Some(t.to_string()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Fingerprint (xxh3-128, hex) of everything in a checkpoint directory that shapes outputs: the
/// JSON and Jinja files and every safetensors file, by name and content, in name order. Reads
/// every byte (about 1 s per 10 GB), so a fine-tune with unchanged shapes gets a new version.
pub fn dir_digest(dir: &Path) -> Result<String, TokenizerError> {
    use std::io::Read;
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") || n.ends_with(".jinja") || n.ends_with(".safetensors"))
        .collect();
    names.sort();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    for name in names {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        let mut f = std::fs::File::open(dir.join(&name))?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:032x}", h.digest128()))
}
