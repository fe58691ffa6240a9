#!/usr/bin/env bash
# Runs the libFuzzer targets of fuzz/ with their kept corpus.
#
#   scripts/fuzz.sh [--seconds N] [--merge] [--smoke-build] [TARGET...]
#
# Each named target (all by default) runs for N seconds (default 60), from
# its kept corpus fuzz/corpus/<target> (read, never written) and the
# scratch corpus fuzz/scratch/<target> (git-ignored), where new finds go.
# --merge adds the finds that bring new coverage to the kept corpus
# afterwards (libFuzzer -merge=1). --smoke-build builds without
# optimisation or AddressSanitizer: a third of the build time, for the
# short runs of the test command.
#
# A crash, leak, timeout (-timeout per input) or out-of-memory
# (-rss_limit_mb) fails the run; the input is in fuzz/artifacts/<target>/
# and fuzz/README.md says how to replay it. One summary line per target:
# executions, exec/s, cov and ft (libFuzzer's final stats), corpus size,
# crashes.
#
# cargo-fuzz comes from crates.io into cargo's own bin directory on first
# use (so every checkout on the machine shares it); on the stable toolchain
# RUSTC_BOOTSTRAP=1 lets it pass nightly-only flags.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.1
# Memory and time per input: far above what any target needs, far below
# what the machine has.
RSS_LIMIT_MB=2048
TIMEOUT_SECONDS=10

SECONDS_EACH=60
MERGE=0
SMOKE=0
TARGETS=()
while (($#)); do
    case "$1" in
        --seconds) SECONDS_EACH="$2"; shift 2 ;;
        --merge) MERGE=1; shift ;;
        --smoke-build) SMOKE=1; shift ;;
        -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) TARGETS+=("$1"); shift ;;
    esac
done

ALL=()
for f in fuzz/fuzz_targets/*.rs; do ALL+=("$(basename "$f" .rs)"); done
((${#TARGETS[@]})) || TARGETS=("${ALL[@]}")
for t in "${TARGETS[@]}"; do
    [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz.sh: no target $t (targets: ${ALL[*]})" >&2; exit 2; }
done

export RUSTC_BOOTSTRAP=1
TOOLS="${CARGO_HOME:-$HOME/.cargo}"
CARGO_FUZZ="$TOOLS/bin/cargo-fuzz"
if ! "$CARGO_FUZZ" --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
    printf '== installing cargo-fuzz %s into %s/bin\n' "$CARGO_FUZZ_VERSION" "$TOOLS"
    nice -n 15 cargo install --quiet --locked --root "$TOOLS" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
if ((SMOKE)); then
    BUILD=(--dev --sanitizer none)
    BIN="fuzz/target/$TRIPLE/debug"
else
    BUILD=(--release --sanitizer address)
    BIN="fuzz/target/$TRIPLE/release"
fi
start=$SECONDS
if ((${#TARGETS[@]} == ${#ALL[@]})); then
    nice -n 15 "$CARGO_FUZZ" build --fuzz-dir fuzz "${BUILD[@]}"
else
    for t in "${TARGETS[@]}"; do nice -n 15 "$CARGO_FUZZ" build --fuzz-dir fuzz "${BUILD[@]}" "$t"; done
fi
printf '== fuzz build (%s): %ds\n' "$( ((SMOKE)) && echo smoke || echo release+ASan)" $((SECONDS - start))

# The last value of `key: N` in libFuzzer's status lines.
last_stat() { grep -aoE "$1: [0-9]+" "$2" | tail -1 | grep -oE '[0-9]+' || echo "?"; }
final_stat() { sed -n "s/^stat::$1: *//p" "$2" | tail -1; }

failed=0
summary=()
mkdir -p fuzz/logs
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/scratch/$t" "fuzz/artifacts/$t"
    log="fuzz/logs/$t.log"
    marker="$(mktemp)"
    args=(
        -max_total_time="$SECONDS_EACH" -rss_limit_mb="$RSS_LIMIT_MB" -timeout="$TIMEOUT_SECONDS"
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/"
    )
    [ -f "fuzz/dict/$t.dict" ] && args+=(-dict="fuzz/dict/$t.dict")
    printf '== fuzzing %s for %ss\n' "$t" "$SECONDS_EACH"
    rc=0
    # The outer timeout catches a hang libFuzzer's own timer would not
    # (one before the first input, say).
    timeout --kill-after=10 $((SECONDS_EACH + 300)) \
        nice -n 15 "$BIN/$t" "${args[@]}" "fuzz/scratch/$t" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
    crashes=$(find "fuzz/artifacts/$t" -type f -newer "$marker" \
        \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    rm -f "$marker"
    if ((MERGE && rc == 0)); then
        before=$(find "fuzz/corpus/$t" -type f | wc -l)
        nice -n 15 "$BIN/$t" -merge=1 -rss_limit_mb="$RSS_LIMIT_MB" -timeout="$TIMEOUT_SECONDS" \
            "fuzz/corpus/$t" "fuzz/scratch/$t" >>"$log" 2>&1 || rc=$?
        printf '   merged %d new inputs into fuzz/corpus/%s\n' $(($(find "fuzz/corpus/$t" -type f | wc -l) - before)) "$t"
    fi
    kept=$(find "fuzz/corpus/$t" -type f | wc -l)
    scratch=$(find "fuzz/scratch/$t" -type f | wc -l)
    line=$(printf '%-15s %5ss  execs %10s  exec/s %7s  cov %6s  ft %6s  corpus %6s (kept %s, scratch %s)  crashes %s' \
        "$t" "$SECONDS_EACH" "$(final_stat number_of_executed_units "$log")" "$(final_stat average_exec_per_sec "$log")" \
        "$(last_stat cov "$log")" "$(last_stat ft "$log")" "$(grep -aoE 'corp: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo '?')" \
        "$kept" "$scratch" "$crashes")
    if ((rc != 0 || crashes != 0)); then
        failed=1
        line="$line  FAILED (exit $rc)"
        echo "---- $log (tail)"
        tail -40 "$log"
        echo "----"
    fi
    echo "$line"
    summary+=("$line")
done

printf '\n== fuzz summary (%ss per target, %s)\n' "$SECONDS_EACH" "$( ((SMOKE)) && echo smoke build || echo release+ASan build)"
printf '%s\n' "${summary[@]}"
if ((failed)); then
    echo "fuzz.sh: a target failed; replay its input with: $BIN/<target> fuzz/artifacts/<target>/<file>" >&2
    exit 1
fi
