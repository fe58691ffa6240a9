# syntax=docker/dockerfile:1
# strait-engine and the strait CLI in a minimal image: built on Debian 12
# (bookworm), run on distroless/cc-debian12 (glibc, libgcc and CA
# certificates; no shell, no package manager) as the non-root user 65532.
# The engine reads the rstream CE layout: /etc/rstream/engine.yaml and the
# certificate pair in /etc/rstream/tls/ (see deploy/compose.yaml).
#
#   docker build -t strait-engine .
#   docker run --rm strait-engine check-config      # any subcommand after the entry point
#   docker run --rm --entrypoint strait strait-engine token --help

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p strait-engine -p strait \
    && install -D -m 0755 -t /out target/release/strait-engine target/release/strait

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/strait-engine /out/strait /usr/local/bin/
# Ports below 1024 without root: Docker (20.10 and later) sets
# net.ipv4.ip_unprivileged_port_start=0 in a container's network namespace;
# deploy/compose.yaml sets it explicitly.
USER 65532:65532
EXPOSE 80/tcp 443/tcp 443/udp 9090/tcp
ENTRYPOINT ["/usr/local/bin/strait-engine", "--config", "/etc/rstream/engine.yaml"]
