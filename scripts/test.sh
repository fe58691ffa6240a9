#!/usr/bin/env bash
# The whole test suite, as CI runs it: tools, Rust tests, the compatibility
# suite against the official rstream Python SDK.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# Every stage runs under a time limit (coreutils timeout), so a hang fails
# fast and names its stage instead of stalling CI. The limits are several
# times what a stage takes on 2 cores from a cold cache, and all of them
# together are capped by BUDGET, so the whole run ends well within 40
# minutes whatever hangs.
BUDGET=${STRAIT_TEST_BUDGET:-2100}
started=$SECONDS

# A stage runs as a job of its own (set -m: its own process group, so a
# timeout stops every process of it, cargo's and pytest's children too).
# Ctrl-C reaches only this script, which stops the stage in flight.
running=""
# How long each stage took, printed at the end (and on failure), so the
# budget's headroom is visible in every CI log.
timings=()
print_timings() {
    printf '\n== stage timings\n'
    printf '%s\n' "${timings[@]}"
}
trap print_timings EXIT
interrupted() {
    if [ -n "$running" ]; then
        kill -TERM -- "-$running" 2>/dev/null || true
        wait "$running" || true
    fi
    printf '\n== interrupted\n' >&2
    exit 130
}
trap interrupted INT TERM

# stage [--tty] NAME SECONDS COMMAND...
# --tty: the stage may ask on the terminal (sudo's password), so it stays in
# the foreground; a timeout then stops its first process only.
stage() {
    local tty=""
    if [ "$1" = --tty ]; then
        tty=1
        shift
    fi
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - started)))
    ((left < limit)) && limit=$left
    if ((limit <= 0)); then
        printf '\n== TIMED OUT: no time left of the %ss budget for stage "%s"\n' "$BUDGET" "$name" >&2
        return 124
    fi
    log "$name"
    local status=0 stage_started=$SECONDS
    if [ -n "$tty" ]; then
        timeout --foreground --kill-after=30 "$limit" "$@" || status=$?
    else
        set -m
        timeout --kill-after=30 "$limit" "$@" &
        running=$!
        set +m
        wait "$running" || status=$?
        running=""
    fi
    if ((status == 124 || status == 137)); then
        printf '\n== TIMED OUT: stage "%s" did not finish in %ss\n' "$name" "$limit" >&2
    fi
    timings+=("$(printf '%5ss  %s' "$((SECONDS - stage_started))" "$name")")
    return "$status"
}

# System tools the tests drive (openssl s_client, curl, jq; iperf3 for the
# benchmark smoke run; strace and ip netns for the air-gapped proof, unshare
# for strait doctor's private /etc/hosts).
stage --tty "tools (openssl, curl, jq, iperf3, strace, ip, unshare)" 900 bash scripts/need.sh openssl curl jq iperf3 \
    strace ip:iproute2 unshare:util-linux
# The real software the published TCP and UDP proofs drive
# (tests/compat/test_published_ports.py): RTMP through nginx's RTMP module,
# SRT through srt-live-transmit, ffmpeg/ffprobe to send and check the
# streams, and an sshd with its client. nginx also serves the Rend recipe's
# UI and HLS origin (examples/rend, tests/compat/test_recipe_rend.py). need.sh installs only what is
# missing; the RTMP module has no command of its own, so its load_module
# file stands for it.
stage --tty "tools (ffmpeg, nginx-rtmp, srt-tools, openssh)" 900 bash scripts/need.sh \
    ffmpeg ffprobe:ffmpeg nginx /usr/lib/nginx/modules/ngx_rtmp_module.so:libnginx-mod-rtmp \
    srt-live-transmit:srt-tools sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client
# The packaging tests (tests/compat/test_packaging.py): systemd-analyze on
# the unit, setpriv and useradd to start the engine as the unit's user,
# ldd on the binary the image ships; and the real `docker compose` (its
# `config` needs no Docker engine), built from its pinned Go module.
stage --tty "tools (systemd-analyze, setpriv, useradd, ldd)" 900 bash scripts/need.sh \
    systemd-analyze:systemd setpriv:util-linux useradd:passwd ldd:libc-bin
stage "tools (docker compose, built from its Go module)" 900 bash scripts/compose.sh
stage "Python venv" 600 bash scripts/venv.sh

stage "building" 1200 cargo build --workspace --all-targets

stage "style (rustfmt)" 120 cargo fmt --all --check
stage "style (clippy)" 900 cargo clippy --workspace --all-targets --quiet -- -D warnings

stage "Rust tests" 900 cargo test --workspace

stage "release build (the quickstart test runs README's command on it; the soak and scale smokes too)" 1200 \
    cargo build --release -p strait-engine -p strait -p strait-bench

# pytest-timeout bounds each test too (tests/compat/pytest.ini).
stage "compatibility suite (rstream Python SDK)" 1200 \
    env STRAIT_BIN_DIR="$PWD/target/debug" .venv/bin/python -m pytest tests/compat -q -p no:cacheprovider

stage "benchmark smoke run (bench/run.sh --smoke: every scenario, briefly, no peers)" 600 \
    bash bench/run.sh --smoke

# bench/SOAK.md: the hour-long soak and the 10,000-agent run, briefly.
stage "soak smoke (bench/soak.py --seconds 60: churn, kill -9, cuts, 1 GiB transfers, back to baseline)" 300 \
    python3 bench/soak.py --seconds 60 --out target/soak-smoke
stage "scale smoke (bench/scale.py --agents 300: connect, engine restart, reconnect storm)" 180 \
    python3 bench/scale.py --agents 300 --forwards 10 --settle 2 --out target/scale-smoke

stage "fuzz smoke run (scripts/fuzz.sh: every target for 10s on a debug build; the long runs are in fuzz/RESULTS.md)" 900 \
    bash scripts/fuzz.sh --smoke-build --seconds 10

log "all stages passed in $((SECONDS - started))s"
