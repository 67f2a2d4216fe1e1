#!/usr/bin/env bash
# Topics and policies (docs/benchmarks.md): a release standalone on free
# ports, 1 KiB messages, DURATION seconds (default 10) per line:
#  - publish throughput of one unbatched producer with deduplication off,
#    then on (the namespace policy, through the REST API);
#  - 8 producers on one topic vs on the 8 partitions of a partitioned topic;
#  - a non-persistent topic fanned out to 8 subscriptions (a `perf consume`
#    process each) while one producer publishes: the rate each gets.
#
#   [DURATION=S] scripts/bench-topics.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${DURATION:-10}"
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
admin() { "$B" admin --url "http://127.0.0.1:$http" "$@" >/dev/null; }
produce() { "$B" perf produce "$@" --size 1024 --duration "$DURATION" --service-url "$url" 2>&1 | grep summary; }

admin namespaces create public/nodedup
admin namespaces create public/dedup
admin namespaces set-policy public/dedup deduplication true
echo "dedup off: $(produce persistent://public/nodedup/t)"
echo "dedup on:  $(produce persistent://public/dedup/t)"

admin topics create persistent://public/default/parted --partitions 8
echo "one topic, 8 producers:        $(produce one-topic --producers 8)"
echo "8 partitions, 8 producers:     $(produce persistent://public/default/parted-partition --topics 8 --producers 8)"

np=non-persistent://public/default/fanout
for i in $(seq 1 8); do
  "$B" perf consume "$np" -s "s$i" --sub-type exclusive --duration $((DURATION + 3)) \
    --service-url "$url" >"$work/consume-$i.out" 2>&1 &
done
sleep 2
echo "non-persistent, 1 producer:    $(produce "$np")"
wait $(jobs -p | grep -v "^$pid$") 2>/dev/null || true
for i in $(seq 1 8); do echo "  subscription s$i: $(grep summary "$work/consume-$i.out")"; done

# Compaction: COMPACT_MESSAGES (default 1,000,000) messages of 1 KiB over
# 10,000 keys, then one compaction; its time and what it kept.
msgs="${COMPACT_MESSAGES:-1000000}"
ct=persistent://public/default/compact-me
rate=100000
# Written before any subscription: kept by a retention policy.
admin topics set-policy "$ct" retention '{"retentionTimeInMinutes":-1,"retentionSizeInMB":-1}'
"$B" perf produce "$ct" --keys 10000 --size 1024 --rate "$rate" --duration $((msgs / rate)) \
  --service-url "$url" 2>&1 | grep summary | sed 's/^/compaction input: /'
api="http://127.0.0.1:$http/admin/v2/persistent/public/default/compact-me"
before=$(curl -s "$api/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["storageSize"])')
start=$(date +%s.%N)
curl -s -X PUT "$api/compaction" >/dev/null
while [ "$(curl -s "$api/compaction" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')" = RUNNING ]; do sleep 0.2; done
end=$(date +%s.%N)
kept=$(curl -s "$api/internalStats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["compactedLedger"]["entries"])')
echo "compaction: $(curl -s "$api/compaction") in $(python3 -c "print(round($end - $start, 2))") s; topic $before bytes, kept $kept entries"
