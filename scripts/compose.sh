#!/usr/bin/env bash
# Docker Compose (the `docker compose` CLI plugin) for the packaging tests
# (tests/compat/test_packaging.py runs `docker compose config` on
# deploy/compose.yaml). Debian 12 ships no Compose v2, and its Python
# docker-compose 1.29 is another implementation, so this builds the real
# one, pinned, from its Go module with the Go toolchain, into
# target/tools/docker/cli-plugins (a DOCKER_CONFIG folder). No Docker
# engine is needed: `config` only loads, validates and prints the file.
# With the plugin already built it only looks.
set -euo pipefail
cd "$(dirname "$0")/.."
version=v5.6.0
dest=target/tools/docker/cli-plugins/docker-compose
if [ -x "$dest" ] && "$dest" version --short 2>/dev/null | grep -qx "${version#v}"; then
    exit 0
fi
printf '\n== building docker compose %s (Go module github.com/docker/compose/v5)\n' "$version"
command -v go >/dev/null || { echo "scripts/compose.sh: needs the Go toolchain (go)" >&2; exit 1; }
src=$(go mod download -json "github.com/docker/compose/v5@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$src" ] || { echo "scripts/compose.sh: go mod download gave no source folder" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
# The module cache is read-only and go build wants the module as the main
# module (its go.mod has exclude directives, so `go install pkg@version`
# refuses it): build from the cached source folder itself.
(cd "$src" && GOFLAGS=-mod=readonly go build -trimpath \
    -ldflags "-w -s -X github.com/docker/compose/v5/internal.Version=$version" \
    -o "$OLDPWD/$dest.tmp" ./cmd)
mv "$dest.tmp" "$dest"
"$dest" version
