"""CPU prefill/decode timing of Hugging Face transformers' Qwen3-VL at Qwen3-VL-2B width, with few
layers and random weights: the yardstick for our Rust implementation's speed.

Not needed by CI. Run from the repository root with the venv from scripts/qwen3vl-requirements.txt:

    /work/venvs/hf/bin/python scripts/bench_qwen3vl_hf.py --threads 2 --runs 3 \\
        [--prompt-tokens 290] [--new-tokens 64] [--image PATH] [--write-checkpoint DIR]

Model: Qwen3-VL-2B widths (text hidden 2048, intermediate 6144, 16 heads, 8 KV heads, head_dim 128,
vocab 151936, mrope_section [24, 20, 20] interleaved, rope_theta 5e6, tied embeddings; vision hidden
1024, 16 heads, intermediate 4096, out_hidden 2048, 2304 position embeddings, deepstack [1, 2, 3])
but only --layers text layers (default 4) and --vision-depth vision blocks (default 4). Weights are
random (torch seed 0, transformers' own init); F32 throughout; transformers' default attention
(sdpa). The image processor uses the real Qwen3-VL bounds (min/max pixels 65,536 / 16,777,216).
The tokenizer is the tiny fixture one (tests/fixtures/qwen3vl/model, 1,000 tokens) while the
config keeps vocab 151,936: the prompt only uses ids below 1,000, which does not change the cost.

Timing: greedy generate (do_sample=False, EOS disabled so exactly --new-tokens come out); a logits
processor stamps the time at each step. prefill = start of generate -> first step's logits
(includes the vision tower when --image is given; prompt tokens count the image's tokens);
decode = first step -> last step, over new_tokens - 1 single-token forwards. One untimed warm-up
run, then --runs timed runs; prints JSON with median/min/max tokens per second.

--write-checkpoint DIR saves the model (F32 safetensors, hub layout, with the processor files)
there, to time other implementations on the same weights. Keep DIR outside the repository: it is
about 2.7 GB at the default depth.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# First: sets the offline / tokenizers environment before transformers loads.
from qwen3vl_common import (
    REAL_IMAGE_SIZE,
    SHAPES,
    TINY,
    generate_with,
    greedy_config,
    load_image,
    model_inputs,
    qwen3vl_config,
)

import torch
import transformers
from transformers import (
    AutoProcessor,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)


class Stamp(LogitsProcessor):
    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def make_config(tok, layers: int, vision_depth: int) -> Qwen3VLConfig:
    """Qwen3-VL-2B widths, `layers` text layers, `vision_depth` vision blocks with DeepStack at
    blocks 1, 2, 3 where they exist."""
    text = dict(SHAPES["2b"]["text"], num_hidden_layers=layers)
    deepstack = [i for i in (1, 2, 3) if i < vision_depth]
    vision = dict(SHAPES["2b"]["vision"], depth=vision_depth, deepstack_visual_indexes=deepstack)
    return qwen3vl_config(tok, text, vision, tie_word_embeddings=True)


def build_inputs(processor, prompt_tokens: int, image_path: str | None) -> dict:
    filler = (
        "Weekend camping by the lake: tent, stove, two chairs and a lot of coffee. "
        "周末露营，湖边搭帐篷，清晨煮咖啡。 The quick brown fox jumps over the lazy dog. "
    )
    content = []
    images = None
    if image_path:
        images = [load_image(image_path)]
        content.append({"type": "image"})
    # Grow the user text until the prompt reaches the target length, then cut the text tokens.
    text_part = filler
    while True:
        msgs = [{"role": "user", "content": content + [{"type": "text", "text": text_part}]}]
        text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        enc = processor(text=[text], images=images, return_tensors="pt")
        n = enc["input_ids"].shape[1]
        if n >= prompt_tokens:
            break
        text_part += filler
    excess = n - prompt_tokens
    if excess:
        # drop tokens from the middle of the user text (keep the template's head and tail)
        ids = enc["input_ids"][0]
        tail = 5  # "<|im_end|>\n<|im_start|>assistant\n"
        cut_end = len(ids) - tail
        cut_start = cut_end - excess
        keep = torch.cat([ids[:cut_start], ids[cut_end:]])
        assert not (ids[cut_start:cut_end] == processor.image_token_id).any(), "prompt too short for the image"
        enc["input_ids"] = keep[None]
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        enc["mm_token_type_ids"] = torch.cat(
            [enc["mm_token_type_ids"][0][:cut_start], enc["mm_token_type_ids"][0][cut_end:]]
        )[None]
    return model_inputs(enc)


def run_once(model, inputs: dict, new_tokens: int) -> tuple[float, float]:
    stamp = Stamp()
    gc = greedy_config(new_tokens, 0, min_new_tokens=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = generate_with(model, inputs, gc, logits_processor=LogitsProcessorList([stamp]))
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    assert len(stamp.times) == new_tokens
    prefill = stamp.times[0] - t0
    decode = stamp.times[-1] - stamp.times[0]
    return prefill, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=290)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--image", default=None, help="optional image (e.g. 448x448) put before the text")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4, help="text decoder layers")
    ap.add_argument("--vision-depth", type=int, default=4, help="vision blocks")
    ap.add_argument("--write-checkpoint", default=None, metavar="DIR")
    args = ap.parse_args()
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    processor = AutoProcessor.from_pretrained(TINY)
    processor.image_processor.size = dict(REAL_IMAGE_SIZE)
    cfg = make_config(processor.tokenizer, args.layers, args.vision_depth)
    t = time.perf_counter()
    model = Qwen3VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    model.eval()
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())

    if args.write_checkpoint:
        out = Path(args.write_checkpoint)
        out.mkdir(parents=True, exist_ok=True)
        model.generation_config = GenerationConfig.from_pretrained(TINY)
        model.save_pretrained(out, safe_serialization=True)
        processor.save_pretrained(out)
        for fname in ("preprocessor_config.json", "video_preprocessor_config.json"):
            d = json.loads((TINY / fname).read_text(encoding="utf-8"))
            if fname == "preprocessor_config.json":
                d["size"] = dict(REAL_IMAGE_SIZE)
            (out / fname).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote checkpoint to {out}", file=sys.stderr)

    inputs = build_inputs(processor, args.prompt_tokens, args.image)
    n_prompt = int(inputs["input_ids"].shape[1])
    n_image = int((inputs["input_ids"] == cfg.image_token_id).sum())

    run_once(model, inputs, args.new_tokens)  # warm-up
    prefill, decode = [], []
    for _ in range(args.runs):
        p, d = run_once(model, inputs, args.new_tokens)
        prefill.append(n_prompt / p)
        decode.append((args.new_tokens - 1) / d)

    def stats(xs):
        return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3)}

    print(
        json.dumps(
            {
                "impl": "transformers",
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "dtype": "float32",
                "attn_implementation": model.config._attn_implementation,
                "threads": args.threads,
                "layers": args.layers,
                "vision_depth": args.vision_depth,
                "params": n_params,
                "build_s": round(build_s, 2),
                "prompt_tokens": n_prompt,
                "image_tokens": n_image,
                "image": args.image,
                "new_tokens": args.new_tokens,
                "runs": args.runs,
                "prefill_tok_s": stats(prefill),
                "decode_tok_s": stats(decode),
                "per_run": {"prefill_tok_s": [round(x, 3) for x in prefill], "decode_tok_s": [round(x, 3) for x in decode]},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
