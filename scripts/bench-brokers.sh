#!/usr/bin/env bash
# The broker-tier benchmark set (docs/benchmarks.md), each on a fresh local
# cluster of release binaries in a temporary directory:
#
#   scripts/bench-brokers.sh baseline   # the same load with nothing happening (the stalls the load alone causes)
#   scripts/bench-brokers.sh failover   # kill -9 of the busiest owner under 100 producers on 100 topics
#   scripts/bench-brokers.sh unload     # the same owner stopped with SIGTERM (graceful unload of all its bundles)
#   scripts/bench-brokers.sh move       # three bundles unloaded one at a time through the admin API
#   scripts/bench-brokers.sh scale      # a broker added to 2 brokers serving 1,000 topics: time to its share, bookie bytes
#   scripts/bench-brokers.sh topics     # 10,000 topics on one broker: opens/s, memory per idle topic
#   scripts/bench-brokers.sh all
#
# Options through the environment: TOPICS (100), RATE (2000 msg/s in all),
# SCALE_TOPICS (1000), MANY_TOPICS (10000), KEEP=1 keeps the cluster dirs.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
TOPICS="${TOPICS:-100}"; RATE="${RATE:-2000}"
SCALE_TOPICS="${SCALE_TOPICS:-1000}"; MANY_TOPICS="${MANY_TOPICS:-10000}"

cargo build --release --quiet --bin magnetar
export MAGNETAR_BIN="$PWD/target/release/magnetar"
B="$MAGNETAR_BIN"
LC=deploy/local-cluster.sh

base() { python3 scripts/free-ports.py "$1"; } # a base with $1 consecutive free ports

# up NAME METADATA BOOKIES BROKERS: a cluster in $dir; sets $url and $meta.
up() {
  dir="$(mktemp -d)/$1"
  export MAGNETAR_LC_METADATA_PORT=$(base 3) MAGNETAR_LC_BOOKIE_PORT=$(base 3)
  export MAGNETAR_LC_BROKER_PORT=$(base 4) MAGNETAR_LC_HTTP_PORT=$(base 4)
  $LC up --metadata "$2" --bookies "$3" --brokers "$4" --dir "$dir" >/dev/null
  url="$($LC status --dir "$dir" >/dev/null; echo "pulsar://$(for i in $(seq 0 $(($4 - 1))); do printf '127.0.0.1:%s,' $((MAGNETAR_LC_BROKER_PORT + i)); done | sed 's/,$//')")"
  meta="$(cat "$dir/metadata-endpoints")"
}

down() {
  $LC down --dir "$dir" >/dev/null 2>&1 || true
  [ "${KEEP:-0}" = 1 ] && echo "kept $dir" || rm -rf "$(dirname "$dir")"
}

owners() { "$B" admin --metadata "$meta" --tls-dir "$dir/admin/tls" bundles owners; }

# The broker member that owns the most bundles.
busiest() {
  local id; id="$(owners | awk '{print $2}' | sort | uniq -c | sort -rn | head -1 | awk '{print $2}')"
  echo "broker-$(( ${id##*:} - MAGNETAR_LC_BROKER_PORT + 1 ))"
}

# stop-an-owner SIGNAL: producers on $TOPICS topics; the busiest owner gets
# SIGNAL 12 s in; the producers' stalls tell how long each topic waited.
stop_an_owner() {
  up "stop-$1" 3 3 3
  cat >"$dir/stop.sh" <<EOF
#!/bin/sh
# stop.sh PORT: the broker serving on PORT gets SIG$1.
exec "$PWD/$LC" kill "broker-\$((\$1 - $MAGNETAR_LC_BROKER_PORT + 1))" --signal $1 --dir "$dir" >/dev/null
EOF
  chmod +x "$dir/stop.sh"
  local cmd="$dir/stop.sh {port}"
  [ "$1" = NONE ] && cmd="true"
  "$B" perf produce bench --topics "$TOPICS" --producers "$TOPICS" --rate "$RATE" --size 256 \
    --duration 35 --stall-after 10 --event-at 16 --event-cmd "$cmd" --service-url "$url" \
    >"$dir/perf.out" 2>"$dir/perf.err" || true
  grep -E "summary|stall|event" "$dir/perf.out"
  down
}

move_bundles() {
  up move 3 3 3
  "$B" perf produce bench --topics "$TOPICS" --producers "$TOPICS" --rate "$RATE" --size 256 \
    --duration 30 --stall-after 10 --service-url "$url" >"$dir/perf.out" 2>"$dir/perf.err" &
  local perf=$!
  sleep 16
  local http="http://127.0.0.1:$MAGNETAR_LC_HTTP_PORT"
  for b in $(owners | awk '{print $1}' | shuf -n 3 --random-source=<(yes)); do
    local range="${b##*/}"
    local t0; t0="$(date +%s%N)"
    "$B" admin --url "$http" bundles unload public/default "$range" >/dev/null
    echo "unloaded $range in $(( ($(date +%s%N) - t0) / 1000000 )) ms (admin call)"
    sleep 2
  done
  wait $perf || true
  grep -E "summary|stall" "$dir/perf.out"
  down
}

scale() {
  up scale 3 3 2
  "$B" perf topics scale --count "$SCALE_TOPICS" --concurrency 64 --hold 60 --service-url "$url" \
    >"$dir/perf.out" 2>"$dir/perf.err" &
  local perf=$!
  until grep -q "opened" "$dir/perf.out" 2>/dev/null; do sleep 0.5; done
  grep opened "$dir/perf.out"
  written() { local t=0 p; for m in bookie-1 bookie-2 bookie-3; do p="$(cat "$dir/$m/pid")"; t=$((t + $(awk '/^write_bytes/{print $2}' "/proc/$p/io"))); done; echo $t; }
  sleep 2
  local w0; w0="$(written)"; sleep 10; local w1; w1="$(written)"
  echo "bookies wrote $((w1 - w0)) bytes in 10 s with the topics idle (baseline)"
  local t0; t0="$(date +%s.%N)"
  $LC add broker --dir "$dir" >/dev/null
  local new="127.0.0.1:$((MAGNETAR_LC_BROKER_PORT + 2))"
  local total; total="$(owners | wc -l)"
  until [ "$(owners | grep -c " $new ")" -ge $((total / 3)) ]; do
    sleep 0.25
    if [ "$(echo "$(date +%s.%N) - $t0 > 120" | bc)" = 1 ]; then echo "no share after 120 s"; break; fi
  done
  local t1; t1="$(date +%s.%N)"
  local w2; w2="$(written)"
  printf 'broker-3 owns %s of %s bundles %.1f s after it was added; bookies wrote %s bytes meanwhile\n' \
    "$(owners | grep -c " $new ")" "$total" "$(echo "$t1 - $t0" | bc)" "$((w2 - w1))"
  sleep 10
  local w3; w3="$(written)"
  echo "bookies wrote $((w3 - w2)) bytes in the next 10 s"
  kill $perf 2>/dev/null || true; wait $perf 2>/dev/null || true
  down
}

topics() {
  up topics 3 3 1
  local pid; pid="$(cat "$dir/broker-1/pid")"
  rss() { awk '/^VmRSS/{print $2}' "/proc/$pid/status"; }
  local r0; r0="$(rss)"
  "$B" perf topics many --count "$MANY_TOPICS" --concurrency 128 --hold 30 --service-url "$url" \
    >"$dir/perf.out" 2>"$dir/perf.err" &
  local perf=$!
  until grep -q "opened" "$dir/perf.out" 2>/dev/null; do sleep 0.5; done
  grep opened "$dir/perf.out"
  sleep 5
  local r1; r1="$(rss)"
  echo "broker RSS $r0 KiB -> $r1 KiB with $MANY_TOPICS topics loaded, each with an idle producer: $(echo "scale=1; ($r1 - $r0) / $MANY_TOPICS" | bc) KiB per topic"
  kill $perf 2>/dev/null || true; wait $perf 2>/dev/null || true
  down
}

case "$what" in
  baseline) stop_an_owner NONE ;;  # the event is `true`
  failover) stop_an_owner KILL ;;
  unload) stop_an_owner TERM ;;
  move) move_bundles ;;
  scale) scale ;;
  topics) topics ;;
  all) stop_an_owner KILL; stop_an_owner TERM; move_bundles; scale; topics ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
