#!/usr/bin/env bash
# Our Rust SDK and the `pulsar` crate (streamnative, 6.x) side by side in
# one run against the same release standalone on free ports
# (docs/benchmarks.md): publish 1 KiB unbatched (1,000 in flight) and
# batched (10,000 in flight), then catch-up consume of the batched topic;
# rate, latency and the client's CPU per message for each.
#
#   [UNBATCHED=N] [BATCHED=N] [FIRST=pulsar] scripts/bench-sdk.sh
#
# bench/sdk-compare is a crate of its own (not in the workspace), so CI
# never builds the `pulsar` crate; it needs `protoc`, taken from the
# vendored copy cargo already downloaded for our proto crate.
set -euo pipefail
cd "$(dirname "$0")/.."
UNBATCHED="${UNBATCHED:-50000}"; BATCHED="${BATCHED:-500000}"
cargo build --release --quiet --bin magnetar
if [ -z "${PROTOC:-}" ]; then
  PROTOC=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*protoc-bin-vendored-linux-x86_64*' -name protoc -type f | head -1)
  export PROTOC
fi
(cd bench/sdk-compare && cargo build --release --quiet)
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
# The batched backlog has no subscription while it is written: keep it.
"$B" admin --url "http://127.0.0.1:$http" namespaces set-policy public/default retention \
  '{"retentionTimeInMinutes":-1,"retentionSizeInMB":-1}' >/dev/null
bench/sdk-compare/target/release/sdk-compare "pulsar://127.0.0.1:$port" "$UNBATCHED" "$BATCHED"
