# The telemetry-sink image. Build:   docker build -t telemetry-sink .
#                           Run:     docker run -p 8000:8000 -v "$PWD/data:/var/lib/sink" telemetry-sink
# (docs/containers.md). Plain Dockerfile syntax, nothing BuildKit-only,
# so podman/buildah and the classic builder build it too; with podman, pass
# `--format docker` or the HEALTHCHECK is dropped (OCI images have no field for it).

# The toolchain the project is tested with (rust-version in Cargo.toml is the minimum).
ARG RUST_VERSION=1.95
# Where the two base images (rust, debian) are pulled from. Docker Hub by
# default; a mirror or pull-through cache that keeps Docker Hub's paths
# (`library/rust`, `library/debian`) with --build-arg BASE_REGISTRY=mirror.example.com.
ARG BASE_REGISTRY=docker.io

FROM ${BASE_REGISTRY}/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# Only the `sink` binary, from the lock file the repository tests with.
RUN cargo build --release --locked -p sink --bin sink \
 && install -D -m 0755 target/release/sink /out/sink

# Runtime: debian:bookworm-slim rather than distroless, because `kubectl cp`
# (how the original's users fetch the files) runs `tar` inside the container,
# and distroless has no tar (nor a shell for `kubectl exec`). Same Debian
# release as the builder, so the binary finds the glibc it was linked against.
FROM ${BASE_REGISTRY}/library/debian:bookworm-slim

ARG VERSION=0.1.0
ARG REVISION=
ARG SOURCE_URL=
LABEL org.opencontainers.image.title="telemetry-sink" \
      org.opencontainers.image.description="Receives sensor readings over gRPC (sensor.v1.SensorService) and writes them out, through the pipeline declared in one TOML file" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric user (Kubernetes' runAsNonRoot can only verify a numeric
# USER), owning the one writable directory.
RUN groupadd --system --gid 10001 sink \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sink --no-create-home \
      --shell /usr/sbin/nologin sink \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/sink

COPY --from=builder /out/sink /usr/local/bin/sink
COPY pipelines/default.toml pipelines/fanout.toml pipelines/original-env.toml /etc/sink/

# The default pipeline is the original's, configured by its environment
# variables (`docker run --env-file .env` works unchanged), with the two
# defaults a container needs: listen on every interface, write on the volume.
# The working directory is the volume too, so a relative FILE_PATH (the
# original's default `.`) lands there. `sink validate`, `sink health` and
# `sink run` all read SINK_PIPELINE.
ENV SINK_PIPELINE=/etc/sink/original-env.toml \
    GRPC_SERVER_SOCKET=0.0.0.0:8000 \
    FILE_PATH=/var/lib/sink
WORKDIR /var/lib/sink
VOLUME ["/var/lib/sink"]
USER 10001:10001
EXPOSE 8000

# SIGTERM drains: sources stop accepting, every stage flushes, exit 0. The
# drain may take up to settings.shutdown_timeout (30 s by default), longer than
# `docker stop`'s default 10 s before SIGKILL: give `--stop-timeout` (or
# compose's stop_grace_period) more than shutdown_timeout.
STOPSIGNAL SIGTERM

# Asks the gRPC health service of every grpc source in the pipeline, on
# loopback; needs no tool besides the binary.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/sink", "health"]

ENTRYPOINT ["/usr/local/bin/sink"]
CMD ["run"]
