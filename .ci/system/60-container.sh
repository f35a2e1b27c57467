#!/usr/bin/env bash
# System test of the container image (issue 14): builds the repository's
# Dockerfile, unchanged, with podman, runs the image and checks it end to end.
#
# No container registry is reachable here, so the two base images the
# Dockerfile names are made locally first, with mmdebstrap, and tagged with
# exactly those names:
#   - the builder (docker.io/library/rust:<v>-bookworm): a Debian rootfs with
#     gcc, plus this machine's Rust toolchain (~/.rustup, ~/.cargo/bin) laid
#     out as the official image lays it out, plus this machine's proxy CA
#     certificates so that cargo inside the build reaches crates.io like the
#     host does. The certificates go into this stand-in image only, never into
#     the project's Dockerfile.
#   - the runtime (docker.io/library/debian:bookworm-slim): a minbase rootfs
#     with documentation left out, as the slim image does.
# Stand-ins already made by an earlier run are reused; SINK_CI_REBUILD_BASE=1
# makes them again.
#
# Then, with the image built (the release build inside it is most of this
# script's time), it checks:
#   1. image defaults, read-only root filesystem, a volume: readings sent over
#      gRPC are all in the file on the volume after `podman stop`; the process
#      ran as uid 10001; it exited 0 having drained; `podman healthcheck run`
#      says healthy; the labels and the HEALTHCHECK are in the image;
#   2. the original's way: `--env-file` with an original-style .env.
source "$(dirname "$0")/lib.sh"

apt_install podman runc mmdebstrap
for tool in podman runc mmdebstrap cargo python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed: the container test cannot run"
done

IMAGE=localhost/telemetry-sink:ci
WORK=$(mktemp -d /tmp/sink-container-ci.XXXXXX)
CONTAINERS=()
# The disk is shared: the build's intermediate images (the builder stage with
# its target directory is about 2 GB) and the tested image go at the end. The
# two base images stay, for the next run.
cleanup() {
  for name in "${CONTAINERS[@]}"; do
    podman --runtime runc rm -f -t 0 "$name" >/dev/null 2>&1 || true
  done
  podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
  podman image prune -f >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
podman_() { podman --runtime runc "$@"; }

# podman's default runtime crun fails here on rlimits above the sandbox's hard
# limits; runc works once the defaults are below them. A drop-in file leaves
# any containers.conf of the machine's own alone.
if ! grep -rqs default_ulimits /etc/containers/containers.conf /etc/containers/containers.conf.d/; then
  mkdir -p /etc/containers/containers.conf.d
  printf '[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]\n' \
    >/etc/containers/containers.conf.d/50-telemetry-sink-ci.conf
fi

# The FROM names, with the ARG defaults they use.
rust_version=$(sed -n 's/^ARG RUST_VERSION=//p' Dockerfile)
[ -n "$rust_version" ] || die "Dockerfile: no ARG RUST_VERSION default"
registry=$(sed -n 's/^ARG BASE_REGISTRY=//p' Dockerfile)
[ -n "$registry" ] || die "Dockerfile: no ARG BASE_REGISTRY default"
froms=$(sed -n 's/^FROM \([^ ]*\).*/\1/p' Dockerfile \
  | sed "s/\${RUST_VERSION}/$rust_version/; s/\${BASE_REGISTRY}/$registry/")
BUILDER=$(echo "$froms" | grep '/rust:') || die "Dockerfile: no rust builder image"
RUNTIME=$(echo "$froms" | grep '/debian:') || die "Dockerfile: no debian runtime image"
echo "base images: $BUILDER, $RUNTIME"

# Slim images leave documentation out; the stand-in does the same.
SLIM=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias')
SYSTEM_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

start=$SECONDS
if [ -n "${SINK_CI_REBUILD_BASE:-}" ] || ! podman image exists "$RUNTIME"; then
  echo "making $RUNTIME with mmdebstrap"
  mmdebstrap --quiet --variant=minbase "${SLIM[@]}" bookworm "$WORK/runtime.tar" \
    || die "mmdebstrap failed for the runtime image"
  podman import --quiet --change "ENV=PATH=$SYSTEM_PATH" --change 'CMD=["bash"]' \
    "$WORK/runtime.tar" "$RUNTIME" >/dev/null || die "podman import failed"
  rm -f "$WORK/runtime.tar"
fi

if [ -n "${SINK_CI_REBUILD_BASE:-}" ] || ! podman image exists "$BUILDER"; then
  host_rust=$(rustc --version | cut -d' ' -f2)
  case "$host_rust" in
    "$rust_version" | "$rust_version".*) ;;
    *) echo "warning: the host's Rust is $host_rust; the stand-in for $BUILDER gets it anyway" >&2 ;;
  esac
  toolchain=$(rustup show active-toolchain | cut -d' ' -f1)
  toolchain_dir="$(rustup show home)/toolchains/$toolchain"
  [ -d "$toolchain_dir" ] || die "no toolchain directory $toolchain_dir"
  ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1 \
    || echo "warning: no CA certificates in /usr/local/share/ca-certificates to copy into the builder" >&2
  echo "making $BUILDER with mmdebstrap and the host's $toolchain toolchain"
  # As in the official image: RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo.
  # The toolchain's documentation (most of its size) stays out.
  mmdebstrap --quiet --variant=minbase "${SLIM[@]}" \
    --include=ca-certificates,gcc,libc6-dev,make,pkg-config \
    --customize-hook='mkdir -p "$1/usr/local/rustup/toolchains" "$1/usr/local/cargo/bin"' \
    --customize-hook="tar -C '$(dirname "$toolchain_dir")' --exclude='$toolchain/share/doc' -c '$toolchain' | tar -C \"\$1/usr/local/rustup/toolchains\" -x" \
    --customize-hook="printf 'version = \"12\"\\ndefault_toolchain = \"$toolchain\"\\nprofile = \"minimal\"\\n' >\"\$1/usr/local/rustup/settings.toml\"" \
    --customize-hook="cp -a '$HOME/.cargo/bin/rustup' \"\$1/usr/local/cargo/bin/\" && for tool in cargo rustc rustdoc; do ln -f \"\$1/usr/local/cargo/bin/rustup\" \"\$1/usr/local/cargo/bin/\$tool\"; done" \
    --customize-hook='cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" 2>/dev/null || true' \
    --customize-hook='chroot "$1" update-ca-certificates' \
    bookworm "$WORK/builder.tar" || die "mmdebstrap failed for the builder image"
  podman import --quiet \
    --change "ENV=PATH=/usr/local/cargo/bin:$SYSTEM_PATH" \
    --change ENV=RUSTUP_HOME=/usr/local/rustup --change ENV=CARGO_HOME=/usr/local/cargo \
    --change 'CMD=["bash"]' "$WORK/builder.tar" "$BUILDER" >/dev/null || die "podman import failed"
  rm -f "$WORK/builder.tar"
fi

echo "base images ready in $((SECONDS - start)) s"

echo "building the image from the Dockerfile"
start=$SECONDS
podman_ build --network host --format docker --layers=false \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  -t "$IMAGE" . || die "podman build failed"
build_seconds=$((SECONDS - start))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image built in ${build_seconds} s; size $((size / 1000000)) MB ($size bytes)"

# What the image says about itself.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
labels=$(podman image inspect --format '{{json .Config.Labels}}' "$IMAGE")
for label in source version licenses revision; do
  echo "$labels" | grep -q "\"org.opencontainers.image.$label\"" || die "label org.opencontainers.image.$label missing: $labels"
done
echo "$labels" | grep -q "\"org.opencontainers.image.version\":\"$version\"" \
  || die "label version is not the workspace's $version: $labels"
podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q '"health"' \
  || die "the image has no HEALTHCHECK (built without --format docker?)"
[ "$(podman image inspect --format '{{.Config.User}}' "$IMAGE")" = "10001:10001" ] || die "image USER is not 10001:10001"
[ "$(podman image inspect --format '{{.Config.StopSignal}}' "$IMAGE")" = "SIGTERM" ] || die "image STOPSIGNAL is not SIGTERM"
podman_ run --rm --network host "$IMAGE" validate | grep -q 'valid' || die "sink validate of the image's default pipeline failed"

# sink-load from the host's build plays the original's clients.
cargo build --quiet -p sink-load || die "cannot build sink-load"
LOAD=target/debug/sink-load

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_healthy NAME: until `sink health` inside the container answers SERVING.
# (Without systemd, podman logs that it cannot set up the periodic health
# timer; `podman healthcheck run` runs the image's HEALTHCHECK all the same.)
wait_healthy() {
  for _ in $(seq 100); do
    podman_ healthcheck run "$1" >/dev/null 2>&1 && return 0
    podman_ container exists "$1" || break
    sleep 0.2
  done
  podman_ logs "$1" >&2 || true
  die "container $1 never became healthy"
}

# wait_for_log NAME TEXT: waits up to 10 s for TEXT in the container's log
# (conmon copies the output to the log a moment after it is written, so a
# healthy container's log may not have its first lines yet); prints the log
# when it never comes. The log is read whole before it is searched: with
# pipefail, `podman logs | grep -q` fails whenever grep stops reading first.
wait_for_log() {
  local log
  for _ in $(seq 50); do
    log=$(podman_ logs "$1" 2>&1) || true
    [[ $log == *"$2"* ]] && return 0
    sleep 0.2
  done
  podman_ logs "$1" >&2 || true
  return 1
}

# stop_and_check NAME DATA_DIR READINGS: stops the container with SIGTERM and
# checks a clean exit, the drain message, the files' owner and the count of
# readings in every file the sink wrote on the volume (rotated, gzipped or not).
stop_and_check() {
  local name=$1 dir=$2 want=$3
  podman_ stop -t 40 "$name" >/dev/null || die "podman stop $name failed"
  local code
  code=$(podman_ inspect --format '{{.State.ExitCode}}' "$name")
  podman_ logs "$name" >"$WORK/$name.log" 2>&1
  [ "$code" = 0 ] || { cat "$WORK/$name.log" >&2; die "$name exited $code, not 0"; }
  grep -q 'shut down cleanly' "$WORK/$name.log" || { cat "$WORK/$name.log" >&2; die "$name did not say it drained"; }
  [ -n "$(ls -A "$dir")" ] || die "no output file on the volume $dir"
  local owners
  owners=$(find "$dir" -type f -printf '%U\n' | sort -u | tr '\n' ' ')
  [ "$owners" = "10001 " ] || die "files on the volume are owned by uids $owners, not 10001 alone"
  # The original's layout: one line per batch, messageCount readings each.
  local got
  got=$(python3 - "$dir" <<'PY'
import gzip, json, os, sys
total = 0
for name in sorted(os.listdir(sys.argv[1])):
    path = os.path.join(sys.argv[1], name)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt") as lines:
        total += sum(json.loads(line)["messageCount"] for line in lines)
print(total)
PY
  ) || die "the files in $dir are not JSON lines in the original's layout"
  [ "$got" = "$want" ] || die "the files in $dir hold $got readings; $want were acknowledged"
  echo "$name: exit 0 after draining; all $want acknowledged readings on the volume"
}

# 1. The image's defaults, read-only, a volume. Host networking (bridges do
#    not work in this sandbox), so the listen address is moved to a free port
#    on the image's default wildcard address.
port=$(free_port)
mkdir -p "$WORK/data1" && chown 10001:10001 "$WORK/data1"
CONTAINERS+=(sink-ci-defaults)
podman_ run -d --name sink-ci-defaults --network host --read-only \
  -e GRPC_SERVER_SOCKET="0.0.0.0:$port" -v "$WORK/data1:/var/lib/sink" "$IMAGE" >/dev/null \
  || die "podman run failed"
wait_healthy sink-ci-defaults
wait_for_log sink-ci-defaults "listening on 0.0.0.0:$port" || die "not listening on 0.0.0.0:$port"
pid=$(podman_ inspect --format '{{.State.Pid}}' sink-ci-defaults)
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
[ "$uid" = 10001 ] || die "the sink ran as uid $uid, not 10001"
echo "sink-ci-defaults: runs as uid $uid, healthy"
# The original's defaults limit requests to 1000 bytes/s: a small load, and
# two clients racing for the bucket may each be refused many times in a row.
"$LOAD" --address "127.0.0.1:$port" --count 200 --readings-per-call 5 --concurrency 2 --max-retries 1000 --quiet \
  || die "sink-load: not every call was acknowledged"
stop_and_check sink-ci-defaults "$WORK/data1" 200

# 2. `docker run --env-file .env` with an original-style .env.
port=$(free_port)
cat >"$WORK/original.env" <<ENV
FILE_PATH=.
BUFFER_SIZE=50
BUFFER_FLUSH_INTERVAL=10s
RATE_PER_SECOND=10000000
GRPC_SERVER_SOCKET=:$port
LOGGER_MIN_LOG_LEVEL=debug
ENV
mkdir -p "$WORK/data2" && chown 10001:10001 "$WORK/data2"
CONTAINERS+=(sink-ci-env)
podman_ run -d --name sink-ci-env --network host --read-only \
  --env-file "$WORK/original.env" -v "$WORK/data2:/var/lib/sink" "$IMAGE" >/dev/null \
  || die "podman run --env-file failed"
wait_healthy sink-ci-env
"$LOAD" --address "127.0.0.1:$port" --count 20000 --readings-per-call 10 --concurrency 4 --quiet \
  || die "sink-load: not every call was acknowledged"
stop_and_check sink-ci-env "$WORK/data2" 20000
# BUFFER_SIZE took effect: batches of 50 (calls of 10), the last one maybe smaller.
python3 - "$WORK/data2/telemetry-sink.log.json" <<'PY' || die "BUFFER_SIZE=50 was not applied"
import json, sys
counts = [json.loads(line)["messageCount"] for line in open(sys.argv[1])]
assert counts, "no batch in the file"
assert all(c >= 50 for c in counts[:-1]) and max(counts) < 1000, counts[:20]
PY
grep -q 'DEBUG.* of type ' "$WORK/sink-ci-env.log" || die "LOGGER_MIN_LOG_LEVEL=debug was not applied"

echo "container test passed: image $((size / 1000000)) MB, built in ${build_seconds} s"
