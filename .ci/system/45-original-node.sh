#!/usr/bin/env bash
# Wire compatibility with the original's Go sensor node (grpc-go), against
# the sink's own HTTP/2 server: tests/tests/original_node.rs. The node is
# the one built for comparison in ../shared/peers/original/ (see its
# README), found there beside the project or under /work/shared, or named
# by $ORIGINAL_NODE. Takes about 10 s once built.
source "$(dirname "$0")/lib.sh"

if [ -z "${ORIGINAL_NODE:-}" ]; then
  for candidate in ../shared/peers/original/telemetry-node /work/shared/peers/original/telemetry-node; do
    if [ -x "$candidate" ]; then
      ORIGINAL_NODE=$(realpath "$candidate")
      break
    fi
  done
fi
[ -n "${ORIGINAL_NODE:-}" ] && [ -x "$ORIGINAL_NODE" ] \
  || die "the original's telemetry-node is not in ../shared/peers/original or /work/shared/peers/original; set ORIGINAL_NODE"
export ORIGINAL_NODE

cargo build --quiet -p sink || die "cannot build sink"
run_ignored sink-e2e original_node
