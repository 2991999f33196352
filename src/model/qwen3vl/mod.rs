//! Qwen3-VL, written here with candle ops (candle-transformers' own `qwen3_vl` does not match
//! Hugging Face: no causal mask in prefill, no M-RoPE, a biased LM head; see ARCHITECTURE.md).
//! Loads a checkpoint in Hugging Face layout (`config.json`, sharded or single `*.safetensors`,
//! memory-mapped), runs the vision tower on the images of a prompt, places the merged image tokens
//! on the `<|image_pad|>` positions with their 3-D rotary positions, and decodes over packed
//! sequences with reusable, fixed-capacity KV caches.

pub mod config;
pub mod image_proc;
pub mod linear;
pub mod text;
pub mod vision;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

pub use crate::model::attention::KvCache;
use crate::model::attention::SeqSlice;
pub use config::Config;
use text::TextDecoder;
pub use vision::Grid;
use vision::VisionTower;

/// A prompt ready for prefill: token ids with every image's pads expanded, each token's 3-D
/// rotary position, and the images' pixels.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Token ids (one pad per merged image token).
    pub tokens: Vec<u32>,
    /// (t, h, w) rotary position of each token.
    pub positions: Vec<[u32; 3]>,
    /// Position of the token after the prompt minus its index (negative or zero with images):
    /// decode token `i` sits at `i + rope_delta` on every axis.
    pub rope_delta: i64,
    /// Pixel rows of every image (`[patches, 1536]`, F32) and their grids.
    pub images: Option<(Tensor, Vec<Grid>)>,
}

/// A loaded Qwen3-VL model.
pub struct Qwen3Vl {
    /// Its configuration.
    pub config: Config,
    vision: VisionTower,
    text: TextDecoder,
    device: Device,
}

/// The safetensors files of a checkpoint directory: those the index names, or the single file.
pub fn weight_files(dir: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| format!("{index:?}: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{index:?}: {e}"))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format!("{index:?} has no weight_map"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return files
            .into_iter()
            .map(|f| {
                let p = dir.join(&f);
                if f.contains('/') || f.contains("..") || !p.exists() {
                    Err(format!(
                        "{index:?} names {f:?}, which is not in the directory"
                    ))
                } else {
                    Ok(p)
                }
            })
            .collect();
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(format!(
            "{dir:?} has neither model.safetensors nor model.safetensors.index.json"
        ))
    }
}

impl Qwen3Vl {
    /// Loads the checkpoint in `dir`: the text decoder in `dtype`, the vision tower in
    /// `vision_dtype` (F32 on CPU).
    pub fn load(
        dir: &Path,
        config: Config,
        dtype: DType,
        vision_dtype: DType,
        device: &Device,
    ) -> std::result::Result<Qwen3Vl, String> {
        let files = weight_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; the service does not modify a
        // checkpoint while it runs (the same contract as every mmap-based loader).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
            .map_err(|e| e.to_string())?;
        let vbv = unsafe { VarBuilder::from_mmaped_safetensors(&files, vision_dtype, device) }
            .map_err(|e| e.to_string())?;
        let vision = VisionTower::new(&config.vision, vbv.pp("model.visual"))
            .map_err(|e| format!("vision tower: {e}"))?;
        let text = TextDecoder::new(
            &config.text,
            config.tie_word_embeddings,
            vb.pp("model.language_model"),
            vb.clone(),
        )
        .map_err(|e| format!("text decoder: {e}"))?;
        Ok(Qwen3Vl {
            config,
            vision,
            text,
            device: device.clone(),
        })
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A KV cache of `cap` positions for one sequence.
    pub fn new_cache(&self, cap: usize) -> Result<KvCache> {
        text::new_cache(&self.config.text, cap, self.text.dtype(), &self.device)
    }

    /// LLM tokens one image of `grid` takes.
    pub fn image_tokens(&self, grid: &Grid) -> usize {
        let m = self.config.vision.spatial_merge_size;
        grid.patches() / (m * m)
    }

    /// Expands each `<|image_pad|>` of `ids` (one per image, in order) to its image's token count
    /// and computes rotary positions. `images` are the processed images, in prompt order.
    pub fn prepare(
        &self,
        ids: &[u32],
        images: &[image_proc::ProcessedImage],
    ) -> std::result::Result<Prepared, String> {
        let pad = self.config.image_token_id;
        let found = ids.iter().filter(|&&t| t == pad).count();
        if found != images.len() {
            return Err(format!(
                "the prompt has {found} image placeholders for {} images",
                images.len()
            ));
        }
        let grids: Vec<Grid> = images.iter().map(Grid::of).collect();
        let mut tokens = Vec::with_capacity(ids.len());
        let mut next = 0;
        for &t in ids {
            if t == pad {
                tokens.extend(std::iter::repeat_n(pad, self.image_tokens(&grids[next])));
                next += 1;
            } else {
                tokens.push(t);
            }
        }
        let (positions, rope_delta) =
            rope_index(&tokens, pad, &grids, self.config.vision.spatial_merge_size)?;
        let images = if images.is_empty() {
            None
        } else {
            let rows: usize = images.iter().map(|p| p.rows()).sum();
            let row_len = images[0].row_len();
            let mut flat = Vec::with_capacity(rows * row_len);
            for p in images {
                flat.extend_from_slice(&p.pixel_values);
            }
            let t =
                Tensor::from_vec(flat, (rows, row_len), &self.device).map_err(|e| e.to_string())?;
            Some((t, grids))
        };
        Ok(Prepared {
            tokens,
            positions,
            rope_delta,
            images,
        })
    }

    /// Prefills several prompts in one packed step, each into its (empty or reset) cache, and
    /// returns hidden-state logits: every position's when `all_logits`, else each prompt's last.
    pub fn prefill(
        &self,
        prompts: &[&Prepared],
        caches: &mut [&mut KvCache],
        all_logits: bool,
    ) -> Result<Vec<Tensor>> {
        if prompts.len() != caches.len() {
            candle_core::bail!("{} prompts for {} caches", prompts.len(), caches.len());
        }
        // Every image of every prompt through the tower at once (attention stays per image).
        let mut pixel_parts = Vec::new();
        let mut grids = Vec::new();
        for p in prompts {
            if let Some((px, g)) = &p.images {
                pixel_parts.push(px.clone());
                grids.extend_from_slice(g);
            }
        }
        let vis = if grids.is_empty() {
            None
        } else {
            Some(
                self.vision
                    .forward(&Tensor::cat(&pixel_parts, 0)?, &grids)?,
            )
        };
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        for (p, c) in prompts.iter().zip(caches.iter()) {
            if !c.is_empty() {
                candle_core::bail!("prefill needs an empty cache");
            }
            tokens.extend_from_slice(&p.tokens);
            positions.extend_from_slice(&p.positions);
        }
        let mut x = self.text.embed(&tokens)?;
        let mut deepstack = Vec::new();
        if let Some(vis) = vis {
            let pad = self.config.image_token_id;
            // Row i takes image row k (the k-th pad overall) or keeps its own embedding.
            let n = tokens.len() as u32;
            let mut k = 0u32;
            let mut gather = Vec::with_capacity(tokens.len());
            let mut add = Vec::with_capacity(tokens.len());
            for (i, &t) in tokens.iter().enumerate() {
                if t == pad {
                    gather.push(n + k);
                    k += 1;
                    add.push(k);
                } else {
                    gather.push(i as u32);
                    add.push(0);
                }
            }
            if k as usize != vis.embeds.dim(0)? {
                candle_core::bail!(
                    "{k} image tokens in the prompts, {} from the vision tower",
                    vis.embeds.dim(0)?
                );
            }
            let dtype = self.text.dtype();
            let embeds = vis.embeds.to_dtype(dtype)?;
            let gather = Tensor::new(gather.as_slice(), &self.device)?;
            x = Tensor::cat(&[&x, &embeds], 0)?.index_select(&gather, 0)?;
            let add = Tensor::new(add.as_slice(), &self.device)?;
            let zero = Tensor::zeros((1, x.dim(1)?), dtype, &self.device)?;
            for ds in &vis.deepstack {
                let table = Tensor::cat(&[&zero, &ds.to_dtype(dtype)?], 0)?;
                deepstack.push(table.index_select(&add, 0)?);
            }
        }
        let mut keep = Vec::new();
        let mut at = 0u32;
        for p in prompts {
            let n = p.tokens.len() as u32;
            if all_logits {
                keep.extend(at..at + n);
            } else {
                keep.push(at + n - 1);
            }
            at += n;
        }
        let mut seqs: Vec<SeqSlice<'_>> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(p, c)| SeqSlice {
                tokens: p.tokens.len(),
                cache: c,
            })
            .collect();
        let hidden = self
            .text
            .forward(&x, &positions, &mut seqs, &deepstack, &keep)?;
        let logits = self.text.logits(&hidden)?;
        if all_logits {
            let mut out = Vec::new();
            let mut at = 0;
            for p in prompts {
                out.push(logits.narrow(0, at, p.tokens.len())?);
                at += p.tokens.len();
            }
            Ok(out)
        } else {
            (0..prompts.len()).map(|i| logits.get(i)).collect()
        }
    }

    /// One decode step for several sequences: `tokens[i]` is appended to `caches[i]` at rotary
    /// position `cache.len() + rope_deltas[i]`. Returns each sequence's next-token logits.
    pub fn decode(
        &self,
        tokens: &[u32],
        rope_deltas: &[i64],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Tensor>> {
        let positions: Vec<[u32; 3]> = caches
            .iter()
            .zip(rope_deltas)
            .map(|(c, &d)| {
                let p = (c.len() as i64 + d).max(0) as u32;
                [p, p, p]
            })
            .collect();
        let x = self.text.embed(tokens)?;
        let mut seqs: Vec<SeqSlice<'_>> = caches
            .iter_mut()
            .map(|c| SeqSlice {
                tokens: 1,
                cache: c,
            })
            .collect();
        let keep: Vec<u32> = (0..tokens.len() as u32).collect();
        let hidden = self.text.forward(&x, &positions, &mut seqs, &[], &keep)?;
        let logits = self.text.logits(&hidden)?;
        (0..tokens.len()).map(|i| logits.get(i)).collect()
    }
}

/// 3-D rotary positions of `tokens` (HF's `get_rope_index` for images): text runs count up on all
/// three axes; an image's tokens sit at (start, start + row, start + column) of its merged grid;
/// the text after it resumes one past the largest position used. Returns the positions and the
/// delta that maps later token indices to positions.
pub fn rope_index(
    tokens: &[u32],
    image_token: u32,
    grids: &[Grid],
    merge: usize,
) -> std::result::Result<(Vec<[u32; 3]>, i64), String> {
    let mut out = Vec::with_capacity(tokens.len());
    let mut next: u32 = 0; // the next text position
    let mut i = 0;
    let mut image = 0;
    while i < tokens.len() {
        if tokens[i] != image_token {
            out.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let g = grids
            .get(image)
            .ok_or_else(|| format!("more image tokens than the {} images", grids.len()))?;
        let (gh, gw) = (g.h / merge, g.w / merge);
        let count = g.t * gh * gw;
        if i + count > tokens.len() || tokens[i..i + count].iter().any(|&t| t != image_token) {
            return Err(format!(
                "image {image} needs {count} consecutive image tokens"
            ));
        }
        let start = next;
        let mut max = start;
        for t in 0..g.t {
            for r in 0..gh {
                for c in 0..gw {
                    let p = [start + t as u32, start + r as u32, start + c as u32];
                    max = max.max(p[0]).max(p[1]).max(p[2]);
                    out.push(p);
                }
            }
        }
        next = max + 1;
        i += count;
        image += 1;
    }
    if image != grids.len() {
        return Err(format!("{} images but {image} in the prompt", grids.len()));
    }
    Ok((out, next as i64 - tokens.len() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_index_matches_hf_layout() {
        // text(2) image(grid 1x4x6 -> 2x3 merged) text(2)
        let toks = [1, 2, 9, 9, 9, 9, 9, 9, 3, 4];
        let g = Grid { t: 1, h: 4, w: 6 };
        let (p, delta) = rope_index(&toks, 9, &[g], 2).unwrap();
        assert_eq!(p[0], [0, 0, 0]);
        assert_eq!(p[1], [1, 1, 1]);
        assert_eq!(p[2], [2, 2, 2]);
        assert_eq!(p[4], [2, 2, 4]);
        assert_eq!(p[5], [2, 3, 2]);
        assert_eq!(p[7], [2, 3, 4]);
        assert_eq!(p[8], [5, 5, 5]);
        assert_eq!(p[9], [6, 6, 6]);
        assert_eq!(delta, 7 - 10);
        assert!(rope_index(&toks[..5], 9, &[g], 2).is_err());
        assert!(rope_index(&toks, 9, &[], 2).is_err());
    }
}
