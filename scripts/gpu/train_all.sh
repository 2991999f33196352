#!/usr/bin/env bash
# THERE, the last device call: installs the carried gguf wheel, assembles each base from its parts
# (sha256 checked against .xfer/weights/MANIFEST; a base with parts missing is skipped, saying so),
# then trains the candidates of scripts/gpu/plan.tsv in priority order within BUDGET_S seconds
# (scripts/gpu/train_all.py): one $OUT/<name>.tar per adapter and $OUT/summary.json.
#
#   set -o pipefail; BUDGET_S=420 bash scripts/gpu/train_all.sh 2>&1 | tee $OUT/log
#
# Env: BUDGET_S (420: seconds for all of it, assembly included, from this script's start), PLAN
# (scripts/gpu/plan.tsv), OUT (gpu-out when unset), PY (python3), DEVICE (distill.py's default:
# cuda when there is one), SFT_ROOT (.xfer/sft), BASES_DIR (/tmp/tagllm-bases), MAX_TARS (6),
# TPS_<BASE> / FIXED_<BASE> (first-run guesses of tokens/s and fixed seconds, e.g. TPS_QWEN2).
set -uo pipefail
start="$(date +%s.%N)"
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
export PYTHONUNBUFFERED=1
PY="${PY:-python3}"
export OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
echo "[train_all] $(date -u +%FT%TZ) on $(hostname); budget ${BUDGET_S:-420} s; OUT=$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

if ! "$PY" -c "import gguf" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
      echo "[train_all] pip install of .whl/*.whl failed"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$PY" -c "import gguf" || { echo "[train_all] no gguf module: carry .whl (scripts/gpu/prepare.sh fetches it)"; exit 1; }
fi
"$PY" -c "from importlib.metadata import version as v; import torch
print('[train_all] gguf', v('gguf'), 'torch', v('torch'), 'transformers', v('transformers'), 'peft', v('peft'),
      'cuda', torch.cuda.is_available())"

bases_json="$(mktemp /tmp/tagllm-bases.XXXXXX.json)"
"$PY" scripts/gpu/xfer.py assemble --dest "${BASES_DIR:-/tmp/tagllm-bases}" --json "$bases_json" ||
  echo '{}' >"$bases_json"
exec "$PY" scripts/gpu/train_all.py --bases-json "$bases_json" --start "$start" --python "$PY"
