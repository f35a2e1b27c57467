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

unpacked=target/ci-prometheus
if [ ! -x "$unpacked/usr/bin/prometheus" ] || [ ! -x "$unpacked/usr/bin/promtool" ]; then
  [ "$(id -u)" -eq 0 ] || die "need root to fetch the prometheus package"
  if [ -z "${SINK_APT_UPDATED:-}" ]; then
    apt-get update -qq || die "apt-get update failed"
    export SINK_APT_UPDATED=1
  fi
  download=$(mktemp -d)
  (cd "$download" && apt-get download -qq prometheus) || die "cannot download Debian's prometheus package"
  mkdir -p "$unpacked"
  dpkg-deb -x "$download"/prometheus_*.deb "$unpacked" || die "cannot unpack the prometheus package"
  rm -rf "$download"
fi
export PROMETHEUS="$PWD/$unpacked/usr/bin/prometheus"
export PROMTOOL="$PWD/$unpacked/usr/bin/promtool"
"$PROMTOOL" --version >/dev/null 2>&1 || die "promtool does not run"
"$PROMETHEUS" --version >/dev/null 2>&1 || die "prometheus does not run"

cargo build --quiet -p sink || die "cannot build sink"
run_ignored sink-e2e metrics_system
