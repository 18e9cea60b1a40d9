#!/usr/bin/env bash
# Where the API pod's CPU goes in `fanout`: runs the pod under callgrind (instruction
# counts: repeatable whatever else the machine is doing, unlike timings), drives it
# with `comfyfleet bench fanout --url …`, and prints the top functions by own cost
# and the inclusive cost of the hot path's stages.
#
# Usage: scripts/bench-profile.sh [CLIENTS] [RATE] [SECONDS]   (default 200 50 5)
# Needs valgrind, PostgreSQL and Redis on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-200}
RATE=${2:-50}
SECONDS_=${3:-5}
PORT=${PROFILE_PORT:-18741}
ADMIN_DB=${BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
REDIS=${BENCH_REDIS_URL:-redis://127.0.0.1:6379}
DB=comfyfleet_profile_$$
DB_URL=${ADMIN_DB%/*}/$DB
OUT=${OUT:-target/bench/profile-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

cargo build --release --quiet
BIN=target/release/comfyfleet
export RUST_LOG=warn
DATABASE_URL=$DB_URL "$BIN" migrate
TENANT=$(DATABASE_URL=$DB_URL COMFYFLEET_ADMIN_PASSWORD=profile-password-0123 \
  "$BIN" tenant create profile --admin-email ops@profile.example.com)
KEY=$(DATABASE_URL=$DB_URL "$BIN" apikey create --tenant "$TENANT")

DATABASE_URL=$DB_URL REDIS_URL=$REDIS COMFYFLEET_REDIS_PREFIX=cfprofile$$ \
  COMFYFLEET_BIND=127.0.0.1:$PORT COMFYFLEET_JWT_SECRET=profile-secret-profile-secret-0123456789 \
  COMFYFLEET_OBJECT_STORE=memory:// \
  valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" "$BIN" api 2>"$OUT/valgrind.log" &
POD=$!
cleanup() {
  kill "$POD" 2>/dev/null || true
  wait "$POD" 2>/dev/null || true
  psql "$ADMIN_DB" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done

"$BIN" bench fanout --url "http://127.0.0.1:$PORT" --api-key "$KEY" --tenant-id "$TENANT" \
  --redis-prefix "cfprofile$$" --server-pid "$POD" --clients "$CLIENTS" --rate "$RATE" \
  --duration "$SECONDS_" --json "$OUT/fanout.json" --label profile
kill -TERM "$POD"
wait "$POD" || true
trap - EXIT
psql "$ADMIN_DB" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true

callgrind_annotate "$OUT/callgrind.out" 2>/dev/null | head -45 >"$OUT/self.txt" || true
callgrind_annotate --inclusive=yes "$OUT/callgrind.out" 2>/dev/null | head -70 >"$OUT/inclusive.txt" || true
cat "$OUT/self.txt"
echo "inclusive: $OUT/inclusive.txt"
