#!/usr/bin/env bash
# Every test, on a fresh Debian machine with only Rust installed: installs what the tests need
# (iproute2 for the network-namespace chaos tests, Chromium for the dashboard test, curl,
# openssl and h2load for the HTTPS tests), then checks formatting and lints, then runs
# `cargo test --workspace`. Installing needs root (or sudo); on a machine that has the tools
# already nothing is installed. No test is skipped for a missing tool: a missing tool fails
# its test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The dashboard test drives headless Chromium (or the binary $CHROMIUM names).
if [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  need+=(chromium)
fi
# The HTTPS tests (tests/tests/tls.rs) drive real TLS clients: curl, openssl (s_client, and
# genpkey for RSA test keys) and h2load (nghttp2-client). They pass their own test CA, so no
# system trust store is needed.
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
# `shoal top` is tested in a pseudo-terminal: a detached tmux session (tests/tests/top.rs).
command -v tmux >/dev/null 2>&1 || need+=(tmux)
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
