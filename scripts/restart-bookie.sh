#!/usr/bin/env bash
# How long a ledger writer stalls when a bookie of its ensemble is killed
# with SIGKILL and started again at once (a supervisor's restart), for
# docs/benchmarks.md. For each binary in turn, ROUNDS times: a fresh local
# cluster (3 metadata nodes, BOOKIES bookies — 4 by default; with 3 there
# is no spare and the writer shrinks its ensemble), a 3/2/2 write of 1 KiB entries
# (1,000 in flight) for 20 s; at 6 s the busiest bookie (one of the
# ensemble) is killed and restarted — at once, or DOWN seconds later. Prints
# adds/s for every second and the seconds whose rate fell under half the
# median of the first five. Not part of the test suite.
#
#   [DOWN=S] [BOOKIES=N] [KEEP=1] scripts/restart-bookie.sh ROUNDS BINARY...
#
# KEEP=1 leaves the last cluster's directory (/tmp/magnetar-restart-bookie,
# with every member's log and the writer's perf.err) in place.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 ROUNDS BINARY..." >&2; exit 2; }
ROUNDS=$1
shift
DIR=/tmp/magnetar-restart-bookie
lc() { MAGNETAR_BIN=$bin deploy/local-cluster.sh "$@" --dir "$DIR"; }
down() { lc down >/dev/null 2>&1 || true; rm -rf "$DIR"; }
# CPU ticks of bookie-N so far.
ticks() { awk '{print $14 + $15}' "/proc/$(cat "$DIR/bookie-$1/pid")/stat"; }
for _ in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    down
    lc up --metadata 3 --bookies "${BOOKIES:-4}" --brokers 0 --ensemble 3,2,2 >/dev/null
    ep=$(cat "$DIR/metadata-endpoints")
    "$bin" perf ledger --metadata "$ep" --tls-dir "$DIR/admin/tls" --ensemble 3,2,2 \
      write --size 1024 --inflight 1000 --duration 20 --progress \
      >"$DIR/perf.out" 2>"$DIR/perf.err" &
    perf=$!
    sleep 2
    before=(); for b in $(seq "${BOOKIES:-4}"); do before+=("$(ticks "$b")"); done
    sleep 4
    victim=1 most=0
    for b in $(seq "${BOOKIES:-4}"); do
      used=$(( $(ticks "$b") - ${before[$((b - 1))]} ))
      if [ "$used" -gt "$most" ]; then most=$used; victim=$b; fi
    done
    lc kill "bookie-$victim" --signal KILL >/dev/null
    sleep "${DOWN:-0}"
    lc start "bookie-$victim" >/dev/null
    wait "$perf" || true
    rates=$(grep -o '[0-9]* adds/s' "$DIR/perf.err" | cut -d' ' -f1 | tr '\n' ' ')
    read -r -a r <<<"$rates"
    median=$(printf '%s\n' "${r[@]:0:5}" | sort -n | sed -n 3p)
    low=0
    for x in "${r[@]:5}"; do [ "$x" -lt $((median / 2)) ] && low=$((low + 1)); done
    echo "$bin  killed bookie-$victim at 6 s, restarted ${DOWN:-0} s later  adds/s per second: $rates"
    echo "    seconds under half of the first five's median ($median): $low"
    [ -n "${KEEP:-}" ] || down
  done
done
