#!/usr/bin/env bash
# strait's benchmark, in one command: builds strait in release mode,
# installs the peers from their registries into bench/work, and runs every
# scenario for every setup, alternating, over several rounds. Writes
# bench/RESULTS.md and bench/results.json.
#
#   bench/run.sh                 the full run (about 25 minutes on 2 cores)
#   bench/run.sh --smoke         a few seconds per scenario, strait and the
#                                direct connection only, debug binaries; what
#                                the test command runs so the bench never rots
#   bench/run.sh --rounds 5 ...  any other option goes to bench/bench.py
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

bash scripts/need.sh iperf3 openssl taskset:util-linux
bash scripts/venv.sh

if [ "${1:-}" = "--smoke" ]; then
    shift
    out="$(mktemp -d)"
    trap 'rm -rf "$out"' EXIT
    cargo build -q -p strait-engine -p strait -p strait-bench
    exec python3 bench/bench.py --bin-dir target/debug --setups direct,strait-tls,strait-quic,strait-private,strait-private-quic,strait-sdk,strait-sdk-tls \
        --rounds 1 --seconds 1 --connections 100 --streams 50 --agents 20 --out "$out" \
        --command "bench/run.sh --smoke" "$@"
fi

log "release build"
cargo build --release -p strait-engine -p strait -p strait-bench

log "peers (bench/work/bin)"
peers=bench/work
# rathole does not build with --locked on this toolchain; bore does.
[ -x $peers/bin/rathole ] || cargo install --root $peers rathole
[ -x $peers/bin/bore ] || cargo install --locked --root $peers bore-cli

log "running (the machine should be otherwise idle)"
exec python3 bench/bench.py --command "bench/run.sh${*:+ $*}" "$@"
