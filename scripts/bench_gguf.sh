#!/usr/bin/env bash
# A GGUF base's generation speed against llama.cpp (default: the default model; GGUF=path for
# another, e.g. GGUF=models/qwen2/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf), in one run: our batched llama decoder
# (benches/qwen3vl.rs, GGUF mode: re-quantized to Q8_0 as the server does) and llama.cpp
# (llama-cpp-python, scripts/bench_llamacpp.py) on the same GGUF file and the same prompt ids,
# PROMPT tokens (290), NEW tokens (64), THREADS threads (2), RUNS timed runs (6). Then our
# aggregate decode at batch 4 and 16 (what the engine does with concurrent notes).
#   LLAMA_PYTHON=/path/to/venv/bin/python scripts/bench_gguf.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${LLAMA_PYTHON:-python3}
PROMPT=${PROMPT:-290}
NEW=${NEW:-64}
THREADS=${THREADS:-2}
RUNS=${RUNS:-6}
GGUF=${GGUF:-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
"$PY" -c 'import llama_cpp' 2>/dev/null ||
  { echo "$PY has no llama_cpp: set LLAMA_PYTHON (scripts/test-deps.sh makes target/test-venv)" >&2; exit 2; }
mkdir -p target/bench
case "$GGUF" in
  models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) ./models/fetch_default_model.sh >/dev/null ;;
  models/qwen2/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf) ./models/fetch_model.sh qwen2.5-coder-0.5b >/dev/null ;;
esac
[ -f "$GGUF" ] || { echo "no $GGUF" >&2; exit 2; }
cargo build --release --bench qwen3vl --quiet
BIN=$(ls -t target/release/deps/qwen3vl-* | grep -v '\.d$' | head -1)
for b in 1 4 16; do
  RAYON_NUM_THREADS=$THREADS "$BIN" --model "$GGUF" --prompt-tokens "$PROMPT" --new-tokens "$NEW" \
    --runs "$RUNS" --batch "$b" > "target/bench/gguf-ours-$b.json"
  [ "$b" = 1 ] && "$PY" scripts/bench_llamacpp.py --model "$GGUF" --threads "$THREADS" \
    --prompts target/bench/gguf-prompts.json > target/bench/gguf-llamacpp.txt
done
python3 - <<'PYEOF'
import json, re
peer = open("target/bench/gguf-llamacpp.txt").read()
m = re.search(r"all: prefill ([\d.]+) tok/s, decode ([\d.]+) tok/s", peer)
lp, ld = float(m.group(1)), float(m.group(2))
print(peer.splitlines()[0])
for b in (1, 4, 16):
    r = json.load(open(f"target/bench/gguf-ours-{b}.json"))
    p, d = r["prefill_tok_s"], r["decode_tok_s"]
    print(f"tagllm batch {b:2}: prefill {p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) tok/s = {p['median']/lp:.2f}x, "
          f"decode {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) tok/s = {d['median']/ld:.2f}x llama.cpp")
print(f"llama.cpp  batch  1: prefill {lp:.1f} tok/s, decode {ld:.1f} tok/s")
PYEOF
