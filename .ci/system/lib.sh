# Shared by the .ci/system scripts: source it, do not run it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# Fails the run, loudly.
die() {
  echo "error: $*" >&2
  exit 1
}

# Installs Debian packages that are not there yet (one `apt-get update` per run).
apt_install() {
  local missing=()
  for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "need root to install ${missing[*]}"
  if [ -z "${SINK_APT_UPDATED:-}" ]; then
    apt-get update -qq || die "apt-get update failed"
    export SINK_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die "could not install ${missing[*]}"
}

# Runs the #[ignore]d tests of one test target, which are the ones that need
# what this script set up: `run_ignored PACKAGE TEST_TARGET [FILTER]`.
run_ignored() {
  cargo test -p "$1" --test "$2" -- --ignored --test-threads 1 ${3:+"$3"}
}

# Unpacks a Debian package's files into target/ci-PACKAGE without installing
# it (installing prometheus or victoria-metrics may start a service on their
# usual ports): `unpack_package prometheus` gives
# target/ci-prometheus/usr/bin/prometheus. Kept between runs.
unpack_package() {
  local package=$1 unpacked=target/ci-$1
  [ -d "$unpacked/usr/bin" ] && return 0
  [ "$(id -u)" -eq 0 ] || die "need root to fetch the $package package"
  if [ -z "${SINK_APT_UPDATED:-}" ]; then
    apt-get update -qq || die "apt-get update failed"
    export SINK_APT_UPDATED=1
  fi
  local download
  download=$(mktemp -d)
  (cd "$download" && apt-get download -qq "$package") || die "cannot download Debian's $package package"
  mkdir -p "$unpacked"
  dpkg-deb -x "$download/${package}"_*.deb "$unpacked" || die "cannot unpack the $package package"
  rm -rf "$download"
}
