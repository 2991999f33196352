#!/usr/bin/env bash
# Regenerates the committed gRPC/protobuf stubs in src/tagllm/v1/ from the repo's proto/.
#
#   clients/python/generate.sh [OUT_DIR]
#
# OUT_DIR defaults to clients/python/src. The stubs import each other as `from tagllm.v1 import ...`
# because protoc runs with `-I proto` on `proto/tagllm/v1/tagllm.proto`. Needs grpcio-tools (pinned in
# scripts/test-requirements.txt); set PYTHON to pick the interpreter (default: python3).
# The drift test (clients/python/tests/test_generated.py) runs this into a temp dir and compares.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$here/src}"
python="${PYTHON:-python3}"

mkdir -p "$out"
cd "$root"
"$python" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  proto/tagllm/v1/tagllm.proto
# protoc writes no package markers; the committed ones (and py.typed, so type checkers read the
# generated .pyi) are empty files.
touch "$out/tagllm/__init__.py" "$out/tagllm/v1/__init__.py" "$out/tagllm/py.typed"
