#!/usr/bin/env bash
# Install the benchmark tools idempotently: nginx, haproxy, wrk (Debian), python3, gcc (builds
# bench/ideal/fwd.c, the ideal forwarder), openssl + libssl-dev (tls.sh: the certificate, the
# resumption check, bench/tls_client.c).
# Optional: WITH_PROFILE=1 ./setup.sh -> also linux-perf and strace (for profile.sh).
#           WITH_OHA=1 ./setup.sh  -> also `cargo install oha` (slow: compiles from crates.io).
# The system nginx/haproxy services are NOT started (policy-rc.d blocks it during install);
# the harness runs its own instances with configs under a temp dir.
set -euo pipefail

need=()
for pkg_bin in nginx:nginx haproxy:haproxy wrk:wrk python3:python3 procps:ps util-linux:taskset curl:curl gcc:gcc openssl:openssl; do
  pkg=${pkg_bin%%:*}; bin=${pkg_bin##*:}
  if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then need+=("$pkg"); fi
done
# echo module: gives nginx `echo_sleep`, used for the 'slow' backend (fallback: slow_backend.py)
[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] || need+=(libnginx-mod-http-echo)
# OpenSSL headers: tls.sh's TLS_CLIENT=openssl client (bench/tls_client.c)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ "${WITH_PROFILE:-0}" = 1 ]; then
  command -v perf >/dev/null 2>&1 || need+=(linux-perf)
  command -v strace >/dev/null 2>&1 || need+=(strace)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  # keep Debian from starting the system services on :80 etc.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
else
  echo "all packages present"
fi

if [ "${WITH_OHA:-0}" = 1 ]; then
  if command -v oha >/dev/null 2>&1; then echo "oha present: $(oha --version)";
  else
    t0=$(date +%s)
    cargo install --locked oha
    echo "oha installed in $(( $(date +%s) - t0 ))s"
  fi
fi

echo "versions:"
/usr/sbin/nginx -v 2>&1 | sed 's/^/  /'
/usr/sbin/haproxy -v 2>&1 | head -1 | sed 's/^/  /'
wrk -v 2>&1 | head -1 | sed 's/^/  /' || true
python3 --version | sed 's/^/  /'
gcc --version | head -1 | sed "s/^/  /"
