#!/usr/bin/env bash
# Our Qwen3-VL against Hugging Face transformers on the CPU, same checkpoint, same prompt lengths,
# same thread count, in one run: prefill and decode tokens/s and their ratios.
#
#   HF_PYTHON=/path/to/venv/bin/python scripts/bench_qwen3vl.sh [CHECKPOINT_DIR]
#
# HF_PYTHON: a Python with scripts/qwen3vl-requirements.txt installed (default: python3).
# CHECKPOINT_DIR (default target/bench/qwen3vl-2bw): a Qwen3-VL-2B-width checkpoint with 4 text and
# 4 vision layers and random weights, written by scripts/bench_qwen3vl_hf.py on the first run
# (~2.7 GB). Two cases: 290 text tokens, and tests/fixtures/qwen3vl/images/e.png (400x300 -> 384x288,
# 108 image tokens) plus text to 290 tokens; 64 new tokens; RUNS timed runs (default 6) after a
# warm-up; THREADS threads (default 2). Results land in target/bench/qwen3vl-*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${HF_PYTHON:-python3}
DIR=${1:-target/bench/qwen3vl-2bw}
RUNS=${RUNS:-6}
THREADS=${THREADS:-2}
OUT=target/bench
"$PY" -c 'import PIL, torch, torchvision, transformers' 2>/dev/null ||
  { echo "$PY lacks torch/transformers: set HF_PYTHON (scripts/qwen3vl-requirements.txt)" >&2; exit 2; }
mkdir -p "$OUT"
if [ ! -f "$DIR/config.json" ]; then
  "$PY" scripts/bench_qwen3vl_hf.py --write-checkpoint "$DIR" --runs 1 --new-tokens 2 >/dev/null
fi
cargo build --release --bench qwen3vl
BIN=$(ls -t target/release/deps/qwen3vl-* | grep -v '\.d$' | head -1)
IMG=tests/fixtures/qwen3vl/images/e.png
for case in text image; do
  extra=()
  [ "$case" = image ] && extra=(--image "$IMG")
  RAYON_NUM_THREADS=$THREADS "$BIN" --model "$DIR" --runs "$RUNS" --prompt-tokens 290 --new-tokens 64 \
    "${extra[@]}" > "$OUT/qwen3vl-ours-$case.json"
  "$PY" scripts/bench_qwen3vl_hf.py --threads "$THREADS" --runs "$RUNS" --prompt-tokens 290 --new-tokens 64 \
    "${extra[@]}" > "$OUT/qwen3vl-hf-$case.json"
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
print(f"{'case':6} {'':12} {'prefill tok/s (min-max)':>28} {'decode tok/s (min-max)':>26}")
for case in ("text", "image"):
    ours = json.load(open(f"{out}/qwen3vl-ours-{case}.json"))
    hf = json.load(open(f"{out}/qwen3vl-hf-{case}.json"))
    for name, r in (("tagllm", ours), ("transformers", hf)):
        p, d = r["prefill_tok_s"], r["decode_tok_s"]
        print(f"{case:6} {name:12} {p['median']:10.1f} ({p['min']:.1f}-{p['max']:.1f}) "
              f"{d['median']:10.2f} ({d['min']:.2f}-{d['max']:.2f})   prompt {r['prompt_tokens']}")
    print(f"{case:6} {'ratio':12} {ours['prefill_tok_s']['median'] / hf['prefill_tok_s']['median']:10.2f}x"
          f"{'':18}{ours['decode_tok_s']['median'] / hf['decode_tok_s']['median']:10.2f}x")
PYEOF
