#!/usr/bin/env bash
# A Magnetar cluster of separate processes on this machine (loopback only):
# metadata nodes, bookies and brokers, each with its own data directory,
# ports, certificate (signed by one cluster CA) and log.
#
#   deploy/local-cluster.sh up [--metadata N] [--bookies N] [--brokers N] [--ensemble E,Qw,Qa] [--dir DIR]
#   deploy/local-cluster.sh status                  # name, pid, state, addresses
#   deploy/local-cluster.sh kill MEMBER [--signal KILL|TERM|STOP|CONT]
#   deploy/local-cluster.sh start MEMBER
#   deploy/local-cluster.sh add broker|bookie       # the next member of a running cluster
#   deploy/local-cluster.sh down
#
# Every subcommand takes --dir DIR (default ./data/local-cluster). Members are
# metadata-N, bookie-N and broker-N. Ports: metadata 2379.., bookies 3181..,
# brokers 6650.. with HTTP (admin REST, lookups, /metrics) on 8080..
# (broker-1 serves pulsar://127.0.0.1:6650 and http://127.0.0.1:8080);
# metadata nodes serve /metrics, /ready, /live on 2389.., bookies on 8000..;
# the bases can be moved with MAGNETAR_LC_METADATA_PORT,
# MAGNETAR_LC_BOOKIE_PORT, MAGNETAR_LC_BROKER_PORT, MAGNETAR_LC_HTTP_PORT,
# MAGNETAR_LC_METADATA_HTTP_PORT and MAGNETAR_LC_BOOKIE_HTTP_PORT (tests do,
# to run beside other clusters).
# The binary is $MAGNETAR_BIN, or target/release/magnetar built on demand.
# `down` stops every member and keeps the data; `up` again restarts them.
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
die() { echo "local-cluster: $*" >&2; exit 1; }

cmd="${1:-}"; [ -n "$cmd" ] || usage; shift
DIR=./data/local-cluster
N_META=3; N_BOOKIES=3; N_BROKERS=1; ENSEMBLE=""; SIGNAL=KILL; MEMBER=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --metadata) N_META="$2"; shift 2 ;;
    --bookies) N_BOOKIES="$2"; shift 2 ;;
    --brokers) N_BROKERS="$2"; shift 2 ;;
    --ensemble) ENSEMBLE="$2"; shift 2 ;;
    --signal) SIGNAL="$2"; shift 2 ;;
    -h|--help) usage ;;
    -*) die "unknown option $1" ;;
    *) [ -z "$MEMBER" ] || die "unexpected argument $1"; MEMBER="$1"; shift ;;
  esac
done

META_BASE="${MAGNETAR_LC_METADATA_PORT:-2379}"
BOOKIE_BASE="${MAGNETAR_LC_BOOKIE_PORT:-3181}"
BROKER_BASE="${MAGNETAR_LC_BROKER_PORT:-6650}"
HTTP_BASE="${MAGNETAR_LC_HTTP_PORT:-8080}"
META_HTTP_BASE="${MAGNETAR_LC_METADATA_HTTP_PORT:-2389}"
BOOKIE_HTTP_BASE="${MAGNETAR_LC_BOOKIE_HTTP_PORT:-8000}"

binary() {
  if [ -n "${MAGNETAR_BIN:-}" ]; then echo "$MAGNETAR_BIN"; return; fi
  local root target
  root="$(cd "$(dirname "$0")/.." && pwd)"
  target="${CARGO_TARGET_DIR:-$root/target}"
  (cd "$root" && cargo build --release --quiet --bin magnetar) >&2
  echo "$target/release/magnetar"
}

abs() { mkdir -p "$1"; (cd "$1" && pwd); }

pid_of() { cat "$DIR/$1/pid" 2>/dev/null || true; }

# running | stopped (SIGSTOP) | down
state_of() {
  local pid; pid="$(pid_of "$1")"
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then echo down; return; fi
  # A zombie or a process that is not ours any more counts as down.
  if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--config $DIR/$1/config.toml"; then
    echo down; return
  fi
  case "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" in
    T|t) echo stopped ;;
    Z) echo down ;;
    *) echo running ;;
  esac
}

members() { ls -1 "$DIR" 2>/dev/null | grep -E '^(metadata|bookie|broker)-[0-9]+$' | sort -t- -k1,1 -k2,2n || true; }

role_of() { echo "${1%-*}"; }

start_member() {
  local m="$1" bin="$2"
  [ -f "$DIR/$m/config.toml" ] || die "no member $m in $DIR"
  if [ "$(state_of "$m")" != down ]; then return; fi
  setsid "$bin" "$(role_of "$m")" --config "$DIR/$m/config.toml" \
    >>"$DIR/$m/log" 2>&1 </dev/null &
  echo $! >"$DIR/$m/pid"
}

admin() { "$BIN" admin --metadata "$(cat "$DIR/metadata-endpoints")" --tls-dir "$DIR/admin/tls" "$@"; }

wait_for() { # description, seconds, command...
  local what="$1" secs="$2"; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out waiting for $what (logs in $DIR/*/log)"
    sleep 0.2
  done
}

# (Output captured first: with pipefail, `grep -q` closing the pipe early
# would fail the pipeline.)
metadata_ready() { local out; out="$(admin metadata status)" && grep -q 'state=Leader' <<<"$out"; }
bookies_ready() { local out; out="$(admin bookies list)" && [ "$(grep -c writable <<<"$out")" -ge "$1" ]; }
broker_ready() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_bookie_config() { # index
  local i="$1" b="$DIR/bookie-$1"
  "$BIN" tls issue --ca-dir "$DIR/ca" --out "$b/tls" >/dev/null
  echo "127.0.0.1:$((BOOKIE_BASE + i - 1))" >"$b/addr"
  echo "http://127.0.0.1:$((BOOKIE_HTTP_BASE + i - 1))" >"$b/http"
  cat >"$b/config.toml" <<EOF
listen = "127.0.0.1:$((BOOKIE_BASE + i - 1))"
http_listen = "127.0.0.1:$((BOOKIE_HTTP_BASE + i - 1))"
data_dir = "$b/data"
rack = "rack-$(( (i - 1) % 3 + 1 ))"
metadata = $(meta_list)
[tls]
dir = "$b/tls"
EOF
}

write_broker_config() { # index E Qw Qa
  local i="$1" k="$DIR/broker-$1"
  "$BIN" tls issue --ca-dir "$DIR/ca" --out "$k/tls" >/dev/null
  echo "pulsar://127.0.0.1:$((BROKER_BASE + i - 1))" >"$k/addr"
  echo "http://127.0.0.1:$((HTTP_BASE + i - 1))" >"$k/http"
  cat >"$k/config.toml" <<EOF
listen = "127.0.0.1:$((BROKER_BASE + i - 1))"
http_listen = "127.0.0.1:$((HTTP_BASE + i - 1))"
metadata = $(meta_list)
[managed_ledger]
ensemble_size = $2
write_quorum = $3
ack_quorum = $4
[tls]
dir = "$k/tls"
EOF
}

meta_list() { local e; e="$(cat "$DIR/metadata-endpoints")"; echo "[\"${e//,/\", \"}\"]"; }

write_configs() {
  local e qw qa
  IFS=, read -r e qw qa <<<"${ENSEMBLE:-$(( N_BOOKIES < 3 ? N_BOOKIES : 3 )),$(( N_BOOKIES < 2 ? N_BOOKIES : 2 )),$(( N_BOOKIES < 2 ? N_BOOKIES : 2 ))}"
  [ "$e" -le "$N_BOOKIES" ] && [ "$qw" -le "$e" ] && [ "$qa" -le "$qw" ] && [ "$qa" -ge 1 ] \
    || die "ensemble $e,$qw,$qa needs E <= bookies ($N_BOOKIES) and E >= Qw >= Qa >= 1"
  "$BIN" tls issue --ca-dir "$DIR/ca" --out "$DIR/admin/tls" >/dev/null
  local members="" endpoints="" i
  for i in $(seq 1 "$N_META"); do
    members="$members${members:+, }[$i, \"127.0.0.1:$((META_BASE + i - 1))\"]"
    endpoints="$endpoints${endpoints:+,}127.0.0.1:$((META_BASE + i - 1))"
  done
  echo "$endpoints" >"$DIR/metadata-endpoints"
  for i in $(seq 1 "$N_META"); do
    local m="$DIR/metadata-$i"
    "$BIN" tls issue --ca-dir "$DIR/ca" --out "$m/tls" >/dev/null
    echo "127.0.0.1:$((META_BASE + i - 1))" >"$m/addr"
    echo "http://127.0.0.1:$((META_HTTP_BASE + i - 1))" >"$m/http"
    cat >"$m/config.toml" <<EOF
node_id = $i
listen = "127.0.0.1:$((META_BASE + i - 1))"
http_listen = "127.0.0.1:$((META_HTTP_BASE + i - 1))"
data_dir = "$m/data"
initial_members = [$members]
[tls]
dir = "$m/tls"
EOF
  done
  for i in $(seq 1 "$N_BOOKIES"); do write_bookie_config "$i"; done
  for i in $(seq 1 "$N_BROKERS"); do write_broker_config "$i" "$e" "$qw" "$qa"; done
}

# The service URL: every broker, comma separated (any Pulsar client takes it).
service_url() {
  local hosts="" m
  for m in $(members | grep '^broker-'); do
    hosts="$hosts${hosts:+,}$(sed 's|pulsar://||' "$DIR/$m/addr")"
  done
  [ -z "$hosts" ] || echo "pulsar://$hosts"
}

case "$cmd" in
  up)
    mkdir -p "$DIR"; DIR="$(abs "$DIR")"
    BIN="$(binary)"
    if [ -z "$(members)" ]; then
      write_configs
    elif [ -n "$ENSEMBLE$MEMBER" ] || [ "$N_META$N_BOOKIES$N_BROKERS" != "331" ]; then
      echo "local-cluster: $DIR exists; starting its members as configured (sizes given now are ignored)" >&2
    fi
    for m in $(members | grep '^metadata-'); do start_member "$m" "$BIN"; done
    wait_for "a metadata leader" 60 metadata_ready
    n=0
    for m in $(members | grep '^bookie-'); do start_member "$m" "$BIN"; n=$((n + 1)); done
    wait_for "$n writable bookies" 60 bookies_ready "$n"
    for m in $(members | grep '^broker-'); do start_member "$m" "$BIN"; done
    for m in $(members | grep '^broker-'); do
      port="$(sed 's/.*://' "$DIR/$m/addr")"
      wait_for "$m" 60 broker_ready "$port"
    done
    "$0" status --dir "$DIR"
    url="$(service_url)"
    [ -z "$url" ] || echo "service URL: $url"
    ;;
  add)
    [ -d "$DIR" ] || die "no cluster in $DIR"
    DIR="$(abs "$DIR")"
    BIN="$(binary)"
    case "$MEMBER" in
      broker)
        n=$(( $(members | grep -c '^broker-' || true) + 1 ))
        first="$(members | grep '^broker-' | head -1 || true)"
        [ -n "$first" ] || die "no broker to copy the ensemble from"
        q() { sed -n "s/^$1 = //p" "$DIR/$first/config.toml"; }
        write_broker_config "$n" "$(q ensemble_size)" "$(q write_quorum)" "$(q ack_quorum)"
        start_member "broker-$n" "$BIN"
        wait_for "broker-$n" 60 broker_ready "$((BROKER_BASE + n - 1))"
        echo "broker-$n: $(cat "$DIR/broker-$n/addr") $(cat "$DIR/broker-$n/http")"
        ;;
      bookie)
        n=$(( $(members | grep -c '^bookie-' || true) + 1 ))
        write_bookie_config "$n"
        start_member "bookie-$n" "$BIN"
        wait_for "bookie-$n" 60 bookies_ready "$n"
        echo "bookie-$n: $(cat "$DIR/bookie-$n/addr")"
        ;;
      *) die "add needs broker or bookie" ;;
    esac
    ;;

  status)
    [ -d "$DIR" ] || die "no cluster in $DIR"
    DIR="$(abs "$DIR")"
    for m in $(members); do
      printf '%-12s pid=%-8s %-8s %s %s\n' "$m" "$(pid_of "$m")" "$(state_of "$m")" "$(cat "$DIR/$m/addr")" "$(cat "$DIR/$m/http" 2>/dev/null || true)"
    done
    ;;
  kill)
    [ -n "$MEMBER" ] || die "kill needs a MEMBER (see status)"
    DIR="$(abs "$DIR")"
    [ "$(state_of "$MEMBER")" != down ] || die "$MEMBER is not running"
    case "$SIGNAL" in KILL|TERM|STOP|CONT) ;; *) die "signal must be KILL, TERM, STOP or CONT" ;; esac
    kill -s "$SIGNAL" "$(pid_of "$MEMBER")"
    if [ "$SIGNAL" = KILL ] || [ "$SIGNAL" = TERM ]; then
      for _ in $(seq 1 100); do [ "$(state_of "$MEMBER")" = down ] && break; sleep 0.1; done
    fi
    echo "$MEMBER: $(state_of "$MEMBER")"
    ;;
  start)
    [ -n "$MEMBER" ] || die "start needs a MEMBER (see status)"
    DIR="$(abs "$DIR")"
    BIN="$(binary)"
    start_member "$MEMBER" "$BIN"
    sleep 0.5
    echo "$MEMBER: $(state_of "$MEMBER")"
    ;;
  down)
    [ -d "$DIR" ] || exit 0
    DIR="$(abs "$DIR")"
    # Brokers first (they close their ledgers), metadata last.
    for role in broker bookie metadata; do
      for m in $(members | grep "^$role-"); do
        pid="$(pid_of "$m")"
        case "$(state_of "$m")" in
          stopped) kill -s CONT "$pid"; kill -s TERM "$pid" ;;
          running) kill -s TERM "$pid" ;;
        esac
      done
      for m in $(members | grep "^$role-"); do
        for _ in $(seq 1 100); do [ "$(state_of "$m")" = down ] && break; sleep 0.1; done
        [ "$(state_of "$m")" = down ] || kill -s KILL "$(pid_of "$m")" 2>/dev/null || true
      done
    done
    echo "stopped; data kept in $DIR"
    ;;
  *) usage ;;
esac
