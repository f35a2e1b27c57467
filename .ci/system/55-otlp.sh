#!/usr/bin/env bash
# The otlp source against the real OpenTelemetry Python SDK: its OTLP
# exporters over gRPC and over HTTP (PyPI packages, unchanged) export gauges
# and counters to the real binary, and the written file is checked point by
# point. A few seconds of tests.
source "$(dirname "$0")/lib.sh"

command -v python3 >/dev/null || apt_install python3 python3-pip
python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
python3 -m pip install --quiet --disable-pip-version-check \
  opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http \
  || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages \
    opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http \
  || die "could not install the OpenTelemetry Python SDK and its OTLP exporters"
python3 -c "import opentelemetry.sdk.metrics, opentelemetry.exporter.otlp.proto.grpc.metric_exporter, opentelemetry.exporter.otlp.proto.http.metric_exporter" \
  || die "the OpenTelemetry Python SDK does not import after installing it"
cargo build -p sink
run_ignored sink-e2e otlp
