//! `config.json` of a Qwen3-VL checkpoint, in both the transformers 4.57 shape (`rope_theta` and
//! `rope_scaling.mrope_section` in `text_config`) and the 5.x shape (both inside
//! `text_config.rope_parameters`).

use serde::Deserialize;
use serde_json::Value;

/// The text decoder's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Vocabulary rows of the embedding and the LM head.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// How the rotary half-dimensions split between time, height and width (sums to head_dim/2;
    /// always interleaved, as HF's Qwen3-VL does whatever `mrope_interleaved` says).
    pub mrope_section: [usize; 3],
    /// Whether q/k/v/o projections carry biases.
    pub attention_bias: bool,
    /// The checkpoint's longest position (informational: the KV cache is sized by the service).
    pub max_position_embeddings: usize,
}

/// The vision tower's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Blocks.
    pub depth: usize,
    /// Width.
    pub hidden_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Side of a square patch (pixels).
    pub patch_size: usize,
    /// Frames per patch (images are duplicated to fill it).
    pub temporal_patch_size: usize,
    /// Side of the square of patches merged into one LLM token.
    pub spatial_merge_size: usize,
    /// Width of the merged tokens (the text model's width).
    pub out_hidden_size: usize,
    /// Rows of the learned position grid (a square).
    pub num_position_embeddings: usize,
    /// Blocks whose outputs feed the first decoder layers (DeepStack).
    pub deepstack_visual_indexes: Vec<usize>,
    /// Colour channels.
    pub in_channels: usize,
    /// MLP activation (`gelu_pytorch_tanh` or `gelu`).
    pub hidden_act: String,
}

/// A whole Qwen3-VL configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Text decoder.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// `<|image_pad|>`.
    pub image_token_id: u32,
    /// `<|video_pad|>`.
    pub video_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    pub vision_end_token_id: u32,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// The checkpoint's own dtype name (`bfloat16`, `float32`, ...), if stated.
    pub dtype: Option<String>,
}

/// A config that does not parse or describes an unsupported model.
#[derive(Debug, thiserror::Error)]
#[error("config.json: {0}")]
pub struct ConfigError(pub String);

fn err(m: impl Into<String>) -> ConfigError {
    ConfigError(m.into())
}

#[derive(Deserialize)]
struct RawVision {
    depth: usize,
    hidden_size: usize,
    num_heads: usize,
    intermediate_size: usize,
    #[serde(default = "d16")]
    patch_size: usize,
    #[serde(default = "d2")]
    temporal_patch_size: usize,
    #[serde(default = "d2")]
    spatial_merge_size: usize,
    out_hidden_size: usize,
    #[serde(default = "d2304")]
    num_position_embeddings: usize,
    #[serde(default)]
    deepstack_visual_indexes: Vec<usize>,
    #[serde(default = "d3")]
    in_channels: usize,
    #[serde(default = "gelu_tanh")]
    hidden_act: String,
}

fn d16() -> usize {
    16
}
fn d2() -> usize {
    2
}
fn d3() -> usize {
    3
}
fn d2304() -> usize {
    2304
}
fn gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_of(v: &Value, key: &str) -> Result<usize, ConfigError> {
    get(v, key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| {
            err(format!(
                "text_config.{key} is missing or not a whole number"
            ))
        })
}

fn token_id(root: &Value, key: &str) -> Result<u32, ConfigError> {
    get(root, key)
        .and_then(Value::as_u64)
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| err(format!("{key} is missing or not a token id")))
}

impl Config {
    /// Parses the text of `config.json`.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let root: Value = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        let model_type = get(&root, "model_type").and_then(Value::as_str);
        if model_type != Some("qwen3_vl") {
            return Err(err(format!(
                "model_type is {model_type:?}; only \"qwen3_vl\" (dense Qwen3-VL) is supported"
            )));
        }
        let t = get(&root, "text_config").ok_or_else(|| err("text_config is missing"))?;
        // transformers 5 moved rope_theta and the M-RoPE settings into `rope_parameters`;
        // 4.57 keeps rope_theta at the top of text_config and the rest in `rope_scaling`.
        let rope = get(t, "rope_parameters").or_else(|| get(t, "rope_scaling"));
        let rope_theta = rope
            .and_then(|r| get(r, "rope_theta"))
            .or_else(|| get(t, "rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(5_000_000.0);
        if let Some(kind) = rope
            .and_then(|r| get(r, "rope_type").or_else(|| get(r, "type")))
            .and_then(Value::as_str)
        {
            if kind != "default" {
                return Err(err(format!(
                    "rope_type {kind:?} is not supported (\"default\" is)"
                )));
            }
        }
        let section: Vec<usize> = match rope.and_then(|r| get(r, "mrope_section")) {
            Some(v) => {
                serde_json::from_value(v.clone()).map_err(|e| err(format!("mrope_section: {e}")))?
            }
            None => vec![24, 20, 20],
        };
        let mrope_section: [usize; 3] = section
            .try_into()
            .map_err(|_| err("mrope_section must have three entries (t, h, w)"))?;
        let hidden_size = usize_of(t, "hidden_size")?;
        let num_attention_heads = usize_of(t, "num_attention_heads")?;
        let head_dim = get(t, "head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let text = TextConfig {
            vocab_size: usize_of(t, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_of(t, "intermediate_size")?,
            num_hidden_layers: usize_of(t, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: get(t, "num_key_value_heads")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: get(t, "rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            mrope_section,
            attention_bias: get(t, "attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: get(t, "max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(262_144),
        };
        if text.num_attention_heads == 0
            || text.num_key_value_heads == 0
            || !text
                .num_attention_heads
                .is_multiple_of(text.num_key_value_heads)
        {
            return Err(err(format!(
                "{} attention heads do not group over {} key/value heads",
                text.num_attention_heads, text.num_key_value_heads
            )));
        }
        if mrope_section.iter().sum::<usize>() * 2 != text.head_dim {
            return Err(err(format!(
                "mrope_section {mrope_section:?} does not cover half of head_dim {}",
                text.head_dim
            )));
        }
        let v: RawVision = serde_json::from_value(
            get(&root, "vision_config")
                .ok_or_else(|| err("vision_config is missing"))?
                .clone(),
        )
        .map_err(|e| err(format!("vision_config: {e}")))?;
        let grid = (v.num_position_embeddings as f64).sqrt() as usize;
        if grid * grid != v.num_position_embeddings || v.num_heads == 0 {
            return Err(err(format!(
                "vision_config: num_position_embeddings {} is not a square, or no heads",
                v.num_position_embeddings
            )));
        }
        if v.out_hidden_size != text.hidden_size {
            return Err(err(format!(
                "vision out_hidden_size {} differs from the text hidden_size {}",
                v.out_hidden_size, text.hidden_size
            )));
        }
        if v.deepstack_visual_indexes.len() > text.num_hidden_layers
            || v.deepstack_visual_indexes.iter().any(|&i| i >= v.depth)
        {
            return Err(err("vision_config.deepstack_visual_indexes out of range"));
        }
        let vision = VisionConfig {
            depth: v.depth,
            hidden_size: v.hidden_size,
            num_heads: v.num_heads,
            intermediate_size: v.intermediate_size,
            patch_size: v.patch_size,
            temporal_patch_size: v.temporal_patch_size,
            spatial_merge_size: v.spatial_merge_size,
            out_hidden_size: v.out_hidden_size,
            num_position_embeddings: v.num_position_embeddings,
            deepstack_visual_indexes: v.deepstack_visual_indexes,
            in_channels: v.in_channels,
            hidden_act: v.hidden_act,
        };
        let tie_word_embeddings = get(&root, "tie_word_embeddings")
            .or_else(|| get(t, "tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let dtype = get(&root, "dtype")
            .or_else(|| get(&root, "torch_dtype"))
            .or_else(|| get(t, "dtype"))
            .or_else(|| get(t, "torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Config {
            text,
            vision,
            image_token_id: token_id(&root, "image_token_id")?,
            video_token_id: token_id(&root, "video_token_id")?,
            vision_start_token_id: token_id(&root, "vision_start_token_id")?,
            vision_end_token_id: token_id(&root, "vision_end_token_id")?,
            tie_word_embeddings,
            dtype,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(text_rope: &str, top: &str) -> String {
        format!(
            r#"{{"model_type":"qwen3_vl",{top}
            "image_token_id":7,"video_token_id":8,"vision_start_token_id":5,"vision_end_token_id":6,
            "text_config":{{"vocab_size":100,"hidden_size":64,"intermediate_size":128,
              "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
              {text_rope}}},
            "vision_config":{{"depth":3,"hidden_size":32,"num_heads":2,"intermediate_size":64,
              "out_hidden_size":64,"num_position_embeddings":64,"deepstack_visual_indexes":[0,1]}}}}"#
        )
    }

    #[test]
    fn reads_the_4_57_and_5_x_shapes_alike() {
        let old = base(
            r#""rope_theta":5000000,"rope_scaling":{"rope_type":"default","mrope_section":[2,3,3],"mrope_interleaved":true}"#,
            r#""tie_word_embeddings":true,"torch_dtype":"bfloat16","#,
        );
        let new = base(
            r#""rope_parameters":{"rope_type":"default","rope_theta":5000000,"mrope_section":[2,3,3],"mrope_interleaved":true}"#,
            r#""tie_word_embeddings":true,"dtype":"bfloat16","#,
        );
        let a = Config::parse(&old).unwrap();
        let b = Config::parse(&new).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.text.mrope_section, [2, 3, 3]);
        assert_eq!(a.text.rope_theta, 5e6);
        assert!(a.tie_word_embeddings);
        assert_eq!(a.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(a.vision.patch_size, 16);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let bad_section = base(
            r#""rope_parameters":{"rope_type":"default","rope_theta":1,"mrope_section":[2,2,2]}"#,
            "",
        );
        assert!(Config::parse(&bad_section)
            .unwrap_err()
            .to_string()
            .contains("head_dim"));
        let yarn = base(
            r#""rope_parameters":{"rope_type":"yarn","rope_theta":1,"mrope_section":[2,3,3]}"#,
            "",
        );
        assert!(Config::parse(&yarn)
            .unwrap_err()
            .to_string()
            .contains("yarn"));
        let moe = r#"{"model_type":"qwen3_vl_moe"}"#;
        assert!(Config::parse(moe)
            .unwrap_err()
            .to_string()
            .contains("qwen3_vl_moe"));
    }
}
