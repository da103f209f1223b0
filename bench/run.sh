#!/usr/bin/env bash
# Single-node benchmark, end to end: Shoal (1 worker) vs nginx (1 worker), vs HAProxy
# (1 thread), all least-connections over the same 4 backends with a 64-connection idle pool,
# and vs the ideal forwarder (bench/ideal/fwd.c: 1:1 backend connection per client, bytes copied,
# no HTTP: the CPU-per-request floor), plus a direct-to-one-backend reference.
# Stops everything it started on exit (also on ^C).
#
#   bench/run.sh
#   env: REPEATS=3 DURATION=5 CONNS="64 256"   rounds per pair / seconds per wrk run / wrk -c
#        BACKENDS=4                           backend count
#        SHOAL_BUILD=1                        0 = use the existing target/release/shoald
#        SHOAL_KEEPALIVE=                     per-backend idle cap (default: 64 / BACKENDS)
#        SKIP_SETUP=0                         1 = do not check/apt-install nginx/haproxy/wrk
#        PROFILE=0                            1 = afterwards run profile.sh (perf + strace)
#        RESULTS=$BENCH_TMP/results-<time>    where the TSVs, logs and summary.md go
#        QUIET_MAX_PCT=10 QUIET_TIMEOUT=60    before each run, wait for the machine to be idle
#        NOISE_PCT=20                         summary: runs where others used more of the LB's CPU
#                                             than this are left out of medians (summarize.sh)
#   plus the knobs of lib.sh (LOAD_CPUS LB_CPUS BACKEND_CPUS BENCH_NICE BENCH_TMP).
# Placement (2 cores): balancer under test alone on CPU 0; wrk and backends on CPU 1.
# Every load run is `wrk -d DURATION` under `timeout`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
export REPEATS=${REPEATS:-3} DURATION=${DURATION:-5} CONNS=${CONNS:-64 256}
RESULTS=${RESULTS:-$BENCH_TMP/results-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"

cleanup() {
  # keep shoald's log before its directory can be reused
  cp "$BENCH_TMP/shoal/shoal/shoald.log" "$RESULTS/shoald.log" 2>/dev/null || true
  "$HERE/shoal.sh" stop shoal >/dev/null 2>&1 || true
  "$HERE/lb.sh" stop nginx haproxy ideal >/dev/null 2>&1 || true
  "$HERE/backends.sh" stop >/dev/null 2>&1 || true
}
# lock and port check before the cleanup trap: if another benchmark is running, leave it alone
bench_lock
ports_free $(seq $((BACKEND_BASE_PORT + 1)) $((BACKEND_BASE_PORT + ${BACKENDS:-4}))) 18080 18081 18090 18600 19490 17490 17990
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "${SKIP_SETUP:-0}" = 1 ] || "$HERE/setup.sh"
"$HERE/shoal.sh" build
"$HERE/lb.sh" build-ideal

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "shoal commit: $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO_DIR" diff --quiet HEAD -- node proto 2>/dev/null || echo ' (+ uncommitted changes in node/ or proto/)')"
  echo "cpu: $(nproc) x $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "nginx: $("$NGINX" -v 2>&1 | sed 's/.*: //')  haproxy: $("$HAPROXY" -v 2>&1 | head -1 | awk '{print $3}')  wrk: $("$WRK" -v 2>&1 | head -1 | awk '{print $2}')  gcc (ideal forwarder): $(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)"
  echo "placement: balancer cpus=${LB_CPUS:-any}, wrk cpus=${LOAD_CPUS:-any} (wrk -t${THREADS:-1}), backend cpus=${BACKEND_CPUS:-any}"
  echo "runs: REPEATS=$REPEATS DURATION=${DURATION}s CONNS=\"$CONNS\""
} | tee "$RESULTS/machine.txt"

"$HERE/backends.sh" start "${BACKENDS:-4}" --no-log
"$HERE/lb.sh" start nginx haproxy ideal
"$HERE/shoal.sh" start shoal 1 18090
"$HERE/shoal.sh" show shoal > "$RESULTS/shoal.toml"
"$HERE/lb.sh" show nginx > "$RESULTS/nginx.conf" || true
"$HERE/lb.sh" show haproxy > "$RESULTS/haproxy.cfg" || true
"$HERE/lb.sh" show ideal > "$RESULTS/ideal.cmd" || true
body=$(curl -sf -m 2 http://127.0.0.1:18090/) || die "shoal does not proxy (see $BENCH_TMP/shoal/shoal/shoald.log)"
echo "shoal proxies: $body"

echo; echo "### Shoal (1 worker) vs nginx (1 worker), REF = one backend direct"
COMPARE_TSV=$RESULTS/shoal-vs-nginx.tsv "$HERE/compare.sh" shoal nginx | tee "$RESULTS/shoal-vs-nginx.txt"
echo; echo "### Shoal (1 worker) vs HAProxy (1 thread), REF = one backend direct"
COMPARE_TSV=$RESULTS/shoal-vs-haproxy.tsv "$HERE/compare.sh" shoal haproxy | tee "$RESULTS/shoal-vs-haproxy.txt"
# The floor. No direct reference in this pair (the other two already ran it every round).
echo; echo "### Shoal (1 worker) vs the ideal forwarder (the floor: 1:1 connections, no HTTP)"
COMPARE_TSV=$RESULTS/shoal-vs-ideal.tsv REF= "$HERE/compare.sh" shoal ideal | tee "$RESULTS/shoal-vs-ideal.txt"
cp "$BENCH_TMP/shoal/shoal/shoald.log" "$RESULTS/shoald.log" 2>/dev/null || true

{
  echo "## Single node ($REPEATS rounds per pair, ${DURATION}s each)"
  echo
  "$HERE/summarize.sh" "$RESULTS"
} | tee "$RESULTS/summary.md"
echo "results: $RESULTS"

if [ "${PROFILE:-0}" = 1 ]; then
  cleanup
  exec 9>&-   # release the benchmark lock for profile.sh
  RESULTS=$RESULTS "$HERE/profile.sh"
fi
