#!/usr/bin/env bash
# Prepares, HERE, everything the GPU machine needs to train every candidate student in one call
# (scripts/gpu/README.md): run on a checkout after `cargo build --release`. Idempotent.
#
#   scripts/gpu/prepare.sh                  # both bases, qwen2 first
#   BASES=qwen2 scripts/gpu/prepare.sh      # qwen2 only: 2 transfer calls fewer
#
# (a) the gguf wheel (version pinned in scripts/distill-requirements.txt) into .whl/;
# (b) each base GGUF (models/fetch_model.sh fetches it when missing) in parts of at most CHUNK_MIB
#     under .xfer/weights/ (<base>.part00, <base>.part01, ...) and .xfer/weights/MANIFEST (name,
#     size and sha256 of each whole file and of each part);
# (c) the SFT token files of every (base, prompt style) pair, gzipped, in
#     .xfer/sft/<base>-<style>/{train,eval}/ (tokens.jsonl.gz, sft.json, and in train/ also
#     tokens_cot.jsonl.gz: the rationale then the answer, for --aux-tokens);
# (d) the transfer plan: which paths each device call carries, under 64 MiB per call with the
#     working tree, printed and written to .xfer/PLAN.txt (and .xfer/plan.json).
#
# Env: BASES (default "qwen2 smollm2", in priority order), STYLES (default "full compact"),
# CHUNK_MIB (46), LIMIT_MIB (64: what one call may carry, working tree included), MARGIN_MIB (2:
# room for the tree to grow before the calls), TAGLLM (target/release/tagllm), PYTHON (python3).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
BASES="${BASES:-qwen2 smollm2}"
STYLES="${STYLES:-full compact}"
CHUNK_MIB="${CHUNK_MIB:-46}"
LIMIT_MIB="${LIMIT_MIB:-64}"
MARGIN_MIB="${MARGIN_MIB:-2}"
TAGLLM="${TAGLLM:-target/release/tagllm}"
PYTHON="${PYTHON:-python3}"

# base (models/<base>/, plan.tsv's base column) -> models/fetch_model.sh's name
fetch_name() {
  case "$1" in
    smollm2) echo smollm2-135m ;;
    qwen2) echo qwen2.5-coder-0.5b ;;
    gemma3) echo gemma3-270m ;;
    *) echo "unknown base $1 (smollm2, qwen2, gemma3)" >&2; return 2 ;;
  esac
}

[ -x "$TAGLLM" ] || { echo "$TAGLLM is missing: cargo build --release first" >&2; exit 1; }

# (a) the gguf wheel: pure Python; numpy, pyyaml, requests and tqdm are there already.
ver="$(sed -n 's/^gguf==\([^ ;#]*\).*/\1/p' scripts/distill-requirements.txt)"
[ -n "$ver" ] || { echo "no gguf== pin in scripts/distill-requirements.txt" >&2; exit 1; }
mkdir -p .whl
if ! ls ".whl/gguf-$ver-"*.whl >/dev/null 2>&1; then
  rm -f .whl/gguf-*.whl
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .whl "gguf==$ver"
fi
ls ".whl/gguf-$ver-"*.whl >/dev/null
echo "wheel: $(ls .whl)"

# (b) the weights in parts
mkdir -p .xfer/weights .xfer/sft
declare -A gguf_of
pairs=()
for base in $BASES; do
  path="$(models/fetch_model.sh --path "$(fetch_name "$base")")"
  [ -f "$path" ] || models/fetch_model.sh "$(fetch_name "$base")"
  if ! git check-ignore -q "$path"; then
    echo "$path is not ignored by git: it would travel with every device call (add it to .gitignore)" >&2
    exit 1
  fi
  gguf_of[$base]="$path"
  pairs+=("$base=$path")
done
"$PYTHON" scripts/gpu/xfer.py split --chunk-mib "$CHUNK_MIB" --dir .xfer/weights "${pairs[@]}"

# (c) the SFT token files: build-data writes tokens.jsonl and tokens_cot.jsonl (and sft.json,
# whose "prompt" must be the style asked for); the messages files stay here.
has_prompt=0
"$TAGLLM" build-data --help | grep -q -- --prompt && has_prompt=1
keep=()
for base in $BASES; do
  for style in $STYLES; do
    dir=".xfer/sft/$base-$style"
    if [ "$has_prompt" = 0 ] && [ "$style" != full ]; then
      echo "SKIP $dir: this tagllm has no build-data --prompt (only the full prompt)"
      rm -rf "$dir"
      continue
    fi
    flag=()
    [ "$has_prompt" = 1 ] && flag=(--prompt "$style")
    rm -rf "$dir.tmp"
    for split in train eval; do
      "$TAGLLM" build-data --from-records "datasets/distill/$split" --out "$dir.tmp/$split" \
        --model "${gguf_of[$base]}" --adapter none "${flag[@]}" >"$dir.tmp.log" 2>&1 ||
        { cat "$dir.tmp.log" >&2; echo "build-data failed for $dir/$split" >&2; exit 1; }
      tail -n 1 "$dir.tmp.log"
      got="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("prompt","full"))' \
        "$dir.tmp/$split/sft.json" 2>/dev/null || echo full)"
      [ "$got" = "$style" ] || { echo "$dir/$split: build-data wrote the $got prompt, not $style" >&2; exit 1; }
      rm -f "$dir.tmp/$split"/messages*.jsonl
      # the held-out loss is on eval/tokens.jsonl only
      [ "$split" = eval ] && rm -f "$dir.tmp/$split/tokens_cot.jsonl"
      gzip -9 -n -f "$dir.tmp/$split"/tokens*.jsonl
    done
    rm -f "$dir.tmp.log"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
    keep+=("$base-$style")
  done
done
# SFT folders of bases or styles no longer asked for are dropped (they would be carried).
for d in .xfer/sft/*/; do
  [ -d "$d" ] || continue
  n="$(basename "$d")"
  [[ " ${keep[*]} " == *" $n "* ]] || { echo "removing stale $d"; rm -rf "$d"; }
done
du -sb .xfer/sft/* | awk '{printf "%s %.2f MiB\n", $2, $1 / 1048576}'

# (d) the plan
"$PYTHON" scripts/gpu/xfer.py plan --limit-mib "$LIMIT_MIB" --margin-mib "$MARGIN_MIB" | tee .xfer/PLAN.txt
