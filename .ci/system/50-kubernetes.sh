#!/usr/bin/env bash
# System test of the Kubernetes manifests (issue 14): renders deploy/kubernetes
# (the base) and its overlay with `kubectl kustomize`, offline, and checks the
# objects (tests/tests/deploy.rs): the ConfigMap's pipeline passes `sink
# validate`, it is mounted as a directory without subPath, the grace period
# exceeds shutdown_timeout, the probes are gRPC on the listening port, the
# listen address is not loopback, the security context is restricted. There is
# no cluster here; nothing is applied.
source "$(dirname "$0")/lib.sh"

command -v kubectl >/dev/null || die "kubectl is not installed: the Kubernetes manifest tests cannot run"
kubectl kustomize --help >/dev/null 2>&1 || die "this kubectl has no built-in kustomize"
cargo build --quiet -p sink || die "cannot build sink"
run_ignored sink-e2e deploy
