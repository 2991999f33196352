#!/usr/bin/env python3
"""Regenerate the llama.cpp reference fixtures under tests/fixtures/.

These fixtures pin what llama.cpp (the reference implementation) does with the default
GGUF model, so that tagllm's own tokenizer and forward pass can be tested against it
without llama.cpp being present at test time. Running this script REGENERATES (overwrites):

  tests/fixtures/tokenizer_llamacpp.json
      llama.cpp token ids for every string of tests/fixtures/tokenizer_corpus.json, in corpus
      order, from ``Llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)``
      (vocab-only load).
  tests/fixtures/llamacpp_logits.json
      For 6 ChatML prompts: the prompt ids (llama.cpp's own tokenizer, special=True), the
      64 highest next-token logits at the last prompt position, mean/std of the full logit
      vector, and 8 greedy (argmax) tokens fed back one at a time.
      Full model, n_ctx 2048, n_threads 2, CPU only, default (f16) KV cache.

The input corpus tests/fixtures/tokenizer_corpus.json is hand-curated and is NOT written here.

How to run (llama-cpp-python compiles llama.cpp from source on install, ~7+ minutes on
2 cores; keep the venv outside the repository):

    python3 -m venv /work/venvs/llamacpp
    CMAKE_ARGS="-DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        /work/venvs/llamacpp/bin/pip install llama-cpp-python==0.3.16 numpy
    /work/venvs/llamacpp/bin/python scripts/gen_llamacpp_fixtures.py

Pinned version: llama-cpp-python 0.3.16 (the version the committed fixtures were made with;
the script warns if another version is installed and records the version used).

Options: --model PATH (default models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf),
--fixtures DIR (default tests/fixtures), --system TEXT (the prompts' system message),
--skip-tokenizer, --skip-logits. The corpus is always tests/fixtures/tokenizer_corpus.json.

The other shipped bases (models/fetch_model.sh) have their fixtures in a folder each:

    python scripts/gen_llamacpp_fixtures.py --model models/qwen2/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf \
        --fixtures tests/fixtures/qwen2 --system "You are a helpful assistant."

Notes:
- In llama-cpp-python 0.3.x ``Llama.scores`` is not filled unless logits_all=True; this script
  reads the logits of the last evaluated position straight from the llama.cpp context with
  ``llama_cpp.llama_get_logits_ith(ctx, -1)``.
- logit_std is the population standard deviation (ddof=0) over the whole vocabulary, computed
  in float64 from llama.cpp's float32 logits. Floats are rounded to 5 decimals.
- Greedy ties break towards the lowest token id (numpy argmax / stable sort).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

import llama_cpp
from llama_cpp import Llama

PINNED_VERSION = "0.3.16"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FIXTURES = REPO_ROOT / "tests" / "fixtures"

N_CTX = 2048
N_THREADS = 2
TOP_K = 64
GREEDY_STEPS = 8

SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n{user}<|im_end|>\n"
    "<|im_start|>assistant\n"
)

LOGIT_PROMPTS = [
    ("en_capital", "What is the capital of France?"),
    ("en_explain", "Explain in two sentences why the sky is blue."),
    ("zh_greeting", "你好！请用一句话介绍一下你自己。"),
    ("zh_travel", "推荐三个适合秋天旅行的中国城市，并简单说明理由。"),
    (
        "mixed_note_json_tags",
        "Generate 5 tags for this note and answer only with JSON like {\"tags\": [\"...\"]}.\n"
        "标题：AJ1 芝加哥配色开箱｜真的太好看了！\n"
        "正文：终于抢到 Air Jordan 1 Retro High OG \"Chicago\"，¥1,299 入手，尺码偏大半码，"
        "上脚超舒服🔥 #sneakers #穿搭 #开箱",
    ),
    ("short_hi", "Hi"),
]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def r5(x: float) -> float:
    v = round(float(x), 5)
    if not math.isfinite(v):
        raise ValueError(f"non-finite value {x}")
    return v


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, ensure_ascii=False, indent=1)
    path.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {path} ({len(text.encode('utf-8'))} bytes)", file=sys.stderr)


def gen_tokenizer(model_path: Path, fixtures: Path, model_sha: str) -> None:
    corpus = json.loads((DEFAULT_FIXTURES / "tokenizer_corpus.json").read_text(encoding="utf-8"))
    assert isinstance(corpus, list) and all(isinstance(s, str) for s in corpus)
    llm = Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    cases = []
    for text in corpus:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        cases.append({"text": text, "ids": [int(i) for i in ids]})
    write_json(
        fixtures / "tokenizer_llamacpp.json",
        {
            "model_sha256": model_sha,
            "llama_cpp_python": llama_cpp.__version__,
            "add_bos": False,
            "special": True,
            "cases": cases,
        },
    )
    del llm


def last_logits(llm: Llama) -> np.ndarray:
    """Copy of the logits of the last evaluated position (float32, n_vocab)."""
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    if not ptr:
        raise RuntimeError("llama_get_logits_ith returned NULL")
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def gen_logits(model_path: Path, fixtures: Path, model_sha: str, system: str) -> None:
    llm = Llama(
        model_path=str(model_path),
        n_ctx=N_CTX,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        n_gpu_layers=0,
        logits_all=False,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    cases = []
    for name, user in LOGIT_PROMPTS:
        prompt = CHATML.format(system=system, user=user)
        prompt_ids = [int(t) for t in llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)]
        llm.reset()  # n_tokens = 0; eval() then clears the KV cache from position 0
        llm.eval(prompt_ids)
        logits = last_logits(llm)
        assert logits.shape == (n_vocab,) and np.all(np.isfinite(logits))
        # descending by logit, ties broken by lower id first
        order = np.lexsort((np.arange(n_vocab), -logits.astype(np.float64)))[:TOP_K]
        top_ids = [int(i) for i in order]
        top_logits = [r5(logits[i]) for i in order]
        lf = logits.astype(np.float64)
        greedy = []
        cur = logits
        for step in range(GREEDY_STEPS):
            tok = int(np.argmax(cur))
            greedy.append(tok)
            if step + 1 < GREEDY_STEPS:
                llm.eval([tok])
                cur = last_logits(llm)
        argmax_piece = llm.detokenize([top_ids[0]], special=True).decode("utf-8", errors="replace")
        greedy_text = llm.detokenize(greedy, special=True).decode("utf-8", errors="replace")
        print(
            f"[{name}] {len(prompt_ids)} prompt tokens; argmax {top_ids[0]} {argmax_piece!r} "
            f"({top_logits[0]}); greedy {greedy} {greedy_text!r}",
            file=sys.stderr,
        )
        cases.append(
            {
                "name": name,
                "user": user,
                "prompt_ids": prompt_ids,
                "top_ids": top_ids,
                "top_logits": top_logits,
                "logit_mean": r5(lf.mean()),
                "logit_std": r5(lf.std()),
                "greedy_ids": greedy,
            }
        )
    write_json(
        fixtures / "llamacpp_logits.json",
        {
            "model_sha256": model_sha,
            "llama_cpp_python": llama_cpp.__version__,
            "n_threads": N_THREADS,
            "n_ctx": N_CTX,
            "n_vocab": n_vocab,
            "kv_cache_type": "f16 (llama.cpp default)",
            "system_prompt": system,
            "chat_template": CHATML.replace("{system}", system),
            "cases": cases,
        },
    )
    del llm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    ap.add_argument("--system", default=SYSTEM_PROMPT, help="system message of the logit prompts")
    ap.add_argument("--skip-tokenizer", action="store_true")
    ap.add_argument("--skip-logits", action="store_true")
    args = ap.parse_args()

    if llama_cpp.__version__ != PINNED_VERSION:
        print(
            f"warning: llama-cpp-python {llama_cpp.__version__} installed, fixtures are pinned to "
            f"{PINNED_VERSION}; the version used is recorded in the output",
            file=sys.stderr,
        )
    args.fixtures.mkdir(parents=True, exist_ok=True)
    model_sha = sha256_file(args.model)
    print(f"model {args.model} sha256 {model_sha}", file=sys.stderr)
    if not args.skip_tokenizer:
        gen_tokenizer(args.model, args.fixtures, model_sha)
    if not args.skip_logits:
        gen_logits(args.model, args.fixtures, model_sha, args.system)
    return 0


if __name__ == "__main__":
    sys.exit(main())
