#!/usr/bin/env bash
# The Python venv with the reference rstream SDK and the test tools, pinned
# in tests/compat/requirements.txt; rebuilt only when that file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! cmp -s tests/compat/requirements.txt .venv/requirements.txt; then
    printf '\n== preparing the Python venv (tests/compat/requirements.txt)\n'
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/compat/requirements.txt
    cp tests/compat/requirements.txt .venv/requirements.txt
fi
