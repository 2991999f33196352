#!/usr/bin/env python3
"""Trains a LoRA student for tagllm's default model on teacher data (tag knowledge distillation).

    tagllm build-data --from-records datasets/distill/train --out target/sft    # token ids
    python scripts/distill.py --tokens target/sft/tokens.jsonl --out models/smollm2/student

The base is the default GGUF itself (models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf), dequantized
into a transformers LlamaForCausalLM (q/k rows un-permuted from llama.cpp's rope layout), so the
adapter is trained against the very weights the server merges it into. --gguf takes another base:
its `general.architecture` picks the transformers model (llama or qwen2, see ARCHS). The prompt and
completion ids come from `tagllm build-data`: the server's own prompt and chat template, tokenized
by the server's tokenizer, and the answer in the tag grammar's layout followed by <|im_end|>. The
loss is taken on the completion only. --aux-tokens adds a second tokens file (tokens_cot.jsonl: the
teacher's rationale, then the answer) as extra training examples; the held-out loss stays on
--eval-tokens. Token files may be gzip-compressed (.jsonl.gz). The adapter is saved in PEFT's
format (adapter_config.json + adapter_model.safetensors); `tagllm serve --adapter DIR` merges it at
load.

Reproducibility: fixed seeds and a fixed example order; torch's deterministic algorithms are asked
for (warn-only). On a GPU, bf16 autocast and atomics still make runs differ slightly: three H100
runs gave weights within 3.8% relative L2 per matrix and final losses 0.7595-0.7605. Before
training, the dequantized base is checked against the llama.cpp logits fixture whose model_sha256
is the GGUF's (tests/fixtures/llamacpp_logits.json or tests/fixtures/*/llamacpp_logits.json;
--no-check-logits skips it).
Needs torch, transformers, peft, gguf (scripts/distill-requirements.txt). Runs on CUDA or CPU.
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import pathlib
import random
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts/gpu"))
from xfer import sha256_file  # noqa: E402  (standard library only; the GPU kit's file checks)
DEFAULT_GGUF = ROOT / "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# GGUF tensor name -> transformers module, per block.
BLOCK_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# What differs between the architectures (`general.architecture`; metadata keys are prefixed with
# it). llama.cpp's converter permutes q/k rows for its rope in llama GGUFs only; qwen2 has q/k/v
# biases (blk.N.attn_{q,k,v}.bias).
ARCHS = {
    "llama": {"config": LlamaConfig, "model": LlamaForCausalLM, "permuted_qk": True, "qkv_bias": False},
    "qwen2": {"config": Qwen2Config, "model": Qwen2ForCausalLM, "permuted_qk": False, "qkv_bias": True},
}


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per head for its rope; transformers halves them."""
    out, inp = w.shape
    return w.reshape(heads, out // heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load_gguf(path: pathlib.Path, dtype=torch.float32):
    """The GGUF's weights, dequantized, in the transformers model of its architecture."""
    r = gguf.GGUFReader(str(path))
    arch_name = r.fields["general.architecture"].contents()
    if arch_name not in ARCHS:
        sys.exit(f"{path}: architecture {arch_name!r} is not supported (only {', '.join(ARCHS)})")
    arch = ARCHS[arch_name]
    meta = {k: v.contents() for k, v in r.fields.items() if k.startswith((arch_name + ".", "tokenizer.ggml."))}
    f = {k[len(arch_name) + 1 :]: v for k, v in meta.items() if k.startswith(arch_name + ".")}
    heads, kv = f["attention.head_count"], f["attention.head_count_kv"]
    tensors = {t.name: t for t in r.tensors}
    vocab = tensors["token_embd.weight"].shape[1]
    cfg = arch["config"](
        vocab_size=int(vocab),
        hidden_size=f["embedding_length"],
        intermediate_size=f["feed_forward_length"],
        num_hidden_layers=f["block_count"],
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=f["context_length"],
        rms_norm_eps=f["attention.layer_norm_rms_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": float(f.get("rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)),
    )
    model = arch["model"](cfg)

    def deq(name):
        t = tensors[name]
        return np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    sd = {"model.embed_tokens.weight": deq("token_embd.weight"), "model.norm.weight": deq("output_norm.weight")}
    if "output.weight" in tensors:
        sd["lm_head.weight"] = deq("output.weight")
    for i in range(cfg.num_hidden_layers):
        for g, hf in BLOCK_MAP.items():
            w = deq(f"blk.{i}.{g}.weight")
            if arch["permuted_qk"] and g == "attn_q":
                w = unpermute(w, heads)
            elif arch["permuted_qk"] and g == "attn_k":
                w = unpermute(w, kv)
            sd[f"model.layers.{i}.{hf}.weight"] = w
            if arch["qkv_bias"] and g in ("attn_q", "attn_k", "attn_v"):
                sd[f"model.layers.{i}.{hf}.bias"] = deq(f"blk.{i}.{g}.bias")
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        sys.exit(f"GGUF -> transformers mapping broke: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval(), arch_name


def logits_fixture(sha: str):
    """The llama.cpp logits fixture made with this GGUF (by model_sha256), or None."""
    fixtures = ROOT / "tests/fixtures"
    for p in [fixtures / "llamacpp_logits.json", *sorted(fixtures.glob("*/llamacpp_logits.json"))]:
        if p.is_file():
            fx = json.loads(p.read_text())
            if fx.get("model_sha256") == sha:
                return p, fx
    return None


def check_logits(model, device, fx) -> float:
    """Worst top-64 |logit difference| against llama.cpp on the fixture's prompts."""
    worst = 0.0
    for case in fx["cases"]:
        ids = torch.tensor([case["prompt_ids"]], device=device)
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float().cpu()
        idx = torch.tensor(case["top_ids"])
        worst = max(worst, (logits[idx] - torch.tensor(case["top_logits"])).abs().max().item())
    return worst


def batches(examples, batch_size, rng):
    """Length-bucketed batches in a seeded order: little padding, same order on every run."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    return chunks


def collate(examples, idx, device):
    rows = [examples[i][0] + examples[i][1] for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, i in enumerate(idx):
        p, c = examples[i]
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        labels[b, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[b, : len(p) + len(c)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def loss_of(model, ids, labels, mask, autocast):
    with torch.autocast(device_type=ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    ), (target != -100).sum()


def read_tokens(path):
    """(prompt_ids, completion_ids) of a tokens.jsonl file, gzip-compressed or not."""
    raw = pathlib.Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    out = []
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out.append((d["prompt_ids"], d["completion_ids"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", required=True, help="tokens.jsonl from `tagllm build-data` (or .jsonl.gz)")
    ap.add_argument("--eval-tokens", help="held-out tokens.jsonl: completion loss before and after")
    ap.add_argument(
        "--aux-tokens",
        help="extra training examples, e.g. tokens_cot.jsonl (rationale, then the answer); not in the held-out loss",
    )
    ap.add_argument("--gguf", default=str(DEFAULT_GGUF))
    ap.add_argument("--out", required=True, help="adapter directory (PEFT format)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument(
        "--limit", type=int, default=0, help="train on the first N examples (and N aux examples) only (smoke test)"
    )
    ap.add_argument("--max-steps", type=int, default=0, help="stop after N steps (smoke test)")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=0,
        help="stop training after this many seconds (0: no limit); the adapter is saved, the summary says so",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-check-logits", action="store_true")
    ap.add_argument("--save-dtype", choices=["f16", "f32"], default="f16", help="adapter weights on disk")
    args = ap.parse_args()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device(args.device)
    autocast = device.type == "cuda"

    t0 = time.time()
    model, arch = load_gguf(pathlib.Path(args.gguf))
    model = model.to(device)
    gguf_sha = sha256_file(args.gguf)
    found = None if args.no_check_logits else logits_fixture(gguf_sha)
    if args.no_check_logits:
        pass
    elif found is None:
        print(f"no llama.cpp logits fixture for this GGUF (sha256 {gguf_sha}): the dequantized base is not checked")
    else:
        worst = check_logits(model, device, found[1])
        name = found[0].relative_to(ROOT)
        print(f"base vs llama.cpp logits fixture {name}: worst top-64 |diff| {worst:.3f}", flush=True)
        if worst > 1.5:
            sys.exit("the dequantized base does not match llama.cpp: refusing to train on it")
    train = read_tokens(args.tokens)
    if args.limit:
        train = train[: args.limit]
    aux = read_tokens(args.aux_tokens) if args.aux_tokens else []
    if args.limit:
        aux = aux[: args.limit]
    n_main, train = len(train), train + aux
    held = read_tokens(args.eval_tokens) if args.eval_tokens else []

    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()

    def eval_loss():
        if not held:
            return None
        model.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            for idx in [list(range(i, min(i + args.batch, len(held)))) for i in range(0, len(held), args.batch)]:
                l, k = loss_of(model, *collate(held, idx, device), autocast)
                tot, n = tot + l.item(), n + k.item()
        model.train()
        return tot / max(n, 1)

    before = eval_loss()
    rng = random.Random(args.seed)
    steps_per_epoch = math.ceil(len(train) / args.batch)
    total = max(1, round(steps_per_epoch * args.epochs))
    if args.max_steps:
        total = min(total, args.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    log, step, tokens, t_train, stopped = [], 0, 0, time.time(), None
    while step < total and stopped is None:
        for idx in batches(train, args.batch, rng):
            ids, labels, mask = collate(train, idx, device)
            loss_sum, n = loss_of(model, ids, labels, mask, autocast)
            loss = loss_sum / n
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
            step += 1
            log.append({"step": step, "loss": round(loss.item(), 5), "lr": sched.get_last_lr()[0]})
            if step % 10 == 0 or step == total:
                print(f"step {step}/{total} loss {loss.item():.4f}", flush=True)
            if step >= total:
                break
            if args.max_seconds and time.time() - t_train > args.max_seconds:
                stopped = f"--max-seconds {args.max_seconds:g}: stopped after step {step} of {total}"
                print(stopped, flush=True)
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t_train
    after = eval_loss()
    out = pathlib.Path(args.out)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    if args.save_dtype == "f16":
        from safetensors.torch import load_file, save_file

        f = out / "adapter_model.safetensors"
        save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    digest = hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()
    summary = {
        "examples": n_main,
        "steps": step,
        "epochs": args.epochs,
        "batch": args.batch,
        "rank": args.rank,
        "alpha": args.alpha,
        "lr": args.lr,
        "seed": args.seed,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "train_seconds": round(train_s, 2),
        "tokens_per_second": round(tokens / train_s, 1),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "adapter_sha256": digest,
        "total_seconds": round(time.time() - t0, 2),
        "architecture": arch,
        "gguf": pathlib.Path(args.gguf).name,
        "gguf_sha256": gguf_sha,
    }
    if args.aux_tokens:
        summary["aux_examples"] = len(aux)
    if stopped:
        summary["stopped_early"] = stopped
    (out / "training.json").write_text(json.dumps({"summary": summary, "log": log}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
