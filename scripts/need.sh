#!/usr/bin/env bash
# Installs, from Debian's packages, whichever of the named commands are
# missing. An argument is COMMAND or COMMAND:PACKAGE; a COMMAND with a slash
# is a file the package ships (for packages without a command of their own,
# such as an nginx module). Commands in /usr/sbin count when PATH lacks it.
# With everything present it only looks, so a second run takes no time.
set -euo pipefail
missing=()
for want in "$@"; do
    have=${want%%:*}
    if [[ $have == */* ]]; then
        [ -e "$have" ] && continue
    else
        command -v "$have" >/dev/null 2>&1 && continue
        [ -x "/usr/sbin/$have" ] && continue
    fi
    missing+=("${want#*:}")
done
if ((${#missing[@]})); then
    printf '\n== installing %s\n' "${missing[*]}"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
