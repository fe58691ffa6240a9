#!/usr/bin/env bash
# strait's benchmark, in one command: builds strait in release mode,
# installs the peers (rathole, bore, frp) from their registries into
# bench/work and the chatty rows' Redis and PostgreSQL from Debian, and runs every
# scenario for every setup, alternating, over several rounds. Writes
# bench/RESULTS.md and bench/results.json.
#
#   bench/run.sh                 the full run (about 25 minutes on 2 cores
#                                before frp and the chatty, UDP and
#                                published TCP/UDP rows came; longer now)
#   bench/run.sh --smoke         a few seconds per scenario, strait and the
#                                direct connection only (and nginx's cache
#                                when nginx is there), debug binaries; what
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
    exec python3 bench/bench.py --bin-dir target/debug --setups direct,strait-tls,strait-quic,strait-private,strait-private-quic,strait-tcp,strait-sdk,strait-sdk-tls,nginx-cache \
        --rounds 1 --seconds 1 --connections 100 --streams 50 --agents 20 --udp-rates 100M --cache-object-mib 8 --out "$out" \
        --command "bench/run.sh --smoke" "$@"
fi

log "release build"
cargo build --release -p strait-engine -p strait -p strait-bench

log "peers (bench/work/bin)"
peers=bench/work
# rathole does not build with --locked on this toolchain; bore does.
[ -x $peers/bin/rathole ] || cargo install --root $peers rathole
[ -x $peers/bin/bore ] || cargo install --locked --root $peers bore-cli
# frp through the Go module proxy. `go install ...@v0.65.0` first; where the
# proxy serves the version but refuses the module's version list (which
# go install reads for deprecation notices), a throwaway module pinned to
# the same version builds the same two packages.
frp=github.com/fatedier/frp
if ! [ -x $peers/bin/frps ] || ! [ -x $peers/bin/frpc ]; then
    gobin="$PWD/$peers/bin"
    if ! GOBIN="$gobin" go install $frp/cmd/frps@v0.65.0 $frp/cmd/frpc@v0.65.0; then
        mod="$(mktemp -d)"
        (cd "$mod" && go mod init strait-bench-frp >/dev/null &&
            go get $frp/cmd/frps@v0.65.0 $frp/cmd/frpc@v0.65.0 &&
            GOBIN="$gobin" go install $frp/cmd/frps $frp/cmd/frpc)
        rm -rf "$mod"
    fi
fi
# The chatty rows' servers and clients (Debian's redis-server brings
# redis-benchmark; postgresql brings initdb, postgres and pgbench).
# Debian keeps initdb off PATH, under /usr/lib/postgresql/VERSION/bin.
bash scripts/need.sh redis-benchmark:redis-server
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || bash scripts/need.sh initdb:postgresql
# The edge-cache rows' reference, nginx's proxy_cache.
bash scripts/need.sh nginx

log "running (the machine should be otherwise idle)"
exec python3 bench/bench.py --command "bench/run.sh${*:+ $*}" "$@"
