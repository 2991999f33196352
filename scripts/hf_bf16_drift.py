"""Hugging Face transformers' own half-precision drift on our Qwen3-VL fixture: how far BF16 (and
F16) prefill logits move from F32 ones in transformers itself, the yardstick for the tolerances of
our CUDA BF16 parity test.

Not needed by CI. Run from the repository root (on the GPU machine, or here on the CPU):

    python scripts/hf_bf16_drift.py [--device cuda|cpu] [--attn eager|sdpa] [--threads N]

Inputs: the committed fixture tests/fixtures/qwen3vl/ (written by scripts/gen_qwen3vl_fixtures.py):
model/ (the tiny random Qwen3-VL checkpoint, F32), images/, and reference.json /
reference.safetensors. The prompts P1 (system + 2 images + text), P2 (text only) and P3 (one RGBA
image + text) are rebuilt from reference.json's own record of them ("messages", "images"): the chat
template is applied to the messages (checked equal to the recorded "text"), images are decoded
with the fixtures' rule (PIL open, EXIF transpose, the PIL image to the processor), and the
processor's input_ids are checked equal to the committed input_ids.P. Also the left-padded batch
[P1, P2], as in the fixture.

For each prompt, on --device (default cuda if available), one prefill forward (the whole model,
vision tower included, in the dtype under test; --attn attention, default eager as the fixture) in
F32, BF16 and F16, and 16 greedy tokens (EOS disabled) in each dtype. F32 on CUDA runs with TF32
off for matmuls and convolutions (true F32); the half-precision runs keep torch's defaults.

Prints JSON: per prompt (and for the batch's last positions), per half dtype:
  max_abs_diff_vs_f32        max |logits_half - logits_f32| over all the prompt's positions
  max_abs_diff_vs_f32_last   the same at the last position only
  top1_agree / top1_total    positions whose argmax is the same as F32's
  greedy_prefix_vs_f32       how many of the 16 greedy tokens agree with F32's greedy before the
                             first difference (16 = all)
and f32_device_vs_cpu_reference_max_abs (F32 on --device against the committed CPU logits.P),
f32_greedy_equals_reference (F32 greedy on --device vs the committed greedy.P), and the fixture's
smallest greedy top-1/top-2 margin (a half-precision drift above it can flip greedy tokens).
"""

import argparse
import json
import platform
import sys

# First: sets the offline / tokenizers environment before transformers loads.
from qwen3vl_common import FIXTURE as FIX, generate_with, greedy_config, load_image, model_inputs

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

PROMPTS = ("P1", "P2", "P3")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def strict_fp32() -> str:
    """TF32 off for CUDA matmuls and cuDNN convolutions (the patch embedding is a Conv3d)."""
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        return "fp32_precision=ieee (matmul, cudnn conv)"
    except AttributeError:  # older torch
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return "allow_tf32=False (matmul, cudnn)"


def greedy(model, inputs: dict, n: int, pad_id: int) -> torch.Tensor:
    """n greedy tokens (EOS disabled), moved to the CPU."""
    out = generate_with(model, inputs, greedy_config(n, pad_id))
    return out[:, inputs["input_ids"].shape[1]:].cpu()


def prefix_len(a: torch.Tensor, b: torch.Tensor) -> int:
    same = (a == b).tolist()
    return same.index(False) if False in same else len(same)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fp32_mode = strict_fp32() if device.type == "cuda" else "cpu"

    ref = json.loads((FIX / "reference.json").read_text(encoding="utf-8"))
    ref_t = load_file(FIX / "reference.safetensors")
    new_tokens = int(ref["greedy"]["new_tokens"])
    processor = AutoProcessor.from_pretrained(FIX / "model")
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    # Inputs, checked against the fixture.
    cases = {}
    for name in PROMPTS:
        rp = ref["prompts"][name]
        text = processor.apply_chat_template(rp["messages"], tokenize=False, add_generation_prompt=True)
        assert text == rp["text"], f"{name}: chat template output differs from reference.json"
        imgs = [load_image(FIX / "images" / f) for f in rp["images"]]
        enc = processor(text=[text], images=imgs or None, return_tensors="pt")
        assert torch.equal(enc["input_ids"][0], ref_t[f"input_ids.{name}"]), f"{name}: input_ids differ from the fixture"
        cases[name] = model_inputs(enc)
    texts = [ref["prompts"][n]["text"] for n in ref["batch"]["prompts"]]
    imgs = [load_image(FIX / "images" / f) for n in ref["batch"]["prompts"] for f in ref["prompts"][n]["images"]]
    enc = processor(text=texts, images=imgs, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(enc["input_ids"], ref_t["batch.input_ids"]), "batch input_ids differ from the fixture"
    cases["batch"] = model_inputs(enc)

    logits, greedies = {}, {}
    for dname, dtype in DTYPES.items():
        model = Qwen3VLForConditionalGeneration.from_pretrained(FIX / "model", dtype=dtype, attn_implementation=args.attn)
        model.to(device).eval()
        for cname, inputs in cases.items():
            dev_inputs = {k: v.to(device) for k, v in inputs.items()}
            with torch.inference_mode():
                model.model.rope_deltas = None
                lg = model(**dev_inputs).logits.float().cpu()
                greedies[(dname, cname)] = greedy(model, dev_inputs, new_tokens, pad_id)
            logits[(dname, cname)] = lg[0] if cname != "batch" else lg[:, -1, :]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report = {
        "engine": "transformers",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "attn_implementation": args.attn,
        "f32_mode": fp32_mode,
        "fixture_min_greedy_margin": ref["greedy"]["min_margin"],
        "prompts": {},
    }
    for cname in cases:
        f32 = logits[("f32", cname)]
        entry = {
            "positions": int(f32.shape[0]) if cname != "batch" else "last of each row",
            "f32_max_abs_logit": float(f32.abs().max()),
        }
        if cname == "batch":
            entry["f32_device_vs_cpu_reference_max_abs"] = float((f32 - ref_t["batch.last_logits"]).abs().max())
            entry["f32_greedy_equals_reference"] = bool(torch.equal(greedies[("f32", cname)], ref_t["batch.greedy"]))
        else:
            entry["f32_device_vs_cpu_reference_max_abs"] = float((f32 - ref_t[f"logits.{cname}"]).abs().max())
            entry["f32_greedy_equals_reference"] = bool(torch.equal(greedies[("f32", cname)][0], ref_t[f"greedy.{cname}"]))
        for dname in ("bf16", "f16"):
            half = logits[(dname, cname)]
            d = (half - f32).abs()
            agree = int((half.argmax(-1) == f32.argmax(-1)).sum())
            g_half, g_f32 = greedies[(dname, cname)], greedies[("f32", cname)]
            entry[dname] = {
                "finite": bool(torch.isfinite(half).all()),
                "max_abs_diff_vs_f32": float(d.max()),
                "max_abs_diff_vs_f32_last": float(d[-1].max()) if cname != "batch" else float(d.max()),
                "top1_agree": agree,
                "top1_total": int(f32.shape[0]),
                "greedy_prefix_vs_f32": [prefix_len(a, b) for a, b in zip(g_half, g_f32)],
            }
        report["prompts"][cname] = entry
    print(json.dumps(report, indent=2))
    worst = max(report["prompts"][c]["bf16"]["max_abs_diff_vs_f32"] for c in PROMPTS)
    print(f"worst BF16 max |diff| vs F32 over P1..P3: {worst:.4g}", file=sys.stderr)


if __name__ == "__main__":
    main()
