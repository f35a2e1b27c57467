#!/usr/bin/env bash
# A stage crate and a distribution outside this workspace, set up as
# docs/stage-authors.md says (their own workspaces, sink-api and sink by path,
# version ranges, this repository's Cargo.lock): the stage crate builds and
# passes its tests, and the distribution builds and lists the stage. It needs
# no system package; it is here because it builds every dependency once more
# in a target directory of its own (several minutes on two cores), which is
# also what an outside distribution costs its author the first time.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# As the guide advises: start from this repository's lock file.
cp Cargo.lock examples/outside-workspace/Cargo.lock
cp Cargo.lock examples/outside-distribution/Cargo.lock
export CARGO_TARGET_DIR=target/outside-workspace
cargo test --manifest-path examples/outside-workspace/Cargo.toml \
  || die "the outside-the-workspace stage crate does not build or pass its tests"

start=$SECONDS
cargo build --manifest-path examples/outside-distribution/Cargo.toml \
  || die "the outside distribution does not build"
echo "the outside distribution built in $((SECONDS - start)) s (debug, sharing the stage crate's target directory)"
"$CARGO_TARGET_DIR/debug/my-sink" list | grep -E '^processor +scale +my-stages' \
  || die "the outside distribution does not list the stage crate's type"
