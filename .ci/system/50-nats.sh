#!/usr/bin/env bash
# The nats sink and source against real JetStream servers (Debian's
# nats-server): round trips in both encodings, a three-node cluster losing a
# node, a writer killed with SIGKILL, NATS down at start and mid-run, poison
# messages. About a minute.
source "$(dirname "$0")/lib.sh"

apt_install nats-server
command -v nats-server >/dev/null || die "nats-server is not on PATH after installing it"
nats-server --version
cargo build -p sink
run_ignored sink-e2e nats
