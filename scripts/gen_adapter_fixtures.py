#!/usr/bin/env python3
"""Writes tests/fixtures/adapter/: a small random LoRA adapter in PEFT's format for the default
model, and transformers + PEFT's logits with and without it (the reference for the Rust merge).

    target/distill-venv/bin/python scripts/gen_adapter_fixtures.py      # torch, transformers, peft, gguf
    target/distill-venv/bin/python scripts/gen_adapter_fixtures.py \
        --gguf models/qwen2/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf --fixtures tests/fixtures/qwen2

--fixtures DIR: where the prompts come from (DIR/llamacpp_logits.json) and the adapter goes
(DIR/adapter/). Layers: the first two, the middle one and the last two.

The base is the default GGUF dequantized into transformers (scripts/distill.py's loader, q/k
un-permuted from llama.cpp's layout), so the adapter is in transformers' layout exactly as a
trained one would be. Seeded: the same versions give the same files.
"""

import argparse
import json
import pathlib
import sys

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from distill import DEFAULT_GGUF, ROOT, load_gguf  # noqa: E402


def top_logits(model, prompts, k=64):
    out = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            top = logits.topk(k)
            out.append({"top_ids": top.indices.tolist(), "top_logits": [round(v, 5) for v in top.values.tolist()]})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=str(DEFAULT_GGUF))
    ap.add_argument("--fixtures", default=str(ROOT / "tests/fixtures"))
    ap.add_argument("--scale", type=float, default=0.1, help="std of the random LoRA weights")
    args = ap.parse_args()
    fixtures = pathlib.Path(args.fixtures)
    out = fixtures / "adapter"
    torch.manual_seed(7)
    model, _arch = load_gguf(pathlib.Path(args.gguf))
    n = model.config.num_hidden_layers
    layers = [0, 1, n // 2 - 1, n - 2, n - 1]
    fx = json.loads((fixtures / "llamacpp_logits.json").read_text())
    prompts = [c["prompt_ids"] for c in fx["cases"]]
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=layers,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                # Large enough to move the logits far beyond the Q8_0 merge's rounding.
                p.copy_((torch.randn(p.shape, generator=g) * args.scale).to(torch.float16).float())
    model.eval()
    adapted = top_logits(model, prompts)
    # Both sets of logits at the adapted model's top ids, so the test compares like with like.
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            idx = torch.tensor(adapted[i]["top_ids"])
            with model.disable_adapter():
                b = model(torch.tensor([ids])).logits[0, -1].float()[idx]
            adapted[i]["base_logits"] = [round(v, 5) for v in b.tolist()]
    moved = max(max(abs(a - b) for a, b in zip(c["top_logits"], c["base_logits"])) for c in adapted)
    print(f"adapter moves the top-64 logits by up to {moved:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    from safetensors.torch import load_file, save_file

    (out / "README.md").unlink(missing_ok=True)  # PEFT's model card template
    f = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    (out / "reference.json").write_text(
        json.dumps(
            {
                "made_by": "scripts/gen_adapter_fixtures.py",
                "torch": torch.__version__,
                "layers": layers,
                "scale": args.scale,
                "max_logit_shift": round(moved, 3),
                "cases": [{"prompt_ids": p, **c} for p, c in zip(prompts, adapted)],
            },
            indent=None,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
