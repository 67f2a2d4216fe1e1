#!/usr/bin/env bash
# Dispatch per subscription type (docs/benchmarks.md): a release standalone
# on free ports; a backlog of PRODUCE seconds (default 15) of unbatched 1 KiB
# messages keyed round-robin over KEYS (default 10,000) keys; then, for each
# subscription type with 1 and with 8 consumers (a connection each, one
# process), a fresh subscription drains from the earliest for DURATION
# seconds (default 4) and `magnetar perf consume` prints the rate.
#
#   [PRODUCE=S] [KEYS=N] [DURATION=S] scripts/bench-subscriptions.sh
#
# The rate is over the whole DURATION: a line whose count equals the
# backlog drained it early, so its rate is a lower bound.
set -euo pipefail
cd "$(dirname "$0")/.."
PRODUCE="${PRODUCE:-15}"; KEYS="${KEYS:-10000}"; DURATION="${DURATION:-4}"
cargo build --release --quiet --bin magnetar
B="$PWD/target/release/magnetar"
work=$(mktemp -d)
tcp() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
udp() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(tcp); http=$(tcp)
"$B" standalone --data-dir "$work/data" --broker-port "$port" --http-port "$http" \
  --metadata-port "$(udp)" --bookie-port "$(udp)" 2>"$work/standalone.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do grep -qs "standalone ready" "$work/standalone.log" && break; sleep 0.2; done
url="pulsar://127.0.0.1:$port"
topic=bench-subscriptions
# The backlog has no subscription while it is written: keep it (retention).
"$B" admin --url "http://127.0.0.1:$http" topics set-policy "$topic" retention \
  '{"retentionTimeInMinutes":-1,"retentionSizeInMB":-1}' >/dev/null
# The backlog: PRODUCE seconds of one producer at full speed.
"$B" perf produce "$topic" --keys "$KEYS" --size 1024 --max-pending 2000 --duration "$PRODUCE" \
  --service-url "$url" >"$work/produce.out" 2>&1
echo "backlog: $(grep summary "$work/produce.out")"
for type in exclusive failover shared key-shared; do
  for consumers in 1 8; do
    [ "$consumers" -gt 1 ] && [ "$type" = exclusive ] && continue
    line=$("$B" perf consume "$topic" -s "$type-$consumers" --sub-type "$type" \
      --consumers "$consumers" --duration "$DURATION" --service-url "$url" 2>&1 | grep summary || true)
    echo "$type x$consumers: $line"
  done
done
