#!/usr/bin/env bash
# Single-node benchmark, end to end: Shoal (1 worker) vs nginx (1 worker) and vs HAProxy
# (1 thread), all least-connections over the same 4 backends with a 64-connection idle pool,
# plus a direct-to-one-backend reference. Stops everything it started on exit (also on ^C).
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
  "$HERE/shoal.sh" stop >/dev/null 2>&1 || true
  "$HERE/lb.sh" stop >/dev/null 2>&1 || true
  "$HERE/backends.sh" stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "${SKIP_SETUP:-0}" = 1 ] || "$HERE/setup.sh"
"$HERE/shoal.sh" build

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "shoal commit: $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO_DIR" diff --quiet HEAD -- node proto 2>/dev/null || echo ' (+ uncommitted changes in node/ or proto/)')"
  echo "cpu: $(nproc) x $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "nginx: $("$NGINX" -v 2>&1 | sed 's/.*: //')  haproxy: $("$HAPROXY" -v 2>&1 | head -1 | awk '{print $3}')  wrk: $("$WRK" -v 2>&1 | head -1 | awk '{print $2}')"
  echo "placement: balancer cpus=${LB_CPUS:-any}, wrk cpus=${LOAD_CPUS:-any} (wrk -t${THREADS:-1}), backend cpus=${BACKEND_CPUS:-any}"
  echo "runs: REPEATS=$REPEATS DURATION=${DURATION}s CONNS=\"$CONNS\""
} | tee "$RESULTS/machine.txt"

"$HERE/backends.sh" start "${BACKENDS:-4}" --no-log
"$HERE/lb.sh" start nginx haproxy
"$HERE/shoal.sh" start shoal 1 18090
"$HERE/shoal.sh" show shoal > "$RESULTS/shoal.toml"
"$HERE/lb.sh" show nginx > "$RESULTS/nginx.conf" || true
"$HERE/lb.sh" show haproxy > "$RESULTS/haproxy.cfg" || true
body=$(curl -sf -m 2 http://127.0.0.1:18090/) || die "shoal does not proxy (see $BENCH_TMP/shoal/shoal/shoald.log)"
echo "shoal proxies: $body"

echo; echo "### Shoal (1 worker) vs nginx (1 worker), REF = one backend direct"
COMPARE_TSV=$RESULTS/shoal-vs-nginx.tsv "$HERE/compare.sh" shoal nginx | tee "$RESULTS/shoal-vs-nginx.txt"
echo; echo "### Shoal (1 worker) vs HAProxy (1 thread), REF = one backend direct"
COMPARE_TSV=$RESULTS/shoal-vs-haproxy.tsv "$HERE/compare.sh" shoal haproxy | tee "$RESULTS/shoal-vs-haproxy.txt"
cp "$BENCH_TMP/shoal/shoal/shoald.log" "$RESULTS/shoald.log" 2>/dev/null || true

# Summary: medians over all rounds (Shoal and the direct reference were measured in both
# comparisons, so they have 2 x REPEATS rounds); ratios are medians of the per-round ratios
# (the two targets of a ratio ran back to back).
{
  echo "## Single node: medians ($REPEATS rounds per pair, ${DURATION}s each)"
  echo
  awk -F'\t' '
  function median(list,   n, a, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  FNR == 1 { f++; other = (f == 1) ? "nginx" : "haproxy"; next }
  {
    c = $1; r = $2; name = ($3 == "A") ? "shoal" : ($3 == "B") ? other : "direct"
    rps[c, name] = rps[c, name] " " $4; p50[c, name] = p50[c, name] " " $5; p99[c, name] = p99[c, name] " " $7
    cpu[c, name] = cpu[c, name] " " $11; errs[c, name] += $9 + $10; runs[c, name]++
    if ($14 != "NA" && $14 + 0 > 5) noisy[c, name]++
    v[f, c, r, $3, "rps"] = $4; v[f, c, r, $3, "p99"] = $7; v[f, c, r, $3, "cpu"] = $11
    cs[c] = 1; if (r > nr) nr = r
  }
  END {
    print "| conns | target | req/s | p50 ms | p99 ms | CPU µs/req | socket err + non-2xx | noisy runs |"
    print "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    split("shoal nginx haproxy direct", names, " ")
    nc = 0; for (c in cs) cl[++nc] = c + 0
    for (i = 2; i <= nc; i++) { t = cl[i]; for (j = i - 1; j >= 1 && cl[j] > t; j--) cl[j + 1] = cl[j]; cl[j + 1] = t }
    for (k = 1; k <= nc; k++) for (t = 1; t <= 4; t++) {
      c = cl[k]; nm = names[t]; if (!((c, nm) in rps)) continue
      printf "| %d | %s | %.0f | %.2f | %.2f | %.2f | %d | %s |\n", c, (nm == "direct") ? "direct (1 backend)" : nm,
        median(rps[c, nm]), median(p50[c, nm]), median(p99[c, nm]), median(cpu[c, nm]), errs[c, nm],
        (nm == "direct") ? "-" : sprintf("%d/%d", noisy[c, nm], runs[c, nm])
    }
    print ""
    print "| conns | ratio | req/s | p99 | CPU µs/req | per-round req/s ratios |"
    print "| ---: | --- | ---: | ---: | ---: | --- |"
    for (k = 1; k <= nc; k++) for (ff = 1; ff <= 2; ff++) {
      c = cl[k]; q = ""; l = ""; u = ""; per = ""
      for (r = 1; r <= nr; r++) {
        if (!((ff, c, r, "A", "rps") in v)) continue
        x = v[ff, c, r, "A", "rps"] / v[ff, c, r, "B", "rps"]; q = q " " x; per = per sprintf(" %.3f", x)
        l = l " " ((v[ff, c, r, "B", "p99"] > 0) ? v[ff, c, r, "A", "p99"] / v[ff, c, r, "B", "p99"] : 0)
        u = u " " ((v[ff, c, r, "B", "cpu"] > 0) ? v[ff, c, r, "A", "cpu"] / v[ff, c, r, "B", "cpu"] : 0)
      }
      if (q == "") continue
      printf "| %d | shoal/%s | %.3f | %.3f | %.3f |%s |\n", c, (ff == 1) ? "nginx" : "haproxy", median(q), median(l), median(u), per
    }
  }' "$RESULTS/shoal-vs-nginx.tsv" "$RESULTS/shoal-vs-haproxy.tsv"
  echo
  echo "Targets: shoal/nginx req/s >= 1.2 with shoal/nginx p99 <= 1.0; shoal/haproxy req/s >= 1.0."
  echo "noisy runs: runs in which something other than the balancer used > 5% of its CPU ($LB_CPUS)."
  echo
  # shoald colours its log; strip the escapes before looking for levels
  sed 's/\x1b\[[0-9;]*m//g' "$RESULTS/shoald.log" > "$RESULTS/shoald.plain.log" 2>/dev/null || true
  n=$(grep -cE ' (WARN|ERROR) ' "$RESULTS/shoald.plain.log" 2>/dev/null || true)
  echo "shoald log: ${n:-0} WARN/ERROR lines (RUST_LOG=${RUST_LOG:-warn}); the first 10:"
  grep -E ' (WARN|ERROR) ' "$RESULTS/shoald.plain.log" 2>/dev/null | cut -c1-240 | sed 's/^/    /' | head -10 || true
} | tee "$RESULTS/summary.md"
echo "results: $RESULTS"

if [ "${PROFILE:-0}" = 1 ]; then
  cleanup
  RESULTS=$RESULTS "$HERE/profile.sh"
fi
