#!/usr/bin/env bash
# Installs, from Debian's packages, whichever of the named commands are
# missing. An argument is COMMAND or COMMAND:PACKAGE.
set -euo pipefail
missing=()
for want in "$@"; do
    command -v "${want%%:*}" >/dev/null 2>&1 || missing+=("${want#*:}")
done
if ((${#missing[@]})); then
    printf '\n== installing %s\n' "${missing[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
