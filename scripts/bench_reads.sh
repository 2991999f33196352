#!/usr/bin/env bash
# Feature reads against their peer, in one run: the release server on loopback over a store of
# NOTES synthetic tagged notes, and a local redis-server (Debian's `redis-server` package, Redis 7)
# holding the same encoded records; benches/reads.rs drives both with the same client, the same
# random batches and the same concurrency, and prints median (min-max) over ROUNDS rounds and the
# notes/s ratio.
#   scripts/bench_reads.sh [CONCURRENCY] [BATCH]
# Env: NOTES (10000), REQUESTS (2000 calls per pass), ROUNDS (3).
set -euo pipefail
conc="${1:-4}"
batch="${2:-500}"
notes="${NOTES:-10000}"
requests="${REQUESTS:-2000}"
rounds="${ROUNDS:-3}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
command -v redis-server >/dev/null || { echo "redis-server not found (apt-get install redis-server)" >&2; exit 2; }
./models/fetch_default_model.sh >/dev/null
cargo build --release --locked --quiet
cargo bench --no-run --bench reads --quiet 2>/dev/null
bench="$(ls -t target/release/deps/reads-* | grep -v '\.d$' | head -1)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="$(free_port)"
mport="$(free_port)"
rport="$(free_port)"
data="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT

"$bench" fill --data-dir "$data" --notes "$notes"
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  --dir "$data" --loglevel warning &
pids+=($!)
TAGLLM__SERVER__METRICS_ADDR="127.0.0.1:$mport" RUST_LOG=warn \
  ./target/release/tagllm serve --addr "127.0.0.1:$port" --data-dir "$data" &
pids+=($!)
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$mport/metrics" | grep -q '^tagllm_model_ready 1'; then break; fi
  sleep 0.5
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(redis-server --version | cut -d' ' -f1-3)"
"$bench" run --addr "127.0.0.1:$port" --redis "127.0.0.1:$rport" --notes "$notes" --batch "$batch" \
  --requests "$requests" --concurrency "$conc" --rounds "$rounds"
