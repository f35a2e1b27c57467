#!/usr/bin/env python3
"""A client of the sink written in Python, as an existing sensor node might be.

It compiles proto/sensor/v1/sensor.proto at run time with grpcio-tools (no Rust,
no generated code checked in) and sends readings to
sensor.v1.SensorService/SendSensorValues, including the cases the wire format
has to carry exactly: a value of 0, no value at all (the Int64Value wrapper
left unset) and no timestamp.

    pip install grpcio grpcio-tools
    python3 examples/python-client/send_readings.py --address 127.0.0.1:8000 --count 10

Over TLS, trusting the CA that signed the sink's certificate (--tls-ca), and
with a client certificate when the sink requires one (--tls-cert, --tls-key):

    python3 examples/python-client/send_readings.py --address 127.0.0.1:8443 \
        --tls-ca tls/ca.crt --tls-cert tls/client.crt --tls-key tls/client.key

Float values (sensor_value_float, i + 0.5) and labels on every reading:

    python3 examples/python-client/send_readings.py --float --labels site=north,unit=C

It prints one line per call and exits non-zero if a call fails.
"""

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"


def compile_proto(out_dir):
    """Generates the sensor.v1 Python modules into out_dir and imports them."""
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    status = protoc.main([
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_ROOT / "sensor/v1/sensor.proto"),
    ])
    if status != 0:
        sys.exit(f"protoc failed on {PROTO_ROOT / 'sensor/v1/sensor.proto'}")
    sys.path.insert(0, str(out_dir))
    return (
        importlib.import_module("sensor.v1.sensor_pb2"),
        importlib.import_module("sensor.v1.sensor_pb2_grpc"),
    )


def readings(pb, prefix, count, floats=False, labels=None):
    """count readings: `<prefix><i>` with value i (i + 0.5 as a float with
    floats) at 2026-11-28T10:00:00Z, each with labels, except that the second
    has no value and the third no timestamp."""
    items = []
    for i in range(count):
        item = pb.SensorValue(sensor_name=f"{prefix}{i}", labels=labels or {})
        if i != 1 and floats:
            item.measurement.sensor_value_float.value = i + 0.5
        elif i != 1:
            item.measurement.sensor_value.value = i
        if i != 2:
            item.measurement.created_at.FromJsonString("2026-11-28T10:00:00Z")
        if i in (1, 2):
            # Make sure the measurement message is present even when a field is unset.
            item.measurement.SetInParent()
        items.append(item)
    return items


def parse_labels(text):
    """`site=a,unit=C` as a dict."""
    labels = {}
    for pair in filter(None, text.split(",")):
        key, sep, value = pair.partition("=")
        if not key or not sep:
            raise argparse.ArgumentTypeError(f"`{pair}` is not key=value with a key")
        labels[key] = value
    return labels


def open_channel(args):
    """A plaintext channel, or a TLS one when any --tls-* option is given."""
    if not (args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name):
        return grpc.insecure_channel(args.address)
    if bool(args.tls_cert) != bool(args.tls_key):
        sys.exit("--tls-cert and --tls-key go together")

    def read(path):
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as err:
            sys.exit(f"cannot read {path}: {err}")

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.tls_ca),
        private_key=read(args.tls_key),
        certificate_chain=read(args.tls_cert),
    )
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.address, credentials, options)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="127.0.0.1:8000")
    parser.add_argument("--count", type=int, default=10, help="readings to send")
    parser.add_argument("--per-call", type=int, default=5, help="readings per call")
    parser.add_argument("--prefix", default="py-")
    parser.add_argument("--float", action="store_true",
                        help="send float values (sensor_value_float) instead of integers")
    parser.add_argument("--labels", type=parse_labels, default={},
                        help="labels on every reading: key=value pairs separated by commas")
    parser.add_argument("--tls-ca", help="PEM CA certificates to trust (TLS; default: the system's)")
    parser.add_argument("--tls-cert", help="PEM client certificate, for a sink that requires one")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name",
                        help="name to verify the sink's certificate against (default: the address's host)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out_dir:
        pb, pb_grpc = compile_proto(out_dir)
        items = readings(pb, args.prefix, args.count, args.float, args.labels)
        with open_channel(args) as channel:
            stub = pb_grpc.SensorServiceStub(channel)
            for start in range(0, len(items), args.per_call):
                call = items[start:start + args.per_call]
                try:
                    stub.SendSensorValues(pb.SensorValuesRequest(items=call), timeout=10)
                except grpc.RpcError as err:
                    sys.exit(f"call failed: {err.code().name}: {err.details()}")
                print(f"sent {len(call)} readings: OK")


if __name__ == "__main__":
    main()
