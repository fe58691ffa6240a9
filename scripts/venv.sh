#!/usr/bin/env bash
# The Python venv with the reference rstream SDK and the test tools, pinned
# in tests/compat/requirements.txt; rebuilt only when that file changes.
# Beside it, the SDK's source distribution of the same pinned version, whose
# tests/e2e/test_real_engine.py the compatibility suite runs against strait
# (tests/compat/test_sdk_real_engine.py); fetched once per version.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! cmp -s tests/compat/requirements.txt .venv/requirements.txt; then
    printf '\n== preparing the Python venv (tests/compat/requirements.txt)\n'
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/compat/requirements.txt
    cp tests/compat/requirements.txt .venv/requirements.txt
fi
sdk=$(grep -E '^rstreamlabs-rstream==' tests/compat/requirements.txt)
version=${sdk#*==}
sdist=.venv/sdist/rstreamlabs_rstream-$version
if [ ! -f "$sdist/tests/e2e/test_real_engine.py" ]; then
    printf '\n== fetching the SDK source distribution (%s)\n' "$sdk"
    rm -rf .venv/sdist
    mkdir -p .venv/sdist
    .venv/bin/pip download -q --disable-pip-version-check --no-binary :all: --no-deps -d .venv/sdist "$sdk"
    tar -xzf .venv/sdist/rstreamlabs_rstream-"$version".tar.gz -C .venv/sdist
    test -f "$sdist/tests/e2e/test_real_engine.py"
fi
