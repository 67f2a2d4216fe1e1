#!/usr/bin/env bash
# The project's test command: the whole Rust test suite, then the
# compatibility test with the official Python pulsar-client (installed into
# .venv by this script).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --bins
cargo test --workspace

scripts/compat-python.sh
