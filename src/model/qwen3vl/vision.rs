//! The Qwen3-VL vision tower: patch embedding (a Conv3d whose stride equals its kernel, so a
//! matrix product over flattened patches), learned position embeddings bilinearly interpolated to
//! the image's grid, 2-D rotary attention within each image, and the patch mergers: the final one,
//! whose output replaces the `<|image_pad|>` tokens, and the DeepStack ones, whose outputs are added
//! to the hidden states after the first decoder layers.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, VarBuilder};

use super::config::VisionConfig;

/// One image's patch grid: frames, rows and columns of 16x16 patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    /// Frames (1 for an image).
    pub t: usize,
    /// Patch rows.
    pub h: usize,
    /// Patch columns.
    pub w: usize,
}

impl Grid {
    /// The grid of a processed image.
    pub fn of(p: &super::image_proc::ProcessedImage) -> Grid {
        Grid {
            t: p.grid_thw[0],
            h: p.grid_thw[1],
            w: p.grid_thw[2],
        }
    }

    /// Patches.
    pub fn patches(&self) -> usize {
        self.t * self.h * self.w
    }
}

/// What the tower gives the text model for a set of images, in image order.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// Merged tokens, `[sum of patches / merge^2, out_hidden]`.
    pub embeds: Tensor,
    /// One `[same rows, out_hidden]` tensor per DeepStack layer.
    pub deepstack: Vec<Tensor>,
}

struct Merger {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    postshuffle: bool,
    merged: usize,
}

impl Merger {
    fn new(cfg: &VisionConfig, postshuffle: bool, vb: VarBuilder) -> Result<Merger> {
        let merged = cfg.hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let norm_size = if postshuffle { merged } else { cfg.hidden_size };
        Ok(Merger {
            norm: layer_norm(norm_size, 1e-6, vb.pp("norm"))?,
            fc1: linear(merged, merged, vb.pp("linear_fc1"))?,
            fc2: linear(merged, cfg.out_hidden_size, vb.pp("linear_fc2"))?,
            postshuffle,
            merged,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.postshuffle {
            self.norm.forward(&x.reshape(((), self.merged))?)?
        } else {
            self.norm.forward(x)?.reshape(((), self.merged))?
        };
        // HF's merger uses nn.GELU(): the exact (erf) form.
        self.fc2.forward(&self.fc1.forward(&x)?.gelu_erf()?)
    }
}

struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    head_dim: usize,
    tanh_gelu: bool,
}

impl Block {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Block> {
        let h = cfg.hidden_size;
        Ok(Block {
            norm1: layer_norm(h, 1e-6, vb.pp("norm1"))?,
            norm2: layer_norm(h, 1e-6, vb.pp("norm2"))?,
            qkv: linear(h, 3 * h, vb.pp("attn.qkv"))?,
            proj: linear(h, h, vb.pp("attn.proj"))?,
            fc1: linear(h, cfg.intermediate_size, vb.pp("mlp.linear_fc1"))?,
            fc2: linear(cfg.intermediate_size, h, vb.pp("mlp.linear_fc2"))?,
            heads: cfg.num_heads,
            head_dim: h / cfg.num_heads,
            tanh_gelu: cfg.hidden_act != "gelu",
        })
    }

    /// `x`: `[patches, hidden]`; `cos`/`sin`: `[patches, head_dim/2]`; `spans`: patches per image.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, spans: &[usize]) -> Result<Tensor> {
        let n = x.dim(0)?;
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x)?)?
            .reshape((n, 3, self.heads, self.head_dim))?
            .permute((1, 2, 0, 3))?; // [3, heads, n, hd]
        let q = qkv.get(0)?.contiguous()?.unsqueeze(0)?;
        let k = qkv.get(1)?.contiguous()?.unsqueeze(0)?;
        let v = qkv.get(2)?.contiguous()?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.squeeze(0)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(spans.len());
        let mut at = 0;
        // Attention never crosses images.
        for &len in spans {
            let q = q.narrow(1, at, len)?;
            let k = k.narrow(1, at, len)?;
            let v = v.narrow(1, at, len)?;
            let dtype = q.dtype();
            let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
            outs.push(probs.matmul(&v)?); // [heads, len, hd]
            at += len;
        }
        let attn = Tensor::cat(&outs, 1)?
            .transpose(0, 1)?
            .reshape((n, self.heads * self.head_dim))?;
        let x = (x + self.proj.forward(&attn)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?;
        let h = if self.tanh_gelu {
            h.gelu()?
        } else {
            h.gelu_erf()?
        };
        x + self.fc2.forward(&h)?
    }
}

/// The vision tower.
pub struct VisionTower {
    patch_w: Tensor,
    patch_b: Tensor,
    pos_embed: Tensor,
    grid_side: usize,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack_indexes: Vec<usize>,
    deepstack: Vec<Merger>,
    merge: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

/// `torch.linspace(start, end, steps)` in f32, as torch computes it (from both ends).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

impl VisionTower {
    /// Loads `model.visual.*` (the `vb` given) in `dtype`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<VisionTower> {
        let h = cfg.hidden_size;
        let flat = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
        let patch_w = vb
            .get(
                (
                    h,
                    cfg.in_channels,
                    cfg.temporal_patch_size,
                    cfg.patch_size,
                    cfg.patch_size,
                ),
                "patch_embed.proj.weight",
            )?
            .reshape((h, flat))?
            .t()?
            .contiguous()?;
        let patch_b = vb.get(h, "patch_embed.proj.bias")?;
        let pos_embed = vb.get((cfg.num_position_embeddings, h), "pos_embed.weight")?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(cfg, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let deepstack = (0..cfg.deepstack_visual_indexes.len())
            .map(|i| Merger::new(cfg, true, vb.pp(format!("deepstack_merger_list.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTower {
            patch_w,
            patch_b,
            pos_embed,
            grid_side: (cfg.num_position_embeddings as f64).sqrt() as usize,
            blocks,
            merger: Merger::new(cfg, false, vb.pp("merger"))?,
            deepstack_indexes: cfg.deepstack_visual_indexes.clone(),
            deepstack,
            merge: cfg.spatial_merge_size,
            head_dim: h / cfg.num_heads,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The learned position grid interpolated (bilinear, corners aligned) to each image's grid,
    /// in merge-block order.
    fn position_embeddings(&self, grids: &[Grid]) -> Result<Tensor> {
        let n = self.grid_side;
        let mut idx: [Vec<u32>; 4] = Default::default();
        let mut wts: [Vec<f32>; 4] = Default::default();
        let mut order: Vec<u32> = Vec::new();
        let mut base = 0u32;
        for g in grids {
            let hs = linspace(0.0, (n - 1) as f32, g.h);
            let ws = linspace(0.0, (n - 1) as f32, g.w);
            for &y in &hs {
                let y0 = y as usize; // truncation, as `.int()`
                let y1 = (y0 + 1).min(n - 1);
                let dy = y - y0 as f32;
                for &x in &ws {
                    let x0 = x as usize;
                    let x1 = (x0 + 1).min(n - 1);
                    let dx = x - x0 as f32;
                    let corners = [(y0, x0), (y0, x1), (y1, x0), (y1, x1)];
                    let weights = [
                        (1.0 - dy) * (1.0 - dx),
                        (1.0 - dy) * dx,
                        dy * (1.0 - dx),
                        dy * dx,
                    ];
                    for c in 0..4 {
                        idx[c].push((corners[c].0 * n + corners[c].1) as u32);
                        wts[c].push(weights[c]);
                    }
                }
            }
            // Row-major (h, w) -> merge blocks (h/m, w/m, m, m), repeated per frame.
            let m = self.merge;
            for _ in 0..g.t {
                for bh in 0..g.h / m {
                    for bw in 0..g.w / m {
                        for ih in 0..m {
                            for iw in 0..m {
                                order.push(base + ((bh * m + ih) * g.w + bw * m + iw) as u32);
                            }
                        }
                    }
                }
            }
            base += (g.h * g.w) as u32;
        }
        let mut sum: Option<Tensor> = None;
        for c in 0..4 {
            let len = idx[c].len();
            let i = Tensor::from_vec(std::mem::take(&mut idx[c]), len, &self.device)?;
            let w = Tensor::from_vec(std::mem::take(&mut wts[c]), (len, 1), &self.device)?
                .to_dtype(self.dtype)?;
            let e = self.pos_embed.index_select(&i, 0)?.broadcast_mul(&w)?;
            sum = Some(match sum {
                None => e,
                Some(s) => (s + e)?,
            });
        }
        let sum = sum.expect("four corners");
        let len = order.len();
        sum.index_select(&Tensor::from_vec(order, len, &self.device)?, 0)
    }

    /// cos/sin `[patches, head_dim/2]` of the 2-D rotary embedding (row, column of each patch).
    fn rotary(&self, grids: &[Grid]) -> Result<(Tensor, Tensor)> {
        let dim = self.head_dim / 2; // rotary width per axis pair
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / 10000f32.powf(i as f32 / dim as f32))
            .collect();
        let m = self.merge;
        let total: usize = grids.iter().map(Grid::patches).sum();
        let mut cos = Vec::with_capacity(total * dim);
        let mut sin = Vec::with_capacity(total * dim);
        for g in grids {
            for _ in 0..g.t {
                for bh in 0..g.h / m {
                    for bw in 0..g.w / m {
                        for ih in 0..m {
                            for iw in 0..m {
                                let (r, c) = ((bh * m + ih) as f32, (bw * m + iw) as f32);
                                for p in [r, c] {
                                    for &f in &inv {
                                        let a = p * f;
                                        cos.push(a.cos());
                                        sin.push(a.sin());
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let cos = Tensor::from_vec(cos, (total, dim), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (total, dim), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Encodes images: `pixels` is `[patches, 3*2*16*16]` (all images' rows, in order), `grids`
    /// their grids.
    pub fn forward(&self, pixels: &Tensor, grids: &[Grid]) -> Result<VisionOutput> {
        let pixels = pixels.to_dtype(self.dtype)?;
        let x = pixels.matmul(&self.patch_w)?.broadcast_add(&self.patch_b)?;
        let mut x = (x + self.position_embeddings(grids)?)?;
        let (cos, sin) = self.rotary(grids)?;
        let spans: Vec<usize> = grids
            .iter()
            .flat_map(|g| std::iter::repeat_n(g.h * g.w, g.t))
            .collect();
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &cos, &sin, &spans)?;
            if let Some(k) = self.deepstack_indexes.iter().position(|&d| d == i) {
                deepstack.push(self.deepstack[k].forward(&x)?);
            }
        }
        let embeds = self.merger.forward(&x)?;
        Ok(VisionOutput { embeds, deepstack })
    }

    /// The dtype the tower computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_ends() {
        let v = linspace(0.0, 7.0, 6);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[5], 7.0);
        assert!((v[2] - 2.8).abs() < 1e-6);
        assert_eq!(linspace(0.0, 7.0, 1), vec![0.0]);
    }
}
