#!/usr/bin/env python3
"""The peer for tagllm's TagNote numbers: llama.cpp (llama-cpp-python) on the same GGUF file and
exactly the same prompt token ids, which `cargo bench --bench load` writes to
target/bench/prompts.json. For each prompt: prefill all prompt tokens in one eval, then greedy
decode up to max_new_tokens one token at a time (no stop tokens, so the decode work is fixed).

    cargo bench --bench load                  # writes target/bench/prompts.json
    /work/venvs/llamacpp/bin/python scripts/bench_llamacpp.py [--threads 2]

(venv: see scripts/gen_llamacpp_fixtures.py.)
"""
import argparse
import json
import pathlib
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--prompts", default=str(ROOT / "target/bench/prompts.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not pathlib.Path(args.prompts).is_file():
        ap.error(f"{args.prompts} not found: `cargo bench --bench load` writes it")
    spec = json.loads(pathlib.Path(args.prompts).read_text())
    max_new = spec["max_new_tokens"]
    llm = Llama(model_path=args.model, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=2048, verbose=False)
    n_vocab = llm.n_vocab()
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads, max_new_tokens {max_new}")
    print("| note | prompt tok | gen tok | prefill ms | decode ms | prefill tok/s | decode tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    tp = tg = sp = sd = 0.0
    for p in spec["prompts"]:
        ids = p["prompt_ids"]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(max_new):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        t2 = time.perf_counter()
        pf, dc = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        tp += len(ids); tg += max_new; sp += pf; sd += dc
        print(f"| {p['note_id']} | {len(ids)} | {max_new} | {pf:.0f} | {dc:.0f} | {len(ids) / pf * 1e3:.1f} | {max_new / dc * 1e3:.1f} |")
    print(f"all: prefill {tp / sp * 1e3:.1f} tok/s, decode {tg / sd * 1e3:.1f} tok/s")


if __name__ == "__main__":
    main()
