#!/usr/bin/env bash
# Compatibility test: the official Python pulsar-client against a standalone
# Magnetar started here on free ports, with its own data directory.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pulsar, prometheus_client' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet 'pulsar-client>=3.5,<4' 'prometheus-client>=0.20,<1'
fi

bin="${CARGO_TARGET_DIR:-target}/debug/magnetar"
[ -x "$bin" ] || cargo build --bin magnetar
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
udp() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
tls_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" standalone --data-dir "$work/data" --broker-port "$port" --http-port "$http" --metadata-port "$(udp)" --bookie-port "$(udp)" \
  --broker-tls-port "$tls_port" 2>"$work/standalone.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  grep -qs "standalone ready" "$work/standalone.log" && break
  sleep 0.2
done
grep -q "standalone ready" "$work/standalone.log" || { cat "$work/standalone.log"; exit 1; }
url="pulsar://127.0.0.1:$port"
# Our CLI and the Python client on the same topic.
"$bin" produce cli-to-python -m from-cli -n 3 --service-url "$url" 2>/dev/null
timeout 120 .venv/bin/python tests/compat/python_roundtrip.py "$url"
timeout 120 .venv/bin/python tests/compat/python_subscriptions.py "$url"
timeout 120 .venv/bin/python tests/compat/python_topics.py "$url" "http://127.0.0.1:$http"
examples="${CARGO_TARGET_DIR:-target}/debug/examples"
[ -x "$examples/typed_json" ] || cargo build -p magnetar-client --examples
timeout 180 .venv/bin/python tests/compat/python_sdk_interop.py "$url" "http://127.0.0.1:$http" "$bin" "$examples/typed_json"
timeout 60 .venv/bin/python - "$url" <<'PY'
import sys, pulsar
c = pulsar.Client(sys.argv[1])
s = c.subscribe("cli-to-python", "py", initial_position=pulsar.InitialPosition.Earliest)
for _ in range(3):
    m = s.receive(timeout_millis=10000)
    assert m.data() == b"from-cli", m.data()
    s.acknowledge(m)
c.close()
print("python reads what the magnetar CLI produced: ok")
PY

# TLS: the Python client over pulsar+ssl://, then our CLI reads what it sent.
"$bin" tls create-server-cert --dir "$work/other-ca" --name localhost >/dev/null
timeout 120 .venv/bin/python tests/compat/python_tls.py "pulsar+ssl://localhost:$tls_port" \
  "$work/data/client-tls/ca.pem" "$work/other-ca/ca.pem"
got=$("$bin" consume over-tls -s cli -n 5 --position earliest --timeout-secs 20 \
  --service-url "pulsar+ssl://127.0.0.1:$tls_port" --tls-trust-certs-file "$work/data/client-tls/ca.pem" 2>/dev/null | tr '\n' ' ')
[ "$got" = "tls-0 tls-1 tls-2 tls-3 tls-4 " ] || { echo "the CLI over TLS read: $got"; exit 1; }
kill $pid 2>/dev/null || true
wait $pid 2>/dev/null || true

# Token authentication: a standalone that asks for tokens.
"$bin" tokens create-secret-key --output "$work/secret.key" 2>/dev/null
"$bin" tokens create-secret-key --output "$work/other.key" 2>/dev/null
good=$("$bin" tokens create --secret-key "$work/secret.key" --subject py-app --expiry-secs 3600)
wrong=$("$bin" tokens create --secret-key "$work/other.key" --subject py-app)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
http=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" standalone --data-dir "$work/auth-data" --broker-port "$port" --http-port "$http" --metadata-port "$(udp)" \
  --bookie-port "$(udp)" --auth-token-secret-key "$work/secret.key" 2>"$work/auth.log" &
pid=$!
for _ in $(seq 1 100); do
  grep -qs "standalone ready" "$work/auth.log" && break
  sleep 0.2
done
url="pulsar://127.0.0.1:$port"
timeout 120 .venv/bin/python tests/compat/python_auth.py "$url" "$good" "$wrong"
"$bin" produce secured -m from-cli --auth-token "$good" --service-url "$url" 2>/dev/null
if "$bin" produce secured -m no-token --service-url "$url" 2>/dev/null; then
  echo "the CLI got in without a token"; exit 1
fi
kill $pid 2>/dev/null || true
wait $pid 2>/dev/null || true

# A cluster of three brokers as processes; the client gets all of them.
base() { python3 scripts/free-ports.py "$1"; } # a base with $1 consecutive free ports
export MAGNETAR_BIN="$bin"
export MAGNETAR_LC_METADATA_PORT=$(base 3) MAGNETAR_LC_BOOKIE_PORT=$(base 3)
export MAGNETAR_LC_BROKER_PORT=$(base 4) MAGNETAR_LC_HTTP_PORT=$(base 4)
export MAGNETAR_LC_METADATA_HTTP_PORT=$(base 3) MAGNETAR_LC_BOOKIE_HTTP_PORT=$(base 3)
lc="$work/lc"
trap 'deploy/local-cluster.sh down --dir "$lc" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
deploy/local-cluster.sh up --metadata 3 --bookies 3 --brokers 3 --dir "$lc" >/dev/null
url="pulsar://127.0.0.1:$MAGNETAR_LC_BROKER_PORT,127.0.0.1:$((MAGNETAR_LC_BROKER_PORT + 1)),127.0.0.1:$((MAGNETAR_LC_BROKER_PORT + 2))"
https() { local b="$1" out="" i; for i in 0 1 2; do out="$out${out:+,}http://127.0.0.1:$((b + i))"; done; echo "$out"; }
timeout 120 .venv/bin/python tests/compat/python_metrics.py "$url" "$(https "$MAGNETAR_LC_HTTP_PORT")" \
  "$(https "$MAGNETAR_LC_BOOKIE_HTTP_PORT")" "$(https "$MAGNETAR_LC_METADATA_HTTP_PORT")"
if ! timeout 300 .venv/bin/python tests/compat/python_failover.py "$url" deploy/local-cluster.sh "$lc"; then
  for m in "$lc"/broker-*; do echo "==== $m"; tail -30 "$m/log"; done
  exit 1
fi
echo "8 passed, 0 failed: python compatibility"
