#!/usr/bin/env bash
# The whole test suite, as CI runs it: tools, Rust tests, the compatibility
# suite against the official rstream Python SDK.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# System tools the tests drive (openssl s_client, curl).
missing=()
for tool in openssl curl jq; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Python venv with the reference SDK, pinned.
if [ ! -x .venv/bin/python ] || ! cmp -s tests/compat/requirements.txt .venv/requirements.txt; then
    log "preparing the Python venv (tests/compat/requirements.txt)"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/compat/requirements.txt
    cp tests/compat/requirements.txt .venv/requirements.txt
fi

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
