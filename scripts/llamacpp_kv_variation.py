#!/usr/bin/env python3
"""How much llama.cpp differs from itself when only its KV-cache type changes (F32 vs the default
F16), on the prompts of tests/fixtures/llamacpp_logits.json. This is the yardstick for the
tolerance of tests/it/model.rs::logits_match_llama_cpp: tagllm may differ from llama.cpp by about
as much as llama.cpp differs from itself.

    target/test-venv/bin/python scripts/llamacpp_kv_variation.py   # venv: scripts/test-deps.sh
    target/test-venv/bin/python scripts/llamacpp_kv_variation.py \
        --fixtures tests/fixtures/qwen2 --model models/qwen2/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf

Measured 2026-11-25 (llama-cpp-python 0.3.16): centred max |diff| over the top-64 logits
0.21-0.48 per prompt, and the argmax flipped on one prompt (zh_travel, llama.cpp margin 0.144).
"""
import argparse
import json
import numpy as np
import llama_cpp
from llama_cpp import Llama
ap = argparse.ArgumentParser()
ap.add_argument("--fixtures", default="tests/fixtures")
ap.add_argument("--model", default="models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
args = ap.parse_args()
fx = json.load(open(f"{args.fixtures}/llamacpp_logits.json"))
def run(type_kv):
    llm = Llama(model_path=args.model, n_ctx=2048, n_threads=2, verbose=False, type_k=type_kv, type_v=type_kv)
    out = {}
    for c in fx["cases"]:
        llm.reset(); llm.eval(c["prompt_ids"])
        p = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        out[c["name"]] = np.ctypeslib.as_array(p, shape=(llm.n_vocab(),)).astype(np.float64).copy()
    return out
f32 = run(0)  # GGML_TYPE_F32
for c in fx["cases"]:
    l = f32[c["name"]]; ids = c["top_ids"]; top = np.array(c["top_logits"])
    shift = l.mean() - c["logit_mean"]
    print(c["name"], "shift %.3f centred max %.4f argmax %d vs %d" % (shift, np.abs(l[ids] - shift - top).max(), l.argmax(), ids[0]))
