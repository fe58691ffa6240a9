#!/usr/bin/env bash
# The whole test suite, as CI runs it: tools, Rust tests, the compatibility
# suite against the official rstream Python SDK.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# System tools the tests drive (openssl s_client, curl, jq; iperf3 for the
# benchmark smoke run).
bash scripts/need.sh openssl curl jq iperf3
bash scripts/venv.sh

log "building"
cargo build --workspace --all-targets

log "style (rustfmt, clippy)"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

log "Rust tests"
cargo test --workspace

log "release build (the quickstart test runs README's command on it)"
cargo build --release -p strait-engine

log "compatibility suite (rstream Python SDK)"
STRAIT_BIN_DIR="$PWD/target/debug" .venv/bin/python -m pytest tests/compat -q -p no:cacheprovider

log "benchmark smoke run (bench/run.sh --smoke: every scenario, briefly, no peers)"
bash bench/run.sh --smoke

log "fuzz smoke run (scripts/fuzz.sh: every target for 10s on a debug build; the long runs are in fuzz/RESULTS.md)"
bash scripts/fuzz.sh --smoke-build --seconds 10
