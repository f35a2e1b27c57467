#!/usr/bin/env bash
# json_file on a full disk: tmpfs mounts of 1 MiB need root (tests/tests/full_disk.rs).
source "$(dirname "$0")/lib.sh"
[ "$(id -u)" -eq 0 ] || die "20-files.sh needs root to mount a tmpfs"
command -v mount >/dev/null || die "no mount command"
apt_install zstd gzip
run_ignored sink-e2e full_disk
# The rotation tests read compressed files back with zstdcat and zcat too,
# now that both are installed.
cargo test -p sink-e2e --test rotation
