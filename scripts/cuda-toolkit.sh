#!/usr/bin/env bash
# A CUDA 13.0 toolkit from PyPI wheels: enough for `cargo build --features cuda` on a machine with
# no GPU and no system CUDA (nvcc, headers, the libraries the link names). Prints exports to eval:
#   eval "$(scripts/cuda-toolkit.sh)" && cargo build --release --features cuda
#   eval "$(scripts/cuda-toolkit.sh DIR)"   # install into DIR instead of target/cuda-toolkit
# Idempotent: wheels already installed at these pins are kept (about 1.3 GB).
#
# Why 13.0: the CUDA 12 nvcc wheels hold ptxas and libnvvm but no nvcc; the CUDA 13 wheels make a
# whole toolkit under site-packages/nvidia/cu13. 13.0 is the newest CUDA that driver 580 runs (it
# JITs the PTX candle embeds). cudarc takes the version from `nvcc --version`.
# No wheel ships libcuda (the driver's library) and cudarc links -lcuda, so lib/stubs gets a stub
# made from cuda.h with the soname libcuda.so.1; at run time the driver's libcuda.so.1 is loaded.
# CUDA_COMPUTE_CAP (default 90 = H100/H200, built as sm_90a) is the one architecture that candle's
# kernels are compiled for, as there is no GPU to ask. LD_LIBRARY_PATH is for running the binary.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$(mkdir -p "${1:-$root/target/cuda-toolkit}" && cd "${1:-$root/target/cuda-toolkit}" && pwd)"
pins=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.1.3 nvidia-curand==10.4.0.35
)
wheels="$dest/wheels" cuda="$dest/cuda" stamp="$dest/wheels/.pins"
if [ "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]; then
  rm -rf "$wheels"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --no-deps --only-binary=:all: --target "$wheels" "${pins[@]}" >&2
  echo "${pins[*]}" > "$stamp"
fi
cu13="$wheels/nvidia/cu13"

# A toolkit layout: bin, include, nvvm as they are; lib (and lib64) with the unversioned names the
# linker looks for, plus the libcuda stub.
rm -rf "$cuda"
mkdir -p "$cuda/lib/stubs"
for d in bin include nvvm; do ln -s "$cu13/$d" "$cuda/$d"; done
ln -s lib "$cuda/lib64"
for f in "$cu13"/lib/lib*.so.*; do
  n="${f##*/}"
  ln -s "$f" "$cuda/lib/$n"
  ln -sfn "$n" "$cuda/lib/${n%%.so.*}.so"
done
# The stub: every cu* function cuda.h declares, under its exported name (with the _v2.. aliases).
stub="$cuda/lib/stubs"
{ gcc -E -P -I"$cu13/include" "$cu13/include/cuda.h" |
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' \t('
  sed -nE 's/^#define (cu[A-Z][A-Za-z0-9_]*) +(cu[A-Z][A-Za-z0-9_]*).*/\1\n\2/p' \
    "$cu13/include/cuda.h"
} | sort -u | sed 's/.*/void &(void) {}/' > "$stub/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/cuda_stub.c"

echo "export CUDA_ROOT='$cuda' CUDA_HOME='$cuda' CUDA_PATH='$cuda'"
echo "export PATH='$cuda/bin':\"\$PATH\""
echo "export LD_LIBRARY_PATH='$cuda/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
echo "export CUDA_COMPUTE_CAP=\"\${CUDA_COMPUTE_CAP:-90}\""
