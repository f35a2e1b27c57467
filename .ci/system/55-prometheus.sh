#!/usr/bin/env bash
# The prometheus_remote_write sink against real receivers: Debian's
# prometheus (the tests turn on its remote-write receiver) and
# victoria-metrics, each started by the tests on a free loopback port.
# Round trips queried back exactly, out-of-order samples, receivers down at
# start and killed mid-run, the sink killed, a reload to a new URL, mutual
# TLS, and 4xx/429/5xx/stall from a stand-in. About 40 s of tests.
#
# The packages are unpacked, not installed: installing them may start their
# services on the usual ports.
source "$(dirname "$0")/lib.sh"

unpack_package prometheus
unpack_package victoria-metrics
export PROMETHEUS="$PWD/target/ci-prometheus/usr/bin/prometheus"
export VICTORIA_METRICS="$PWD/target/ci-victoria-metrics/usr/bin/victoria-metrics"
"$PROMETHEUS" --version 2>&1 | head -1 || die "prometheus does not run"
# Debian's build prints no version: ask for its help to see it runs.
"$VICTORIA_METRICS" -help >/dev/null 2>&1 || die "victoria-metrics does not run"

cargo build --quiet -p sink || die "cannot build sink"
run_ignored sink-e2e prometheus
