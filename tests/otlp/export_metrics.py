"""Exports a fixed set of metrics once, with the OpenTelemetry Python SDK and
its OTLP exporter, unchanged: `export_metrics.py grpc|http ENDPOINT`.

Per run: a gauge of two integer points, a float gauge with a unit, a counter
of two integer points (cumulative, monotonic), and a float up-down counter;
every point carries `exporter` = the protocol, so that the test tells the
runs apart. The SDK's in-memory reader collects once and the exporter sends
that collection once, so each point is exported exactly once.
"""

import sys

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult
from opentelemetry.sdk.resources import Resource

protocol, endpoint = sys.argv[1], sys.argv[2]
if protocol == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

    exporter = OTLPMetricExporter(endpoint=endpoint, insecure=True)
else:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    exporter = OTLPMetricExporter(endpoint=endpoint)

reader = InMemoryMetricReader()
provider = MeterProvider(
    resource=Resource.create({"service.name": "sdk-test", "deployment": "ci"}),
    metric_readers=[reader],
)
meter = provider.get_meter("sink-test")

queue = meter.create_gauge("queue.depth")
queue.set(3, {"exporter": protocol, "queue": "a"})
queue.set(7, {"exporter": protocol, "queue": "b"})
meter.create_gauge("temperature", unit="Cel").set(21.5, {"exporter": protocol})
requests = meter.create_counter("requests")
requests.add(2, {"exporter": protocol, "route": "/a"})
requests.add(3, {"exporter": protocol, "route": "/a"})
requests.add(2, {"exporter": protocol, "route": "/b"})
balance = meter.create_up_down_counter("balance")
balance.add(0.75, {"exporter": protocol, "ratio": 0.5})
balance.add(-2.0, {"exporter": protocol, "ratio": 0.5})

result = exporter.export(reader.get_metrics_data())
exporter.shutdown()
provider.shutdown()
if result != MetricExportResult.SUCCESS:
    sys.exit(f"the {protocol} export to {endpoint} failed: {result}")
print(f"exported over {protocol}")
