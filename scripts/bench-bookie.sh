#!/usr/bin/env bash
# The bookie-tier benchmark of docs/benchmarks.md, in one run: the disk's own
# limits (fio, when installed: `apt-get install fio`), then `magnetar perf
# ledger` against a local cluster of 3 metadata nodes and 3 bookies (1 bookie
# against 3/2/2, then recovery and catch-up reads), and against one of 1
# metadata node and 1 bookie (1 ledger against 1,000 ledgers). Each pair of
# write runs is repeated (ROUNDS), each round on a fresh cluster, with a
# pause between runs so that one run's checkpoint does not land in the next. Writes run with 8,000 adds in flight,
# where both 1/1/1 and 3/2/2 are at capacity (more in flight adds nothing);
# one run of each at 2,000 and 4,000 in flight shows how the two depend on
# pipeline depth (3/2/2 confirms an entry only once both bookies of its
# write set have it, in order, so a stall of any of its three bookies holds
# every add behind it). Not part of the test suite; takes about 15 minutes
# and needs ~30 GB of free disk while it runs (removed at the end).
#
#   scripts/bench-bookie.sh [--dir DIR] [--rounds N] [--duration S] [--inflight N]
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=/tmp/magnetar-bench-bookie
ROUNDS=3
DURATION=20
INFLIGHT=8000
PAUSE=20
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --inflight) INFLIGHT="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

cargo build --release --quiet
BIN=target/release/magnetar

if command -v fio >/dev/null; then
  mkdir -p "$DIR/fio"
  echo "== fio (same filesystem as $DIR)"
  fio --name=fsync4k --rw=write --bs=4k --size=256m --fdatasync=1 --runtime=10 \
    --time_based --directory="$DIR/fio" | grep -E "write: IOPS"
  fio --name=seq --rw=write --bs=1m --size=2g --runtime=10 --time_based \
    --end_fsync=1 --directory="$DIR/fio" | grep -E "WRITE: bw"
  rm -rf "$DIR/fio"
else
  echo "== fio not installed: no disk figures (apt-get install fio)"
fi

# The runs write tens of gigabytes: the cluster and its data go at the end.
down() {
  MAGNETAR_BIN=$BIN deploy/local-cluster.sh down --dir "$DIR/cluster" >/dev/null 2>&1 || true
  rm -rf "$DIR/cluster"
}
trap down EXIT
up() {
  down
  MAGNETAR_BIN=$BIN deploy/local-cluster.sh up --dir "$DIR/cluster" "$@" --brokers 0 >/dev/null
  EP=$(cat "$DIR/cluster/metadata-endpoints")
  T="$DIR/cluster/admin/tls"
}

# perf_write ENSEMBLE LEDGERS [IN_FLIGHT] [DURATION]
perf_write() {
  "$BIN" perf ledger --metadata "$EP" --tls-dir "$T" --ensemble "$1" write --size 1024 \
    --ledgers "$2" --inflight "${3:-$INFLIGHT}" --duration "${4:-$DURATION}"
  sleep "$PAUSE"
}

# A fresh cluster (`up` arguments), warmed by a 5 s write of ENSEMBLE that is
# not counted: every bookie's process has its memory (the journal's tail
# cache) in use before the runs that count, and each round starts on empty
# disks (a round writes ~20 GB; bookies turn read-only at 95 % disk use).
fresh() {
  local ensemble="$1"; shift
  up "$@"
  perf_write "$ensemble" 1 "$INFLIGHT" 5 >/dev/null
}

# rounds WARM_ENSEMBLE "UP ARGUMENTS" E1 L1 E2 L2: ROUNDS rounds of two write
# runs (ensemble, ledgers), each round on a fresh cluster.
rounds() {
  local warm="$1" cluster="$2"
  shift 2
  for round in $(seq "$ROUNDS"); do
    echo "-- round $round"
    # shellcheck disable=SC2086 # the cluster's arguments, split on purpose
    fresh "$warm" $cluster
    perf_write "$1" "$2"
    perf_write "$3" "$4"
  done
}

echo "== ledger writes, 1 KiB entries, $INFLIGHT in flight, ${DURATION} s each"
echo "== 3 metadata nodes, 3 bookies: 1 bookie (1/1/1) against 3/2/2"
rounds 3,2,2 "--metadata 3 --bookies 3 --ensemble 3,2,2" 1,1,1 1 3,2,2 1
echo "== pipeline depth: 1/1/1 and 3/2/2 with fewer adds in flight"
for depth in 2000 4000; do
  fresh 3,2,2 --metadata 3 --bookies 3 --ensemble 3,2,2
  perf_write 1,1,1 1 "$depth"
  perf_write 3,2,2 1 "$depth"
done
echo "== recovery"
"$BIN" perf ledger --metadata "$EP" --tls-dir "$T" --ensemble 3,2,2 recover --entries 10000
echo "== catch-up reads, 1,000,000 entries of 1 KiB, 4 readers"
"$BIN" perf ledger --metadata "$EP" --tls-dir "$T" --ensemble 3,2,2 read --entries 1000000 --readers 4
# One bookie holds every ledger in both runs, so the comparison is of the
# bookie's write path alone (with 3 bookies, 1,000 ledgers of 1/1/1 spread
# over three bookie processes sharing the same two cores).
echo "== 1 metadata node, 1 bookie: 1 ledger against 1,000 ledgers"
rounds 1,1,1 "--metadata 1 --bookies 1 --ensemble 1,1,1" 1,1,1 1 1,1,1 1000
