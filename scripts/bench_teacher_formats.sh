#!/usr/bin/env bash
# How many notes a teacher answers usably, per response format: llama-cpp-python's
# OpenAI-compatible server runs a local GGUF as the teacher, and `tagllm build-data` asks it the
# three steps for each note once per format. Prints, per format, the notes extracted and the
# failures by kind (the run's own summary). Outputs land in target/bench/teacher-formats/.
#
# Usage: scripts/bench_teacher_formats.sh NOTES.jsonl [MODEL.gguf]
#   NOTES: build-data's input (teacher records work too: their extra fields are ignored).
#   MODEL: default the default model (models/fetch_default_model.sh).
# Env: PYTHON (a Python with llama-cpp-python[server]; default target/test-venv/bin/python, made
#   by scripts/test-deps.sh), FORMATS (default "json_object json_schema"), LIMIT (notes, default
#   20), MAX_TOKENS (per step, default 256,1024,512), CTX (default 4096), TAGLLM (the binary;
#   default target/debug/tagllm, built if missing), TAGLLM_BEFORE (a second binary, e.g. an older
#   commit's, run once with its own default format and reported as "before").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

notes="${1:?usage: scripts/bench_teacher_formats.sh NOTES.jsonl [MODEL.gguf]}"
model="${2:-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
python="${PYTHON:-target/test-venv/bin/python}"
formats="${FORMATS:-json_object json_schema}"
limit="${LIMIT:-20}"
max_tokens="${MAX_TOKENS:-256,1024,512}"
tagllm="${TAGLLM:-target/debug/tagllm}"
out="target/bench/teacher-formats"

[ -x "$python" ] || { echo "$python is missing: run scripts/test-deps.sh, or set PYTHON" >&2; exit 1; }
[ -f "$model" ] || { echo "$model is missing (models/fetch_default_model.sh fetches the default)" >&2; exit 1; }
[ -x "$tagllm" ] || cargo build --bin tagllm
mkdir -p "$out"

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$python" -m llama_cpp.server --model "$model" --host 127.0.0.1 --port "$port" \
  --n_ctx "${CTX:-4096}" --n_threads "$(nproc)" --verbose false > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
trap 'exit 1' INT TERM
for _ in $(seq 600); do
  "$python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/v1/models')" \
    2> /dev/null && break
  kill -0 $server 2>/dev/null || { cat "$out/server.log" >&2; exit 1; }
  sleep 0.5
done

run() { # NAME BINARY [ARGS...]
  local name="$1" bin="$2"; shift 2
  rm -rf "${out:?}/$name"
  local start=$SECONDS
  "$bin" build-data --notes "$notes" --out "$out/$name" --teacher-url "http://127.0.0.1:$port/v1" \
    --teacher-model "$(basename "$model")" --concurrency 1 --limit "$limit" \
    --max-tokens "$max_tokens" --quiet --adapter none "$@" > "$out/$name.log" 2>&1 || true
  echo "## $name ($((SECONDS - start)) s)"
  grep -A20 ' extracted, ' "$out/$name.log" | grep -v '^failed notes' || tail -5 "$out/$name.log"
}

echo "teacher: $model; notes: $notes (first $limit); max tokens $max_tokens"
if [ -n "${TAGLLM_BEFORE:-}" ]; then
  run before "$TAGLLM_BEFORE"
fi
for f in $formats; do
  run "$f" "$tagllm" --response-format "$f"
done
