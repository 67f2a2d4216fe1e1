#!/usr/bin/env bash
# A/B of ledger write throughput between magnetar binaries, for
# docs/benchmarks.md: ROUNDS rounds, each binary in turn on a fresh local
# cluster (3 metadata nodes, 3 bookies), a 5 s warm-up that is not counted,
# then 15 s of 1/1/1 and 15 s of 3/2/2 (1 KiB entries, 8,000 in flight).
# Prints adds/s and the bookies' CPU per entry (from /proc/<pid>/stat) of
# each run, and the 3/2/2 share of 1/1/1. Not part of the test suite.
#
#   scripts/ab-ledger.sh ROUNDS BINARY...
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 ROUNDS BINARY..." >&2; exit 2; }
ROUNDS=$1
shift
DIR=/tmp/magnetar-ab-ledger
down() {
  MAGNETAR_BIN=$1 deploy/local-cluster.sh down --dir "$DIR" >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
# CPU ticks (1/100 s) of the bookies of the cluster so far.
bookie_ticks() {
  local sum=0
  for p in $(pgrep -f "bookie --config $DIR" || true); do
    sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$sum"
}
for _ in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    down "$bin"
    MAGNETAR_BIN=$bin deploy/local-cluster.sh up --dir "$DIR" --metadata 3 --bookies 3 \
      --brokers 0 --ensemble 3,2,2 >/dev/null
    ep=$(cat "$DIR/metadata-endpoints")
    write() {
      "$bin" perf ledger --metadata "$ep" --tls-dir "$DIR/admin/tls" --ensemble "$1" \
        write --size 1024 --inflight 8000 --duration "$2" 2>/dev/null
    }
    write 3,2,2 5 >/dev/null
    sleep 15
    line="$bin"
    rates=()
    for e in 1,1,1 3,2,2; do
      t0=$(bookie_ticks)
      rate=$(write "$e" 15 | grep -o '[0-9]* adds/s' | cut -d' ' -f1)
      t1=$(bookie_ticks)
      rates+=("$rate")
      line="$line  $e $rate adds/s ($(awk -v t=$((t1 - t0)) -v r="$rate" \
        'BEGIN { printf "%.2f", t * 10000 / (r * 15) }') µs bookie CPU/entry)"
      sleep 15
    done
    echo "$line  3/2/2 share $(( ${rates[1]} * 100 / ${rates[0]} )) %"
    down "$bin"
  done
done
