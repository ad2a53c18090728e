# syntax=docker/dockerfile:1
# UniModel server image: `docker build -t unimodel .` at the repository root.
#
# Stage 1 builds the release binary on Debian's Rust image (the SDK is embedded in the
# binary: no Python packaging step). Stage 2 is slim Debian with python3 and the SDK's two
# dependencies from Debian packages (deploy/docker/runtime-packages.txt), a non-root user,
# the model repository volume /models and a HEALTHCHECK on readiness.
# scripts/check-deploy.sh builds the same runtime root filesystem without a Docker daemon
# (mmdebstrap) from the same two files and runs the binary in it; see docs/cluster.md
# "Deployment".

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# Only what `cargo build -p unimodel` reads (workspace manifests, the crate, its protos and
# the embedded SDK), so editing docs or tests does not rebuild.
COPY Cargo.toml Cargo.lock ./
COPY core core
COPY benches benches
COPY proto proto
COPY python/unimodel python/unimodel
# Cache mounts keep the registry and the incremental target dir between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p unimodel \
    && install -D -m 0755 target/release/unimodel /out/unimodel

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# A failing command inside a pipe fails the build.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY deploy/docker/runtime-packages.txt deploy/docker/setup-runtime.sh /tmp/setup/
COPY plugins/examples /tmp/setup/examples
RUN apt-get update \
    && grep -v '^#' /tmp/setup/runtime-packages.txt \
       | xargs apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* \
    && sh /tmp/setup/setup-runtime.sh /tmp/setup/examples \
    && rm -rf /tmp/setup
COPY deploy/docker/healthcheck.py deploy/docker/seed-examples.sh /usr/local/lib/unimodel/
COPY --from=builder /out/unimodel /usr/local/bin/unimodel

# The workers run Debian's python3, which has numpy and msgpack (no virtualenv, no pip at
# start); the SDK unpacks into the user's cache dir.
ENV UNIMODEL_PYTHON=/usr/bin/python3 \
    UNIMODEL_CACHE_DIR=/var/cache/unimodel
USER 10001:10001
WORKDIR /home/unimodel
VOLUME ["/models"]
# HTTP (KServe V2 REST, /metrics), gRPC, and the separate metrics port of the default command.
EXPOSE 8000 8001 8002
# Readiness, not liveness: a node is healthy once its models are loaded. For another --port
# set UNIMODEL_HEALTH_PORT (or UNIMODEL_HEALTH_URL); with TLS on, point it at https.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/usr/local/lib/unimodel/healthcheck.py"]
ENTRYPOINT ["unimodel"]
# A node serving the repository on /models. Cluster flags (--etcd, --nats, --node-name,
# --advertise-url) are added by compose and the Helm chart; `gateway ...` runs the gateway.
CMD ["serve", "--model-repository", "/models", "--host", "0.0.0.0", "--metrics-port", "8002"]
