#!/usr/bin/env bash
# The mqtt source against a real broker (Debian's mosquitto, started by each
# test on a free loopback port with persistence on): every payload kind and
# topic_pattern, poison messages, the sink killed with SIGKILL and the broker
# restarted mid-stream with nothing lost, QoS 0, TLS, a stuck pipeline within
# its memory limit. About 30 s.
source "$(dirname "$0")/lib.sh"

apt_install mosquitto
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null \
  || die "mosquitto is not installed after installing it"
/usr/sbin/mosquitto -h 2>/dev/null | head -1 || true
cargo build -p sink
run_ignored sink-e2e mqtt
