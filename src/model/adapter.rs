//! LoRA adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), merged
//! into a GGUF model's matrices at load: `W' = W + (alpha / r) * B A` (`alpha / sqrt(r)` with
//! rsLoRA). A merged model runs at the base model's speed; the merged matrices are stored as Q8_0
//! (re-quantizing a Q4 matrix would round most of a small update away).
//!
//! PEFT names modules the way transformers does (`model.layers.3.self_attn.q_proj`); llama.cpp's
//! converter stores a llama model's q and k rows interleaved per head for its rope layout, so
//! their updates are permuted the same way before they are added. qwen2 GGUFs are not permuted.

use std::{collections::BTreeMap, path::Path};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The fields of `adapter_config.json` that decide the merge; anything that changes the math
/// and is not supported is refused rather than ignored.
#[derive(Debug, Deserialize)]
struct AdapterConfig {
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    peft_type: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    layer_replication: Option<serde_json::Value>,
    #[serde(default)]
    target_parameters: Option<serde_json::Value>,
}

/// A loaded adapter: the update of each GGUF matrix it touches, in that matrix's row layout.
pub struct LoraAdapter {
    /// Directory name, for the model version.
    pub name: String,
    /// sha256 of the config and the weights, for the model version (results of another adapter
    /// are not reused).
    pub digest: String,
    /// GGUF tensor name -> F32 update `[out, in]`.
    pub deltas: BTreeMap<String, Tensor>,
}

/// How the GGUF stores q/k rows: llama models are permuted for llama.cpp's rope.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Whether q/k rows are interleaved per head (`llama` architecture).
    pub permuted_qk: bool,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
}

fn gguf_module(module: &str) -> Option<&'static str> {
    Some(match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    })
}

/// Splits a PEFT key (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, optionally
/// with the adapter name before `.weight`) into (layer, module, "A" | "B").
fn parse_key(key: &str) -> Option<(usize, &str, &str)> {
    let rest = key.split_once("layers.")?.1;
    let (layer, rest) = rest.split_once('.')?;
    let (module, ab) = rest.split_once(".lora_")?;
    let ab = ab.strip_suffix(".weight")?;
    let ab = ab.split('.').next()?;
    Some((layer.parse().ok()?, module, ab))
}

impl LoraAdapter {
    /// Loads `dir` and computes each update in `layout`.
    pub fn load(dir: &Path, layout: Layout) -> Result<LoraAdapter, String> {
        let cfg_path = dir.join("adapter_config.json");
        let w_path = dir.join("adapter_model.safetensors");
        let cfg_bytes =
            std::fs::read(&cfg_path).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        let cfg: AdapterConfig = serde_json::from_slice(&cfg_bytes)
            .map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        let refuse = |what: &str| Err(format!("{}: {what} is not supported", cfg_path.display()));
        if cfg.peft_type.as_deref().is_some_and(|t| t != "LORA") {
            return refuse(&format!("peft_type {:?}", cfg.peft_type));
        }
        if cfg.use_dora {
            return refuse("use_dora");
        }
        if cfg.fan_in_fan_out {
            return refuse("fan_in_fan_out");
        }
        if cfg.bias.as_deref().is_some_and(|b| b != "none") {
            return refuse("a trained bias");
        }
        if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("modules_to_save");
        }
        if cfg.lora_bias {
            return refuse("lora_bias");
        }
        if cfg.layer_replication.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("layer_replication");
        }
        if cfg.target_parameters.as_ref().is_some_and(|v| !v.is_null()) {
            return refuse("target_parameters");
        }
        if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
            return refuse("rank_pattern / alpha_pattern");
        }
        if cfg.r == 0 {
            return Err(format!("{}: r is 0", cfg_path.display()));
        }
        let scale = if cfg.use_rslora {
            cfg.lora_alpha / (cfg.r as f64).sqrt()
        } else {
            cfg.lora_alpha / cfg.r as f64
        };
        let w_bytes = std::fs::read(&w_path).map_err(|e| format!("{}: {e}", w_path.display()))?;
        let tensors = candle_core::safetensors::load_buffer(&w_bytes, &Device::Cpu)
            .map_err(|e| format!("{}: {e}", w_path.display()))?;
        let mut pairs: BTreeMap<(usize, String), [Option<Tensor>; 2]> = BTreeMap::new();
        for (key, t) in tensors {
            let (layer, module, ab) = parse_key(&key)
                .ok_or_else(|| format!("{}: unexpected tensor {key}", w_path.display()))?;
            if gguf_module(module).is_none() {
                return Err(format!(
                    "{}: {key}: only attention and MLP projections can be merged",
                    w_path.display()
                ));
            }
            let slot = match ab {
                "A" => 0,
                "B" => 1,
                _ => return Err(format!("{}: unexpected tensor {key}", w_path.display())),
            };
            pairs.entry((layer, module.to_string())).or_default()[slot] = Some(t);
        }
        if pairs.is_empty() {
            return Err(format!("{}: no LoRA weights", w_path.display()));
        }
        let mut deltas = BTreeMap::new();
        for ((layer, module), [a, b]) in pairs {
            let name = format!(
                "blk.{layer}.{}.weight",
                gguf_module(&module).unwrap_or_default()
            );
            let (Some(a), Some(b)) = (a, b) else {
                return Err(format!(
                    "{}: {name} lacks lora_A or lora_B",
                    w_path.display()
                ));
            };
            let e = |err: candle_core::Error| format!("{}: {name}: {err}", w_path.display());
            let a = a.to_dtype(DType::F32).map_err(e)?;
            let b = b.to_dtype(DType::F32).map_err(e)?;
            if a.dims2().map_err(e)?.0 != cfg.r || b.dims2().map_err(e)?.1 != cfg.r {
                return Err(format!(
                    "{}: {name}: A {:?} and B {:?} do not have rank {}",
                    w_path.display(),
                    a.dims(),
                    b.dims(),
                    cfg.r
                ));
            }
            let mut delta = (b.matmul(&a).map_err(e)? * scale).map_err(e)?;
            let heads = match module.as_str() {
                "self_attn.q_proj" => layout.heads,
                "self_attn.k_proj" => layout.kv_heads,
                _ => 0,
            };
            if layout.permuted_qk && heads > 0 {
                delta = permute_rows(&delta, heads).map_err(e)?;
            }
            deltas.insert(name, delta);
        }
        let mut h = Sha256::new();
        h.update(&cfg_bytes);
        h.update(&w_bytes);
        Ok(LoraAdapter {
            name: dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "adapter".into()),
            digest: hex::encode(h.finalize()),
            deltas,
        })
    }
}

/// llama.cpp's q/k permutation: within each head, rows `[half, i]` become `[i, half]`.
fn permute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if heads == 0 || out % (2 * heads) != 0 {
        candle_core::bail!("{out} rows do not split into {heads} heads of even size");
    }
    w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse() {
        assert_eq!(
            parse_key("base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight"),
            Some((12, "self_attn.q_proj", "A"))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"),
            Some((0, "mlp.down_proj", "B"))
        );
        assert_eq!(parse_key("base_model.model.lm_head.weight"), None);
    }

    #[test]
    fn permutation_matches_llama_cpp() {
        // 2 heads of 4 rows: [h0: a0 a1 b0 b1, h1: ...] -> [a0 b0 a1 b1, ...].
        let w = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let p = permute_rows(&w, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(p, [0., 2., 1., 3., 4., 6., 5., 7.]);
    }
}
