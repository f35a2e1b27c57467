#!/usr/bin/env bash
# System test of the [api] endpoint (issue 12), with the real tools: Debian's
# `promtool check metrics` accepts the exposition; a real Prometheus server,
# on an ephemeral port, scrapes the sink and answers a query with the exact
# counts per stage; `sink top` in a real terminal (tmux) shows every stage
# moving and exits 0 on `q`. Takes about 25 s once built (15 s of tests, the
# rest fetching the prometheus package); building sink and the tests first
# takes minutes on a cold target/.
#
# The prometheus package is unpacked, not installed: installing it may start
# a server on :9090. Its binaries go to target/ci-prometheus.
source "$(dirname "$0")/lib.sh"

apt_install tmux
command -v tmux >/dev/null || die "tmux is not installed: the sink top test cannot run"

unpack_package prometheus
export PROMETHEUS="$PWD/target/ci-prometheus/usr/bin/prometheus"
export PROMTOOL="$PWD/target/ci-prometheus/usr/bin/promtool"
"$PROMTOOL" --version >/dev/null 2>&1 || die "promtool does not run"
"$PROMETHEUS" --version >/dev/null 2>&1 || die "prometheus does not run"

cargo build --quiet -p sink || die "cannot build sink"
run_ignored sink-e2e metrics_system
