#!/usr/bin/env bash
# Every test, on a fresh Debian machine with only Rust installed: installs what the tests need
# (iproute2 for the network-namespace chaos tests, Chromium for the dashboard test), then
# checks formatting and lints, then runs `cargo test --workspace`. Installing needs root (or
# sudo); on a machine that has the tools already nothing is installed. No test is skipped for
# a missing tool: a missing tool fails its test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The dashboard test drives headless Chromium (or the binary $CHROMIUM names).
if [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  need+=(chromium)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${need[*]}" >&2
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "scripts/test.sh: need root or sudo to install ${need[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace "$@"
