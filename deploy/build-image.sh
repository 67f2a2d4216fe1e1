#!/usr/bin/env bash
# Builds the container image of every role (`magnetar metadata|bookie|broker`)
# from our own binary: FROM scratch with the binary, stripped, and the shared
# libraries it links (found with ldd) — nothing is pulled from a registry.
#
#   deploy/build-image.sh [--debug] [--tag magnetar:local]
#
# --debug uses target/debug/magnetar (what the test suite builds; CI's chaos
# run uses it), otherwise target/release/magnetar. $MAGNETAR_BIN overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release; tag=magnetar:local
while [ $# -gt 0 ]; do
  case "$1" in
    --debug) profile=debug; shift ;;
    --tag) tag="$2"; shift 2 ;;
    *) echo "usage: $0 [--debug] [--tag TAG]" >&2; exit 2 ;;
  esac
done
if [ -n "${MAGNETAR_BIN:-}" ]; then
  bin="$MAGNETAR_BIN"
else
  # Always through cargo (a no-op when fresh): an image of a stale binary
  # would test yesterday's code.
  bin="${CARGO_TARGET_DIR:-target}/$profile/magnetar"
  if [ "$profile" = release ]; then cargo build --release --bin magnetar; else cargo build --bin magnetar; fi
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/tmp" "$root/data" "$root/etc"
cp "$bin" "$root/magnetar"
strip --strip-debug "$root/magnetar" 2>/dev/null || true
# The libraries and the dynamic loader, at the paths the binary asks for.
for lib in $(ldd "$bin" | awk '/=>/ { print $3 } /^[[:space:]]*\/.*ld-linux/ { print $1 }'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/magnetar\n' >"$root/etc/passwd"
cp deploy/docker/Dockerfile "$ctx/Dockerfile"
docker build --quiet -t "$tag" "$ctx" >/dev/null
echo "$tag ($(du -sh "$root" | cut -f1) root filesystem from $bin)"
