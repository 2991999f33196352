#!/usr/bin/env bash
# Soak test: starts the release server on loopback over a fresh data directory, drives mixed load
# at it with benches/soak.rs (TagNotes streams, TagNote with repeats and invalid notes, batched
# GetNoteFeatures in both layouts with invalid calls mixed in, scans) for MINUTES (default 10) or
# MAX_REQUESTS calls (default 5,000,000), whichever ends first, then stops it with SIGTERM.
# Prints calls by RPC and status, and the server's RSS at start, end and peak.
#   scripts/soak.sh [MINUTES] [MAX_REQUESTS]
set -euo pipefail
minutes="${1:-10}"
max="${2:-5000000}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
./models/fetch_default_model.sh >/dev/null
cargo build --release --locked --quiet
cargo bench --no-run --bench soak --quiet 2>/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port="$(free_port)"
mport="$(free_port)"
data="$(mktemp -d)"
TAGLLM__SERVER__METRICS_ADDR="127.0.0.1:$mport" RUST_LOG=warn \
  ./target/release/tagllm serve --addr "127.0.0.1:$port" --data-dir "$data" &
pid=$!
# The server never outlives the script, whichever step fails.
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 120); do
  if curl -sf "http://127.0.0.1:$mport/metrics" | grep -q '^tagllm_model_ready 1'; then break; fi
  sleep 0.5
done
cargo bench --bench soak -- --addr "127.0.0.1:$port" --pid "$pid" --minutes "$minutes" --max-requests "$max"
curl -sf "http://127.0.0.1:$mport/metrics" | grep -E '^tagllm_(engine_jobs_total|notes_tagged_total|cache_lookups_total|grpc_requests_in_flight)' || true
kill -TERM "$pid"
if wait "$pid"; then echo "server exited cleanly after SIGTERM"; else echo "server exit status $?"; exit 1; fi
