#!/usr/bin/env bash
# A stage crate outside this workspace, set up as README "Write your own
# stage" says (its own workspace, sink-api by path, version ranges, this
# repository's Cargo.lock), builds and passes its tests. It needs no system
# package; it is here because it builds the stage API's dependencies once more
# in a target directory of its own (about a minute on two cores).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# As the README advises: start from this repository's lock file.
cp Cargo.lock examples/outside-workspace/Cargo.lock
CARGO_TARGET_DIR=target/outside-workspace \
  cargo test --manifest-path examples/outside-workspace/Cargo.toml \
  || die "the outside-the-workspace stage crate does not build or pass its tests"
