#!/usr/bin/env bash
# The chaos suite against the compose cluster (deploy/docker-compose.yml):
# builds the magnetar:local image from our binary, starts 3 metadata nodes,
# 3 bookies and 2 brokers, breaks them on purpose while producers write
# (kill -9, pause past the lease, network partitions, rolling restarts,
# scale out and in, the metadata leader killed), heals, drains and judges
# with the queue checker (tests/tests/chaos.rs). Prints the verdict and a
# table of faults, messages acknowledged, lost, duplicated, reordered and
# each topic's longest unavailability.
#
#   deploy/chaos.sh [--duration 4m|2h] [--seed N] [--release] [--keep]
#
# CI runs a short schedule (--duration 4m, the debug binary); soaks use a
# longer one with --release (the image from the release binary). --keep leaves the cluster up afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=4m; seed=1; profile=--debug
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --release) profile=""; shift ;;
    --keep) export MAGNETAR_CHAOS_KEEP=1; shift ;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
deploy/build-image.sh $profile
# The checker itself is a test of the (debug) test crate, whatever the image.
MAGNETAR_CHAOS_DURATION="$duration" MAGNETAR_CHAOS_SEED="$seed" \
  cargo test -p magnetar-tests --test chaos -- --ignored --nocapture
