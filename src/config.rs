//! Typed configuration: defaults, then an optional TOML file, then `TAGLLM__` environment variables
//! (`TAGLLM__SERVER__ADDR=0.0.0.0:50051`), then command-line flags. Validated as a whole before
//! anything binds a port or loads a model.

use std::{net::SocketAddr, path::PathBuf};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};

// Each section's type lives with the layer it configures; this module assembles them.
use crate::{
    client::replica::ReplicaConfig, domain::Limits, model::Requantize,
    tagging::prompt::PromptStyle, tagging::tagger::Decoding,
};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of the durable store (created if missing).
    pub data_dir: PathBuf,
    /// User Interest Handbook file (TOML, see `models/HANDBOOK.md`).
    pub handbook: PathBuf,
    /// Feature schema file (TOML, see `models/HANDBOOK.md`).
    pub schema: PathBuf,
    /// gRPC server settings.
    pub server: ServerConfig,
    /// Model and generation settings.
    pub model: ModelConfig,
    /// Request limits, enforced at the edge.
    pub limits: Limits,
    /// In-memory feature cache.
    pub cache: CacheConfig,
    /// Logging.
    pub log: LogConfig,
    /// Read-replica mode (off unless `replica.upstream` is set).
    pub replica: ReplicaConfig,
    /// Bearer-token auth (off unless a token is configured).
    pub auth: AuthConfig,
    /// TLS (off unless a certificate is configured).
    pub tls: TlsConfig,
}

/// Bearer-token auth on every RPC but health. The token itself is never part of the config (so
/// it cannot be logged with it): it comes from `token_file`, else from the `TAGLLM_AUTH_TOKEN`
/// environment variable; with neither, auth is off.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File with the accepted tokens, one per line (two during a rotation).
    pub token_file: Option<PathBuf>,
}

/// TLS for the gRPC port (rustls). Both `cert_file` and `key_file` (PEM) turn it on;
/// `client_ca_file` also requires client certificates signed by that CA (mutual TLS).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert_file: Option<PathBuf>,
    /// Server private key (PEM).
    pub key_file: Option<PathBuf>,
    /// CA that client certificates must chain to (PEM); unset: no client certificates.
    pub client_ca_file: Option<PathBuf>,
}

/// gRPC server settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// Largest request message accepted (bytes); notes with inline images need room.
    pub max_decoding_message_bytes: usize,
    /// Largest response message sent (bytes); a few thousand notes of features fit easily.
    pub max_encoding_message_bytes: usize,
    /// Seconds in-flight requests get to finish after a shutdown signal.
    pub shutdown_grace_secs: u64,
    /// Notes of one TagNotes stream tagged concurrently (they queue in the engine).
    pub stream_concurrency: usize,
    /// Close client connections after this many seconds (with a grace for calls in flight), so
    /// clients that balance over DNS re-resolve and spread onto new pods; unset: never.
    pub max_connection_age_secs: Option<u64>,
    /// Where Prometheus scrapes `GET /metrics` (plain HTTP, its own port); `"off"` disables it.
    #[serde(with = "optional_addr")]
    pub metrics_addr: Option<SocketAddr>,
}

/// `Option<SocketAddr>` spelled as an address or `"off"` (TOML and env have no null).
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim() {
            "" | "off" => Ok(None),
            a => a.parse().map(Some).map_err(|e| {
                serde::de::Error::custom(format!("{a:?} is not an address or \"off\": {e}"))
            }),
        }
    }
}

/// Model and generation settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A GGUF file of a llama-family text model, or a directory holding a Qwen3-VL checkpoint in
    /// Hugging Face layout (`config.json`, `*.safetensors`, `tokenizer.json`, ...), which reads
    /// the notes' images.
    pub path: PathBuf,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    pub device: String,
    /// Weight dtype of a checkpoint directory: `auto` (F32 on CPU, BF16 on CUDA), `f32`, `bf16`
    /// or `f16`. GGUF files keep their own formats.
    pub dtype: String,
    /// Images are resized (aspect kept) to at most this many pixels before the vision tower:
    /// Qwen3-VL spends one prompt token per 32x32 pixels, so the default, 448x448, is 196 tokens.
    pub image_max_pixels: usize,
    /// Sequences generated together by continuous batching (Qwen3-VL and the llama-family GGUFs:
    /// llama, qwen2). Each holds a KV cache that grows with use up to `context_tokens` positions.
    pub max_batch: usize,
    /// Prompt tokens prefilled in one engine step when several notes join at once (a note longer
    /// than this still runs, alone).
    pub max_batch_tokens: usize,
    /// Model states kept after prompt prefixes that notes share (a category's system turn with
    /// its handbook guidance), so the next note of the category prefills only itself
    /// (llama-family GGUF models; 0 disables). Each entry holds its prefix's KV cache: ~46 KB per
    /// token on the default model, ~32 MB for a ~700-token guidance.
    pub prefix_cache_entries: usize,
    /// A LoRA adapter (PEFT format: `adapter_config.json` + `adapter_model.safetensors`) merged
    /// into a GGUF model at load: `auto` (default) uses `<model file without .gguf>.lora/` beside
    /// the model when that directory exists (the default model ships its distilled student
    /// there), `none` uses none, anything else is the adapter's directory.
    pub adapter: String,
    /// How much of the handbook the prompt carries: `full` (every dimension's description and
    /// examples), `compact` (the category's name; for a student distilled on it), or `auto`
    /// (default): what the adapter was trained on, from its `tagllm.json` (`{"prompt":
    /// "compact"}`), else `full`.
    pub prompt: String,
    /// Weight format in memory.
    pub requantize: Requantize,
    /// `constrained` (default) or `unconstrained`.
    pub decoding: Decoding,
    /// Generation stops after this many new tokens.
    pub max_new_tokens: usize,
    /// Prompt plus generation may not exceed this many tokens.
    pub context_tokens: usize,
    /// Tagging jobs waiting for the engine; beyond it TagNote answers RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
}

/// In-memory feature cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Most notes held in memory.
    pub max_notes: u64,
    /// One in this many cache hits is recorded in the eviction policy (moka's TinyLFU), so it
    /// sees which notes are read at a fraction of the cost of recording every hit; 1 records
    /// every hit.
    pub record_hits_every: u64,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info,tagllm=debug`; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            handbook: PathBuf::from("models/handbook.toml"),
            schema: PathBuf::from("models/features.toml"),
            server: ServerConfig::default(),
            model: ModelConfig::default(),
            limits: Limits::default(),
            cache: CacheConfig::default(),
            log: LogConfig::default(),
            replica: ReplicaConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_decoding_message_bytes: 64 << 20,
            max_encoding_message_bytes: 64 << 20,
            shutdown_grace_secs: 20,
            stream_concurrency: 4,
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            max_connection_age_secs: None,
        }
    }
}

impl ModelConfig {
    /// `model.dtype` as a candle dtype (`None` for `auto`).
    pub fn parse_dtype(&self) -> Result<Option<candle_core::DType>, String> {
        use candle_core::DType;
        match self.dtype.as_str() {
            "auto" => Ok(None),
            "f32" => Ok(Some(DType::F32)),
            "bf16" => Ok(Some(DType::BF16)),
            "f16" => Ok(Some(DType::F16)),
            other => Err(format!(
                "{other:?} is not \"auto\", \"f32\", \"bf16\" or \"f16\""
            )),
        }
    }
}

impl ModelConfig {
    /// The adapter directory to merge, resolved from [`ModelConfig::adapter`].
    pub fn adapter_dir(&self) -> Option<PathBuf> {
        match self.adapter.trim() {
            "" | "none" => None,
            "auto" => {
                if self.path.is_dir() {
                    return None;
                }
                let dir = self.path.with_extension("lora");
                dir.is_dir().then_some(dir)
            }
            other => Some(PathBuf::from(other)),
        }
    }
}

/// What an adapter directory's `tagllm.json` says of how the adapter was trained.
#[derive(Debug, Deserialize)]
struct AdapterMeta {
    /// The prompt style of its training examples.
    prompt: Option<String>,
}

impl ModelConfig {
    /// The prompt style, resolved from [`ModelConfig::prompt`] (and the adapter's `tagllm.json`
    /// for `auto`).
    pub fn prompt_style(&self) -> Result<PromptStyle, String> {
        let spelled = match self.prompt.trim() {
            "auto" => {
                let Some(meta) = self.adapter_dir().map(|d| d.join("tagllm.json")) else {
                    return Ok(PromptStyle::Full);
                };
                let text = match std::fs::read_to_string(&meta) {
                    Ok(t) => t,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(PromptStyle::Full)
                    }
                    Err(e) => return Err(format!("{}: {e}", meta.display())),
                };
                let m: AdapterMeta =
                    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", meta.display()))?;
                match m.prompt {
                    Some(p) => p,
                    None => return Ok(PromptStyle::Full),
                }
            }
            other => other.to_string(),
        };
        PromptStyle::parse(&spelled)
            .ok_or_else(|| format!("{spelled:?} is not \"auto\", \"full\" or \"compact\""))
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: PathBuf::from("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            device: "cpu".into(),
            dtype: "auto".into(),
            image_max_pixels: 200_704,
            max_batch: 8,
            max_batch_tokens: 4096,
            prefix_cache_entries: 8,
            adapter: "auto".into(),
            prompt: "auto".into(),
            requantize: Requantize::Q8_0,
            decoding: Decoding::Constrained,
            max_new_tokens: 192,
            context_tokens: 4096,
            queue_capacity: 64,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_notes: 1_000_000,
            record_hits_every: 16,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".to_string(),
        }
    }
}

/// A configuration problem, found before the server binds.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment did not parse into the typed config.
    #[error("configuration: {0}")]
    Parse(#[from] Box<figment::Error>),
    /// A value parsed but is out of range.
    #[error("configuration: {field}: {reason}")]
    Invalid {
        /// Dotted path of the field, e.g. `limits.max_images`.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
}

impl Config {
    /// Layers defaults, the optional file, then `TAGLLM__` env; does not validate.
    pub fn load(file: Option<&std::path::Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid {
                    field: "--config",
                    reason: format!("{} does not exist", file.display()),
                });
            }
            fig = fig.merge(Toml::file_exact(file));
        }
        fig = fig.merge(Env::prefixed("TAGLLM__").split("__"));
        fig.extract().map_err(|e| ConfigError::Parse(Box::new(e)))
    }

    /// Checks ranges and that the files it names exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(field: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                field,
                reason: reason.into(),
            })
        }
        let positive: [(&'static str, usize); 16] = [
            ("limits.max_note_id_bytes", self.limits.max_note_id_bytes),
            ("limits.max_category_bytes", self.limits.max_category_bytes),
            ("limits.max_title_chars", self.limits.max_title_chars),
            ("limits.max_body_chars", self.limits.max_body_chars),
            ("limits.max_image_bytes", self.limits.max_image_bytes),
            (
                "limits.max_image_uri_bytes",
                self.limits.max_image_uri_bytes,
            ),
            (
                "limits.max_ids_per_request",
                self.limits.max_ids_per_request,
            ),
            (
                "limits.max_tags_per_dimension",
                self.limits.max_tags_per_dimension,
            ),
            ("limits.max_tags_per_note", self.limits.max_tags_per_note),
            ("limits.max_tag_chars", self.limits.max_tag_chars),
            ("model.max_new_tokens", self.model.max_new_tokens),
            ("model.queue_capacity", self.model.queue_capacity),
            ("model.image_max_pixels", self.model.image_max_pixels),
            ("model.max_batch", self.model.max_batch),
            ("model.max_batch_tokens", self.model.max_batch_tokens),
            ("server.stream_concurrency", self.server.stream_concurrency),
        ];
        if self.limits.max_image_pixels == 0 || self.limits.max_image_side == 0 {
            return bad(
                "limits.max_image_pixels",
                "and limits.max_image_side must be at least 1",
            );
        }
        for (field, v) in positive {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if self.model.decoding == Decoding::Constrained && self.model.max_new_tokens < 32 {
            return bad(
                "model.max_new_tokens",
                "constrained decoding needs at least 32 to close its answer in time",
            );
        }
        if self.model.context_tokens < self.model.max_new_tokens + 16 {
            return bad(
                "model.context_tokens",
                format!(
                    "{} leaves no room for a prompt next to max_new_tokens = {}",
                    self.model.context_tokens, self.model.max_new_tokens
                ),
            );
        }
        if let Err(e) = self.model.prompt_style() {
            return bad("model.prompt", e);
        }
        if let Err(e) = self.model.parse_dtype() {
            return bad("model.dtype", e);
        }
        if !(self.model.device == "cpu" || self.model.device.starts_with("cuda")) {
            return bad(
                "model.device",
                format!(
                    "{:?} is not \"cpu\", \"cuda\" or \"cuda:N\"",
                    self.model.device
                ),
            );
        }
        if self.server.max_decoding_message_bytes < 4096 {
            return bad("server.max_decoding_message_bytes", "must be at least 4096");
        }
        if self.server.max_encoding_message_bytes < 4096 {
            return bad("server.max_encoding_message_bytes", "must be at least 4096");
        }
        if self.cache.max_notes == 0 {
            return bad("cache.max_notes", "must be at least 1");
        }
        if self.cache.record_hits_every == 0 {
            return bad("cache.record_hits_every", "must be at least 1");
        }
        if self.replica.enabled() {
            if self.replica.poll_secs == 0 {
                return bad("replica.poll_secs", "must be at least 1");
            }
            if self.replica.overlap_ms < 0 {
                return bad("replica.overlap_ms", "must not be negative");
            }
            let u = self.replica.upstream.trim();
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return bad(
                    "replica.upstream",
                    format!("{u:?} is not a URL like http://tagger:50051"),
                );
            }
            if let Err(e) = crate::client::upstream::endpoint(u, &self.replica.tls) {
                return bad("replica.tls", format!("{e:#}"));
            }
        }
        for (field, path) in [
            ("model.path", &self.model.path),
            ("handbook", &self.handbook),
            ("schema", &self.schema),
        ] {
            // A replica loads no model.
            if field == "model.path" && self.replica.enabled() {
                continue;
            }
            // A model may also be a checkpoint directory.
            let ok = if field == "model.path" {
                path.is_file() || path.join("config.json").is_file()
            } else {
                path.is_file()
            };
            if !ok {
                let hint = if field == "model.path" {
                    " (run models/fetch_default_model.sh for the default model)"
                } else {
                    ""
                };
                let what = if field == "model.path" {
                    "a GGUF file or a checkpoint directory with a config.json"
                } else {
                    "a file"
                };
                return bad(field, format!("{} is not {what}{hint}", path.display()));
            }
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) | (None, Some(_)) => {
                return bad("tls", "cert_file and key_file go together");
            }
            (None, None) if self.tls.client_ca_file.is_some() => {
                return bad("tls.client_ca_file", "needs tls.cert_file and tls.key_file");
            }
            _ => {}
        }
        for (field, path) in [
            ("tls.cert_file", &self.tls.cert_file),
            ("tls.key_file", &self.tls.key_file),
            ("tls.client_ca_file", &self.tls.client_ca_file),
            ("auth.token_file", &self.auth.token_file),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    return bad(field, format!("{} is not a file", p.display()));
                }
            }
        }
        if self.data_dir.exists() && !self.data_dir.is_dir() {
            return bad(
                "data_dir",
                format!("{} exists and is not a directory", self.data_dir.display()),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_figment() {
        let cfg = Config::load(None).unwrap();
        assert_eq!(cfg.server.addr, Config::default().server.addr);
    }

    #[test]
    fn file_overrides_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[limits]\nmax_images = 2\n").unwrap();
        let cfg = Config::load(Some(&f)).unwrap();
        assert_eq!(cfg.limits.max_images, 2);
        std::fs::write(&f, "[limits]\nmax_imagez = 2\n").unwrap();
        let err = Config::load(Some(&f)).unwrap_err().to_string();
        assert!(err.contains("max_imagez"), "{err}");
    }

    #[test]
    fn metrics_addr_is_an_address_or_off() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[server]\nmetrics_addr = \"off\"\n").unwrap();
        assert_eq!(Config::load(Some(&f)).unwrap().server.metrics_addr, None);
        std::fs::write(&f, "[server]\nmetrics_addr = \"0.0.0.0:9100\"\n").unwrap();
        assert_eq!(
            Config::load(Some(&f)).unwrap().server.metrics_addr,
            Some("0.0.0.0:9100".parse().unwrap())
        );
        std::fs::write(&f, "[server]\nmetrics_addr = \"nine\"\n").unwrap();
        let err = Config::load(Some(&f)).unwrap_err().to_string();
        assert!(err.contains("nine"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut cfg = Config::default();
        cfg.limits.max_ids_per_request = 0;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("limits.max_ids_per_request"), "{err}");
        let mut cfg = Config::default();
        cfg.model.path = "/nonexistent.gguf".into();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("model.path"), "{err}");
    }

    #[test]
    fn prompt_style_follows_the_adapter_unless_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = ModelConfig {
            adapter: dir.path().display().to_string(),
            ..ModelConfig::default()
        };
        assert_eq!(m.prompt_style(), Ok(PromptStyle::Full), "no tagllm.json");
        std::fs::write(dir.path().join("tagllm.json"), r#"{"prompt": "compact"}"#).unwrap();
        assert_eq!(m.prompt_style(), Ok(PromptStyle::Compact));
        m.prompt = "full".into();
        assert_eq!(m.prompt_style(), Ok(PromptStyle::Full), "named wins");
        m.prompt = "auto".into();
        m.adapter = "none".into();
        assert_eq!(m.prompt_style(), Ok(PromptStyle::Full), "no adapter");
        m.prompt = "short".into();
        assert!(m.prompt_style().unwrap_err().contains("\"short\""));
        std::fs::write(dir.path().join("tagllm.json"), r#"{"prompt": "tiny"}"#).unwrap();
        m.prompt = "auto".into();
        m.adapter = dir.path().display().to_string();
        assert!(
            m.prompt_style().is_err(),
            "a bad adapter file is an error, not a guess"
        );
    }
}
