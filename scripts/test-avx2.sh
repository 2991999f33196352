#!/usr/bin/env bash
# The tests whose outcome could depend on the CPU, run as a CPU without AVX-512 runs them, on any
# machine: the shipped bases' llama.cpp parity and batching tests, and the prefix-cache test, on the AVX2
# kernels (TAGLLM_KERNELS=avx2), and `tagllm build-data` against llama-cpp-python's server built
# for AVX2 only (no AVX-512, no VNNI), in its own venv, target/test-venv-avx2 (made here by
# scripts/test-deps.sh with those flags; ~7 minutes the first time, kept afterwards).
# Usage: scripts/test-avx2.sh [extra test filters]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export TAGLLM_TEST_VENV="${TAGLLM_TEST_VENV_AVX2:-$PWD/target/test-venv-avx2}"
TAGLLM_LLAMA_CMAKE_ARGS="-DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF" \
  ./scripts/test-deps.sh

# Say what llama.cpp was built for, so a log shows it.
"$TAGLLM_TEST_VENV/bin/python" - <<'PY'
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
print("llama.cpp in the AVX2 venv:", info.strip())
assert "AVX512 = 1" not in info, "the AVX2 venv's llama.cpp uses AVX-512"
PY

TAGLLM_KERNELS=avx2 cargo test --test it -- \
  model::logits_match_llama_cpp model::batched_llama_equals_alone \
  model::qwen2_logits_match_llama_cpp model::batched_qwen2_equals_alone \
  model::prefix_cache_gives_the_same_tokens distill::build_data "$@"
