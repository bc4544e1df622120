# syntax=docker/dockerfile:1
#
# wsgate container image: multi-stage build, distroless non-root runtime.
#
#   docker build -t wsgate .
#
#   # Public WebSocket/HTTP port only; the admin listener stays inside the
#   # container on 127.0.0.1:9090 (the default):
#   docker run --rm -p 8080:8080 --stop-timeout 30 wsgate
#
#   # With your own configuration (mounted read-only over the baked-in one):
#   docker run --rm -p 8080:8080 --stop-timeout 30 \
#     -v "$PWD/wsgate.toml:/etc/wsgate/wsgate.toml:ro" wsgate
#
# Listen addresses: inside a container the public listener must bind
# 0.0.0.0:8080 (not 127.0.0.1), or `-p 8080:8080` reaches nothing. Check the
# `listen` setting of the config you bake in or mount.
#
# Admin listener (/metrics and the admin API): 127.0.0.1:9090 by default, so
# it is NOT reachable from outside the container and is deliberately not
# EXPOSEd. To scrape it from outside, bind it to 0.0.0.0:9090 in the config.
# The daemon refuses a non-loopback admin listen address unless [admin] token
# or token_file is set, so also mount a token, e.g.:
#
#   # wsgate.toml:  [admin]
#   #               listen = "0.0.0.0:9090"
#   #               token_file = "/run/secrets/wsgate_admin_token"
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 --stop-timeout 30 \
#     -v "$PWD/wsgate.toml:/etc/wsgate/wsgate.toml:ro" \
#     -v "$PWD/admin.token:/run/secrets/wsgate_admin_token:ro" wsgate
#
# (the token file must be readable by uid 65532; `-p 127.0.0.1:9090:9090`
# keeps the host side on loopback as well.)
#
# Stopping: SIGTERM starts a graceful drain bounded by drain_timeout (10s by
# default). Docker's default stop timeout is also 10s, after which it sends
# SIGKILL mid-drain: give it more (`--stop-timeout 30`, compose
# `stop_grace_period: 30s`, Kubernetes `terminationGracePeriodSeconds: 30`).
#
# Health: there is no HEALTHCHECK instruction because the distroless runtime
# has no shell, curl or wget to run one. Orchestrators should probe
# `GET /healthz` on the public port (8080) instead: 200 while serving, 503
# while draining (e.g. a Kubernetes readinessProbe/livenessProbe with
# httpGet path /healthz port 8080).
#
# systemd notification (READY=1/STOPPING=1) is not used in a container:
# NOTIFY_SOCKET is unset there.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------
# skeleton: every manifest of the workspace (root package and any member such
# as bench/) plus an empty stub for every target source file cargo knows
# about. Its output only changes when manifests or the list of targets
# change, so the dependency layer below stays cached across source edits.
# ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS skeleton
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY . .
RUN set -eu; \
    mkdir -p /skeleton; \
    cp Cargo.lock /skeleton/; \
    for f in Cargo.toml rust-toolchain rust-toolchain.toml .cargo/config .cargo/config.toml; do \
        if [ -f "$f" ]; then mkdir -p "/skeleton/$(dirname "$f")"; cp "$f" "/skeleton/$f"; fi; \
    done; \
    meta="$(cargo metadata --offline --no-deps --format-version 1)"; \
    for m in $(printf '%s' "$meta" | grep -o '"manifest_path":"[^"]*"' | cut -d'"' -f4); do \
        rel="${m#/src/}"; mkdir -p "/skeleton/$(dirname "$rel")"; cp "$m" "/skeleton/$rel"; \
    done; \
    for s in $(printf '%s' "$meta" | grep -o '"src_path":"[^"]*"' | cut -d'"' -f4); do \
        rel="${s#/src/}"; mkdir -p "/skeleton/$(dirname "$rel")"; \
        echo 'fn main() {}' > "/skeleton/$rel"; \
    done; \
    find /skeleton -type f | sort

# ---------------------------------------------------------------------------
# builder
# ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src

# 1. Dependencies only, against the stubbed workspace (cached layer).
COPY --from=skeleton /skeleton/ ./
RUN cargo build --release --locked --bin wsgate

# 2. The real sources. Touch every .rs file so cargo's mtime-based
#    fingerprints never mistake the stub build for an up-to-date one (COPY
#    keeps the build context's, possibly older, mtimes).
COPY . .
RUN find . -path ./target -prune -o -name '*.rs' -type f -exec touch {} + \
 && cargo build --release --locked --bin wsgate \
 && install -D -m 0755 target/release/wsgate /out/usr/local/bin/wsgate

# ---------------------------------------------------------------------------
# runtime: glibc + libgcc, no shell, no package manager, uid/gid 65532.
# ---------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}

COPY --from=builder /out/usr/local/bin/wsgate /usr/local/bin/wsgate
# Baked-in default configuration; mount your own over it (read-only).
COPY --chown=0:0 --chmod=0644 config/wsgate.toml /etc/wsgate/wsgate.toml

# Numeric so Kubernetes' runAsNonRoot can verify it (65532 = distroless nonroot).
USER 65532:65532

# Public WebSocket + proxied HTTP port. The admin port (9090) is deliberately
# not exposed: see the header comment.
EXPOSE 8080

# SIGTERM = graceful drain (the default stop signal, stated for clarity).
STOPSIGNAL SIGTERM

ENTRYPOINT ["/usr/local/bin/wsgate"]
CMD ["--config", "/etc/wsgate/wsgate.toml"]
