#!/usr/bin/env bash
# The postgres sink against a real PostgreSQL (Debian's package): each test
# runs its own throwaway cluster (initdb in a temporary directory, as the
# `postgres` user when root) on a free loopback port. Round trips in every
# method, startup mistakes, a crash and restart under load, kill -9 of the
# sink, a stalled server, a live reload. About 40 s.
source "$(dirname "$0")/lib.sh"

apt_install postgresql
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || die "no initdb under /usr/lib/postgresql/*/bin after installing postgresql"
"$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/postgres" --version
if [ "$(id -u)" -eq 0 ]; then
  id postgres >/dev/null 2>&1 || die "the postgresql package made no postgres user, which the tests run the server as"
fi
cargo build -p sink
run_ignored sink-e2e postgres
