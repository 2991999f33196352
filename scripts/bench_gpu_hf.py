"""The peer benchmark for tagllm's GPU serving: Hugging Face transformers' batched greedy `generate`
of Qwen3-VL on exactly the prompts our server got, so notes per second compare like for like.

Not needed by CI. Run (on the GPU machine, after our Rust load generator wrote the prompts file; the
checkpoint is typically one written by scripts/qwen3vl_shapes.py):

    python scripts/bench_gpu_hf.py --prompts FILE [--model DIR] [--batch 16] [--notes N] \\
        [--new-tokens N] [--device cuda|cpu] [--dtype bf16|f32] \\
        [--attn sdpa|flash_attention_2|eager] [--warmup 1] [--threads N] [--image-max-pixels PX]

The prompts file (JSON, written by the Rust load generator):
    {"model": "/abs/ckpt/dir", "new_tokens": 64,
     "prompts": [{"text": "<fully rendered chat prompt, with
                   <|vision_start|><|image_pad|><|vision_end|> where each image goes>",
                  "images": ["/abs/path/note-448.png"], "prompt_tokens": 812}, ...]}
prompt_tokens is our server's count after expanding the image pads. An optional top-level
"image_max_pixels" is used as the default of --image-max-pixels (else 200704 = 448 * 448, our
server's default).

What runs: the model (Qwen3VLForConditionalGeneration) and AutoProcessor from the checkpoint, in
--dtype with --attn attention. Images are clamped to the pixel bounds our server uses: max_pixels
= min(the checkpoint's size.longest_edge, max(--image-max-pixels, 32 * 32)), min_pixels =
min(size.shortest_edge, max_pixels), set as the image processor's size {shortest_edge,
longest_edge}. Notes are taken in order, cycling through the prompts, --batch at a time; each batch
is: decode its images (PIL open + EXIF transpose, the fixtures' decoding rule), run the processor
on the batch (text list + flat image list, padding=True, left padding), check that every row's
unpadded input_ids length equals its prompt's prompt_tokens (else abort: both sides must run the
same prompts), move to the device, greedy generate (do_sample=False, EOS disabled,
min_new_tokens = max_new_tokens = new_tokens, so exactly new_tokens come out for every note; KV
cache on, transformers' default dynamic cache). --warmup batches (the first ones of the cycle) run
untimed first. Preprocessing (image decode + processor, on the CPU as transformers does by
default) is inside the timing: it is part of serving a note. On CUDA every timestamp is taken after
torch.cuda.synchronize().

Prints JSON on stdout (progress on stderr): engine, versions, device name, dtype, attention, batch,
notes, new_tokens, wall_s (all timed batches), notes_per_s, gen_tok_s (notes * new_tokens /
wall_s), prompt_tok_s (sum of prompt_tokens / wall_s), per-note latency percentiles two ways:
  - latency_batch_s: a note's latency is its batch's wall time from that batch's start;
  - latency_queue_s: all notes submitted at t=0 and served batch after batch: a note's latency is
    the completion time of its batch since the first batch started;
time to the first token of each batch (preprocessing + vision + prefill: ttft_batch_s), peak GPU
memory (torch.cuda.max_memory_allocated over the timed batches; weights included) and the memory
held after loading (CUDA only), and a per-batch list.
"""

import argparse
import copy
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

# First: sets the offline / tokenizers environment before transformers loads.
from qwen3vl_common import MODEL_INPUTS, greedy_config, load_image

import numpy as np
import torch
import transformers
from transformers import (
    AutoProcessor,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen3VLForConditionalGeneration,
)

DEFAULT_IMAGE_MAX_PIXELS = 200704  # tagllm's LoadOptions::image_max_pixels default, 448 * 448
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstStep(LogitsProcessor):
    """Stamps the time the first step's logits exist (synchronised): time to first token."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t = None

    def __call__(self, input_ids, scores):
        if self.t is None:
            sync(self.device)
            self.t = time.perf_counter()
        return scores


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def pct(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(a, 50)), 4),
        "p99": round(float(np.percentile(a, 99)), 4),
        "mean": round(float(a.mean()), 4),
        "max": round(float(a.max()), 4),
    }


def set_pixel_bounds(processor, image_max_pixels: int) -> dict:
    """Our server's rule: max = min(checkpoint max, max(cap, factor^2)), min = min(checkpoint min, max)."""
    ip = processor.image_processor
    size = dict(ip.size)
    file_min, file_max = int(size["shortest_edge"]), int(size["longest_edge"])
    factor = ip.patch_size * ip.merge_size
    max_px = min(file_max, max(image_max_pixels, factor * factor))
    min_px = min(file_min, max_px)
    ip.size = {"shortest_edge": min_px, "longest_edge": max_px}
    if hasattr(ip, "max_pixels"):  # transformers 4.x keeps these beside size
        ip.min_pixels, ip.max_pixels = min_px, max_px
    return {"checkpoint": {"shortest_edge": file_min, "longest_edge": file_max}, "used": dict(ip.size)}


def run_batch(model, processor, batch: list[tuple[int, dict]], gc: GenerationConfig, device, check: bool) -> dict:
    """One batch, timed from image decode to the last token. batch: (note index, prompt) pairs."""
    sync(device)
    t0 = time.perf_counter()
    texts = [p["text"] for _, p in batch]
    images = [load_image(path) for _, p in batch for path in p.get("images", [])]
    enc = processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    if check:
        bad = [(row, i, p["prompt_tokens"], n) for row, ((i, p), n) in enumerate(zip(batch, lengths)) if n != p["prompt_tokens"]]
        if bad:
            grids = enc["image_grid_thw"].tolist() if "image_grid_thw" in enc else []
            lines = [f"  note {i} (row {row}): server counted {want} prompt tokens, transformers {got}" for row, i, want, got in bad]
            sys.exit(
                "prompt token counts differ, so the two sides would not run the same prompts:\n"
                + "\n".join(lines)
                + f"\n  image grids (t, h, w) in this batch: {grids}; image processor size: {dict(processor.image_processor.size)}"
                + "\n  (check --image-max-pixels against the server's image_max_pixels, and the checkpoint dir)"
            )
    inputs = {k: enc[k].to(device) for k in MODEL_INPUTS if k in enc}
    sync(device)
    t_pre = time.perf_counter()
    stamp = FirstStep(device)
    model.model.rope_deltas = None
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=gc, logits_processor=LogitsProcessorList([stamp]))
    sync(device)
    t1 = time.perf_counter()
    new = out.shape[1] - inputs["input_ids"].shape[1]
    assert new == gc.max_new_tokens, f"generated {new} tokens, expected {gc.max_new_tokens}"
    return {
        "notes": len(batch),
        "padded_len": int(inputs["input_ids"].shape[1]),
        "prompt_tokens": int(sum(lengths)),
        "images": len(images),
        "start": t0,
        "wall_s": t1 - t0,
        "preprocess_s": t_pre - t0,
        "ttft_s": (stamp.t or t1) - t0,
        "decode_s": t1 - (stamp.t or t1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, metavar="FILE")
    ap.add_argument("--model", default=None, metavar="DIR", help="checkpoint dir (default: the prompts file's)")
    ap.add_argument("--batch", type=int, default=16, help="notes per generate call")
    ap.add_argument("--notes", type=int, default=None, help="notes to run, cycling through the prompts (default: all)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: the prompts file's")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, f32 on cpu")
    ap.add_argument("--attn", choices=["sdpa", "flash_attention_2", "eager"], default="sdpa")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--image-max-pixels", type=int, default=None, help="default: the file's, else 200704")
    args = ap.parse_args()

    spec = json.loads(Path(args.prompts).read_text(encoding="utf-8"))
    prompts = spec["prompts"]
    if not prompts:
        ap.error("the prompts file has no prompts")
    model_dir = args.model or spec.get("model")
    if not model_dir:
        ap.error("no --model and no \"model\" in the prompts file")
    new_tokens = args.new_tokens if args.new_tokens is not None else int(spec["new_tokens"])
    notes = args.notes if args.notes is not None else len(prompts)
    image_max_pixels = args.image_max_pixels or int(spec.get("image_max_pixels", DEFAULT_IMAGE_MAX_PIXELS))
    if args.batch < 1 or notes < 1 or new_tokens < 1 or args.warmup < 0:
        ap.error("--batch, --notes and --new-tokens must be at least 1, --warmup at least 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "f32")
    dtype = DTYPES[dtype_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model and spec.get("model") and Path(args.model).resolve() != Path(spec["model"]).resolve():
        print(f"note: --model {args.model} overrides the file's {spec['model']}", file=sys.stderr)

    processor = AutoProcessor.from_pretrained(model_dir)
    pixel_bounds = set_pixel_bounds(processor, image_max_pixels)
    processor.tokenizer.padding_side = "left"
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    t = time.perf_counter()
    # Straight onto the GPU where accelerate is installed (transformers' device_map needs it), else
    # load on the CPU and move.
    direct = device.type == "cuda" and importlib.util.find_spec("accelerate") is not None
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        model_dir,
        dtype=dtype,
        attn_implementation=args.attn,
        device_map=str(device) if direct else None,
    )
    model.to(device)
    model.eval()
    sync(device)
    load_s = time.perf_counter() - t
    mem_after_load = torch.cuda.memory_allocated(device) if device.type == "cuda" else None

    gc = greedy_config(new_tokens, pad_id)
    # generate() fills fields left None (eos_token_id among them) from model.generation_config, so
    # EOS is only really off while the model's own generation config has none.
    model.generation_config = copy.deepcopy(gc)

    order = [(i, prompts[i % len(prompts)]) for i in range(notes)]
    batches = [order[s:s + args.batch] for s in range(0, notes, args.batch)]
    warm = [batches[k % len(batches)] for k in range(args.warmup)]
    print(
        f"{model_dir}: {sum(p.numel() for p in model.parameters()):,} params, {dtype_name}, {args.attn}, "
        f"load {load_s:.1f}s; {notes} notes in {len(batches)} batches of {args.batch}, {new_tokens} new tokens",
        file=sys.stderr,
    )
    for k, b in enumerate(warm):
        r = run_batch(model, processor, b, gc, device, check=True)
        print(f"warm-up {k}: {r['notes']} notes, {r['wall_s']:.2f}s", file=sys.stderr)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = []
    sync(device)
    t_start = time.perf_counter()
    for k, b in enumerate(batches):
        r = run_batch(model, processor, b, gc, device, check=True)
        results.append(r)
        print(
            f"batch {k}: {r['notes']} notes, L={r['padded_len']}, {r['wall_s']:.3f}s "
            f"(preprocess {r['preprocess_s']:.3f}s, ttft {r['ttft_s']:.3f}s)",
            file=sys.stderr,
        )
    sync(device)
    wall = time.perf_counter() - t_start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    peak_reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None

    lat_batch, lat_queue = [], []
    for r in results:
        lat_batch += [r["wall_s"]] * r["notes"]
        lat_queue += [r["start"] + r["wall_s"] - t_start] * r["notes"]
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    report = {
        "engine": "transformers",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "device": str(device),
        "device_name": device_name(device),
        "dtype": dtype_name,
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "model": str(Path(model_dir).resolve()),
        "prompts_file": str(Path(args.prompts).resolve()),
        "distinct_prompts": len(prompts),
        "batch": args.batch,
        "batches": len(results),
        "notes": notes,
        "new_tokens": new_tokens,
        "warmup_batches": args.warmup,
        "image_max_pixels": image_max_pixels,
        "image_size": pixel_bounds,
        "load_s": round(load_s, 3),
        "wall_s": round(wall, 4),
        "notes_per_s": round(notes / wall, 4),
        "gen_tok_s": round(notes * new_tokens / wall, 3),
        "prompt_tok_s": round(prompt_tokens / wall, 3),
        "prompt_tokens_total": prompt_tokens,
        "prompt_tokens_mean": round(prompt_tokens / notes, 2),
        "latency_batch_s": pct(lat_batch),
        "latency_queue_s": pct(lat_queue),
        "ttft_batch_s": pct([r["ttft_s"] for r in results]),
        "preprocess_s_total": round(sum(r["preprocess_s"] for r in results), 4),
        "decode_s_total": round(sum(r["decode_s"] for r in results), 4),
        "peak_gpu_mem_bytes": peak,
        "peak_gpu_reserved_bytes": peak_reserved,
        "gpu_mem_after_load_bytes": mem_after_load,
        "per_batch": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "start"} for r in results
        ],
    }
    if len(results) > 1:
        report["batch_wall_s_median"] = round(statistics.median(r["wall_s"] for r in results), 4)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
