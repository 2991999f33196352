"""Writes a Qwen3-VL checkpoint with random weights shaped like the real Qwen3-VL-2B-Instruct or
Qwen3-VL-4B-Instruct, in the Hugging Face hub layout our Rust server loads: the stand-in for the
real model on machines that cannot download it (GPU benchmarks of tagllm against transformers).

Not needed by CI. Run from the repository root with the venv from scripts/qwen3vl-requirements.txt;
nothing is downloaded:

    /work/venvs/hf/bin/python scripts/qwen3vl_shapes.py --shape 2b|4b --out DIR \\
        [--dtype bf16|f32] [--device cpu|cuda] [--text-layers N] [--vision-depth N] [--seed 0]

Keep DIR outside the repository, or under its target/ (ignored by git): at full depth the 2B
checkpoint is about 4.3 GB in BF16 (8.5 GB in F32), the 4B one about 8.9 GB in BF16.

Shapes (SHAPES in scripts/qwen3vl_common.py, shared with scripts/bench_qwen3vl_hf.py). They are
the real checkpoints' config.json values, checked against public copies of
Qwen/Qwen3-VL-2B-Instruct's and Qwen/Qwen3-VL-4B-Instruct's config.json (transformers 4.57 layout:
rope_theta and rope_scaling {mrope_section, mrope_interleaved} in text_config) quoted in several
public GitHub repositories. transformers' configuration_qwen3_vl.py defaults agree on the shared
fields (vocab 151936, head_dim 128, silu, patch 16, temporal patch 2, 2304 position embeddings,
gelu_pytorch_tanh); its other defaults are a larger model's.
  - 2B text: hidden 2048, intermediate 6144, 28 layers, 16 heads, 8 KV heads, head_dim 128,
    vocab 151936, rms_norm_eps 1e-6, rope_theta 5e6, mrope_section [24, 20, 20] interleaved,
    max_position_embeddings 262144, silu, no attention bias, tie_word_embeddings true.
  - 4B text: hidden 2560, intermediate 9728, 36 layers, 32 heads, 8 KV heads, head_dim 128, the
    rest as 2B.
  - vision (both): depth 24, hidden 1024, intermediate 4096, 16 heads, patch 16, temporal patch 2,
    spatial merge 2, 2304 learned position embeddings, deepstack_visual_indexes [5, 11, 17],
    gelu_pytorch_tanh, out_hidden = the text hidden size (2048 / 2560).
--text-layers / --vision-depth shrink the stacks (for quick tests); with a vision depth other than
24 the deepstack indexes become blocks [1, 2, 3] cut to those < depth (min(3, depth - 1) of them,
as scripts/bench_qwen3vl_hf.py does; none at depth 1), since every index must be < depth.
config.json is what save_pretrained writes: the transformers 5 layout (rope_parameters in
text_config) under transformers 5, the 4.57 layout (rope_theta + rope_scaling) under 4.x.

Tokenizer and processor: copied byte for byte from the tiny fixture (tests/fixtures/qwen3vl/model;
tokenizer.json, tokenizer_config.json, chat_template.jinja, *processor*_config.json): its 1,000-token
byte-level BPE with the 14 real Qwen3-VL special tokens (at ids 986..999, not 151643..151656) and
the real Qwen3-VL-Instruct chat template. The config keeps vocab 151936 (embedding and tied head at
full size) and takes its image / video / vision start / end ids from that tokenizer; prompts only
use ids below 1000, which does not change the cost of a forward. preprocessor_config.json carries
Qwen3-VL's real pixel bounds (size {shortest_edge: 65536, longest_edge: 16777216}, patch 16,
merge 2, mean = std = 0.5, bicubic); servers and benchmarks clamp max_pixels themselves (tagllm:
image_max_pixels, 448 * 448 by default). generation_config.json is the fixture's (EOS <|im_end|>).

Weights: built on the meta device (no transformers init), materialised on --device (the rotary
inv_freq buffers, which are not saved, are copied from a small donor model so the in-memory model
also runs), then filled in named_parameters() order from one torch.Generator seeded with --seed
on that device: biases 0, norm weights (LayerNorm / RMSNorm, every 1-D "norm" parameter) 1,
everything else normal(0, 0.02) drawn directly in --dtype. Deterministic for a given device,
dtype and torch version (CPU and CUDA draw different numbers). lm_head is tied to embed_tokens,
so save_pretrained writes no lm_head.weight, as in the real checkpoints. Saved with
save_pretrained (safetensors, transformers' default shard size, so usually one model.safetensors).

Prints the parameter count (tied weights once), per-part counts, the files written and their total
bytes.
"""

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

# First: sets the offline / tokenizers environment before transformers loads.
from qwen3vl_common import REAL_IMAGE_SIZE, REPO, SHAPES, TINY, qwen3vl_config

import torch
import transformers
from safetensors import safe_open
from transformers import (
    AutoProcessor,
    GenerationConfig,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def make_config(tok, shape: str, text_layers: int | None, vision_depth: int | None) -> Qwen3VLConfig:
    text = json.loads(json.dumps(SHAPES[shape]["text"]))
    vision = json.loads(json.dumps(SHAPES[shape]["vision"]))
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
    if vision_depth is not None and vision_depth != vision["depth"]:
        # as scripts/bench_qwen3vl_hf.py: blocks 1, 2, 3 where they exist (min(3, depth - 1) of them)
        vision["depth"] = vision_depth
        vision["deepstack_visual_indexes"] = [i for i in (1, 2, 3) if i < vision_depth]
    assert all(i < vision["depth"] for i in vision["deepstack_visual_indexes"])
    if int(transformers.__version__.split(".")[0]) < 5:
        # transformers 4.57 layout: rope_theta beside rope_scaling (tagllm reads both layouts)
        rope = text.pop("rope_parameters")
        text["rope_theta"] = rope.pop("rope_theta")
        text["rope_scaling"] = rope
    return qwen3vl_config(tok, text, vision, tie_word_embeddings=True)


def rotary_buffers(cfg: Qwen3VLConfig) -> dict:
    """The non-persistent buffers (rotary inv_freq tables) of a model with this config, taken from
    a small donor built the ordinary way (they depend on head_dim and rope_theta only)."""
    donor_cfg = copy.deepcopy(cfg)
    donor_cfg.text_config.num_hidden_layers = 1
    donor_cfg.text_config.vocab_size = 1024
    donor_cfg.vision_config.depth = 2
    donor_cfg.vision_config.deepstack_visual_indexes = [1]
    donor = Qwen3VLForConditionalGeneration._from_config(donor_cfg, dtype=torch.float32)
    return {k: v.clone() for k, v in donor.named_buffers()}


def build_model(cfg: Qwen3VLConfig, dtype: torch.dtype, device: torch.device, seed: int):
    """Meta-device build (no init work), materialised on `device`, filled deterministically."""
    buffers = rotary_buffers(cfg)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.to_empty(device=device)
    # to_empty leaves the buffers uninitialised and unties shared parameters: copy the buffers in
    # from the donor and re-tie the head.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            src = buffers[name]
            assert src.shape == buf.shape, (name, src.shape, buf.shape)
            buf.copy_(src.to(buf.dtype))
    model.tie_weights()
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight, "lm_head not tied"
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied parameter is listed once
            if name.endswith(".bias"):
                p.zero_()
            elif p.ndim == 1:
                assert "norm" in name, name
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval()
    return model


def write_processor_files(out: Path) -> None:
    """The fixture's tokenizer, template and processor files, byte for byte, except the image
    processor's pixel bounds (Qwen3-VL's real ones). Copied rather than re-saved: transformers'
    save_pretrained re-serialises tokenizer.json with different ByteLevel flags."""
    for fname in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "video_preprocessor_config.json"):
        shutil.copyfile(TINY / fname, out / fname)
    pre = json.loads((TINY / "preprocessor_config.json").read_text(encoding="utf-8"))
    pre["size"] = dict(REAL_IMAGE_SIZE)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    proc = json.loads((TINY / "processor_config.json").read_text(encoding="utf-8"))
    proc["image_processor"]["size"] = dict(REAL_IMAGE_SIZE)
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    check = AutoProcessor.from_pretrained(out)
    assert dict(check.image_processor.size) == REAL_IMAGE_SIZE, check.image_processor.size
    assert check.chat_template == AutoProcessor.from_pretrained(TINY).chat_template


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True, metavar="DIR")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the weights are initialised")
    ap.add_argument("--text-layers", type=int, default=None, help="override the text decoder depth")
    ap.add_argument("--vision-depth", type=int, default=None, help="override the vision tower depth")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.text_layers is not None and args.text_layers < 1:
        ap.error("--text-layers must be at least 1")
    if args.vision_depth is not None and args.vision_depth < 1:
        ap.error("--vision-depth must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    out = Path(args.out).resolve()
    # target/ is ignored by git: scripts/bench_gpu.sh keeps its checkpoints in target/bench.
    if (out == REPO or REPO in out.parents) and REPO / "target" not in out.parents:
        ap.error("--out must be outside the repository (or under its target/)")
    if out.exists() and any(out.iterdir()):
        ap.error(f"--out {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    processor = AutoProcessor.from_pretrained(TINY)
    cfg = make_config(processor.tokenizer, args.shape, args.text_layers, args.vision_depth)

    t = time.perf_counter()
    model = build_model(cfg, dtype, device, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())
    parts = {
        "vision": sum(p.numel() for p in model.model.visual.parameters()),
        "text_embed_tied_head": model.model.language_model.embed_tokens.weight.numel(),
        "text_layers": sum(p.numel() for p in model.model.language_model.layers.parameters()),
    }

    t = time.perf_counter()
    model.generation_config = GenerationConfig.from_pretrained(TINY)
    model.save_pretrained(out)
    write_processor_files(out)
    save_s = time.perf_counter() - t

    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    # The files hold every parameter once (no lm_head.weight: tied), in the requested dtype.
    saved = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                saved[k] = (sl.get_dtype(), sl.get_shape())
    assert "lm_head.weight" not in saved, "lm_head.weight saved despite tie_word_embeddings"
    n_saved = 0
    for k, (dt, shp) in saved.items():
        assert dt == {"bf16": "BF16", "f32": "F32"}[args.dtype], (k, dt)
        n_saved += int(torch.Size(shp).numel())
    assert n_saved == n_params, (n_saved, n_params)
    text, vision = cfg.text_config, cfg.vision_config
    print(
        json.dumps(
            {
                "shape": args.shape,
                "out": str(out),
                "dtype": args.dtype,
                "init_device": args.device,
                "seed": args.seed,
                "text_layers": text.num_hidden_layers,
                "vision_depth": vision.depth,
                "deepstack_visual_indexes": list(vision.deepstack_visual_indexes),
                "params": n_params,
                "params_by_part": parts,
                "tensors_saved": len(saved),
                "build_s": round(build_s, 2),
                "save_s": round(save_s, 2),
                "files": files,
                "bytes_written": sum(files.values()),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            },
            indent=2,
        )
    )
    print(f"wrote {sum(files.values()):,} bytes, {n_params:,} parameters to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
