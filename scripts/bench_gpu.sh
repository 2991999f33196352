#!/usr/bin/env bash
# Issue 9's benchmark: our server against Hugging Face transformers' batched `generate` on the
# same GPU in the same call. A Qwen3-VL-2B or -4B shaped checkpoint with random weights (real
# configs, no download), notes of text plus one 448x448 image, 64 generated tokens (unconstrained,
# so both sides generate exactly 64 with random weights), many concurrent TagNote calls through
# the real server (benches/load.rs), then the peer on the very prompts the server ran
# (scripts/bench_gpu_hf.py checks the token counts match). Prints notes/s, tokens/s, p50/p99,
# peak GPU memory, our GPU idle share, and the fraction of the compute floor reached.
#
# On the GPU machine, from the repository root (it has torch + transformers, no network):
#   scripts/bench_gpu.sh 4b [CONCURRENCY=64] [NOTES=256]
# Build the load generator here first and carry it (the machine has no toolchain needs beyond it):
#   eval "$(scripts/cuda-toolkit.sh)" && cargo bench --no-run --bench load --features cuda
#   LOAD_BIN=$(ls -t target/release/deps/load-* | grep -v '\.d$' | head -1)
# Env: LOAD_BIN (that binary), PY (python3), DEVICE (cuda:0; `cpu` runs the same script on the
# CPU), DTYPE (bf16 on cuda, f32 on cpu), CKPT_ROOT (target/bench), TEXT_LAYERS / VISION_DEPTH
# (override the real depths, for CPU runs), PEAK_TFLOPS (800, the bf16 rate measured on an H100).
set -euo pipefail
shape="${1:?usage: scripts/bench_gpu.sh 2b|4b [CONCURRENCY] [NOTES]}"
conc="${2:-64}"
notes="${3:-256}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-python3}"
DEVICE="${DEVICE:-cuda:0}"
if [ "$DEVICE" = cpu ]; then DTYPE="${DTYPE:-f32}"; hf_device=cpu; else DTYPE="${DTYPE:-bf16}"; hf_device=cuda; fi
out="target/bench/gpu-$shape"
ckpt="${CKPT_ROOT:-target/bench}/qwen3vl-$shape${TEXT_LAYERS:+-t$TEXT_LAYERS}${VISION_DEPTH:+-v$VISION_DEPTH}"
mkdir -p "$out"
LOAD_BIN="${LOAD_BIN:-$(ls -t target/release/deps/load-* 2>/dev/null | grep -v '\.d$' | head -1)}"
[ -x "$LOAD_BIN" ] || { echo "no load generator: build it (see the header) or set LOAD_BIN" >&2; exit 2; }
"$PY" -c 'import PIL, torch, torchvision, transformers' 2>/dev/null ||
  { echo "$PY lacks torch/transformers: set PY (scripts/qwen3vl-requirements.txt)" >&2; exit 2; }

if [ ! -f "$ckpt/config.json" ]; then
  "$PY" scripts/qwen3vl_shapes.py --shape "$shape" --out "$ckpt" --dtype "$DTYPE" \
    --device "$hf_device" ${TEXT_LAYERS:+--text-layers "$TEXT_LAYERS"} ${VISION_DEPTH:+--vision-depth "$VISION_DEPTH"}
fi

smi() {  # samples GPU utilisation and memory every 100 ms into $1 until killed
  if command -v nvidia-smi >/dev/null && [ "$hf_device" = cuda ]; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 100 > "$1" &
    echo $!
  else
    echo 0
  fi
}
stop() { [ "$1" != 0 ] && kill "$1" 2>/dev/null || true; }

s=$(smi "$out/smi-ours.csv")
"$LOAD_BIN" --model "$ckpt" --device "$DEVICE" --dtype "$DTYPE" --image synth:448 --decoding unconstrained \
  --max-new-tokens 64 --max-batch "$conc" --concurrency "1,$conc" --requests "$notes" --notes 12 --out "$out" \
  | tee "$out/ours.txt"
stop "$s"
s=$(smi "$out/smi-hf.csv")
"$PY" scripts/bench_gpu_hf.py --prompts "$out/vl-prompts.json" --batch "$conc" --notes "$notes" \
  --new-tokens 64 --device "$hf_device" --dtype "$DTYPE" > "$out/hf.json"
stop "$s"

"$PY" - "$out" "$ckpt" "$conc" "${PEAK_TFLOPS:-800}" <<'PYEOF'
import csv, datetime, json, os, sys
out, ckpt, conc, peak = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ours = json.load(open(f"{out}/load-{conc}.json"))
one = json.load(open(f"{out}/load-1.json"))
hf = json.load(open(f"{out}/hf.json"))
prompts = json.load(open(f"{out}/vl-prompts.json"))["prompts"]
params = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
params /= 2 if hf["dtype"] == "bf16" else 4
mean_prompt = sum(p["prompt_tokens"] for p in prompts) / len(prompts)
floor = peak * 1e12 / (2 * params * mean_prompt)

def smi(path, t0=None, t1=None):
    rows = []
    try:
        for r in csv.reader(open(path)):
            ts = datetime.datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            if (t0 is None or ts >= t0) and (t1 is None or ts <= t1):
                rows.append((float(r[1]), float(r[2])))
    except (FileNotFoundError, IndexError, ValueError):
        pass
    return rows

ours_smi = smi(f"{out}/smi-ours.csv", ours["t_start_unix"], ours["t_end_unix"])
idle = 1 - sum(u for u, _ in ours_smi) / 100 / len(ours_smi) if ours_smi else float("nan")
ours_mem = max((m for _, m in smi(f"{out}/smi-ours.csv")), default=float("nan"))
hf_nps = hf["notes_per_s"]
print(f"\ncheckpoint {ckpt}: {params/1e9:.2f}B parameters; mean prompt {mean_prompt:.0f} tokens; "
      f"compute floor at {peak:.0f} TFLOP/s: {floor:.1f} notes/s")
print("| Engine | Clients/batch | Notes/s | Generated tok/s | p50 s | p99 s | Peak GPU MiB | GPU idle |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
print(f"| tagllm | 1 | {one['notes_per_s']:.2f} | {one['generated_tok_s']:.0f} | "
      f"{one['latency_ms']['p50']/1e3:.2f} | {one['latency_ms']['p99']/1e3:.2f} | | |")
print(f"| tagllm | {conc} | {ours['notes_per_s']:.2f} | {ours['generated_tok_s']:.0f} | "
      f"{ours['latency_ms']['p50']/1e3:.2f} | {ours['latency_ms']['p99']/1e3:.2f} | {ours_mem:.0f} | {idle:.1%} |")
lat = hf["latency_batch_s"]  # a note's latency: its batch's wall time (closest to ours)
mem = hf.get("peak_gpu_mem_bytes")
print(f"| transformers | {conc} | {hf_nps:.2f} | {hf['gen_tok_s']:.0f} | "
      f"{lat['p50']:.2f} | {lat['p99']:.2f} | "
      f"{(mem or float('nan')) / 2**20:.0f} | |")
print(f"ratio notes/s: {ours['notes_per_s'] / hf_nps:.2f}x transformers; "
      f"{ours['notes_per_s'] / floor:.1%} of the compute floor")
PYEOF
