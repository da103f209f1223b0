#!/usr/bin/env bash
# Side-by-side throughput/latency comparison of two HTTP targets, interleaved so that machine
# noise hits both alike:  round 1: A B R, round 2: B A R, round 3: A B R, ...
#
#   compare.sh TARGET_A TARGET_B
#     TARGET: a URL (http://127.0.0.1:PORT/...) or a preset name:
#       shoal=:18090 shoal2=:18092 (bench/shoal.sh)
#       nginx=:18080 haproxy=:18081 nginx2=:18082 haproxy2=:18083 (bench/lb.sh)
#       ideal=:18600 (the ideal forwarder, bench/lb.sh start ideal) direct=:19001 (one backend)
#   env: REPEATS=5      rounds per connection count
#        DURATION=5     seconds per wrk run (wrk -d; each run is also under `timeout`)
#        CONNS="64 256" connection counts (wrk -c), THREADS=1 (wrk -t)
#        REF=direct     physical-limit reference run each round ("" to skip)
#        PAUSE=1        seconds of idle between runs
#        QUIET_MAX_PCT=10 QUIET_TIMEOUT=60    before each run wait for the machine to be idle
#                       (see lib.sh wait_quiet); QUIET_TIMEOUT=0 = don't wait
#        LOAD_CPUS=1    CPU list for wrk (see lib.sh)
#        COMPARE_TSV=   path of the raw TSV (default $BENCH_TMP/compare-<time>.tsv)
#        WRK_THINK_MS=  each connection waits this long before each request (report.lua):
#                       compares at (nearly) equal offered load below saturation, where the
#                       p99 is the path's own and not the load core's speed (BENCHMARKS.md)
# Latencies are raw (wrk's coordinated-omission correction undone, see report.lua); wrk's own
# corrected p99 is kept in the TSV (p99_wrk_co).
# Prints each run (req/s, p50/p99 ms, and the target server's CPU time per request: on-CPU ns
# of all threads of the processes listening on the target port, from /proc/PID/task/*/schedstat,
# divided by requests; far less sensitive to CPU stolen by other jobs than req/s), the TCP
# connections opened on the machine per 1,000 requests (nstat TcpActiveOpens: wrk's own
# connections, c per run, plus every backend connection the target opened), the A/B ratio
# of every round, and min/median/max per target and per ratio.
# Raw rows: $COMPARE_TSV or $BENCH_TMP/compare-<time>.tsv
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[ $# -eq 2 ] || { sed -n '2,28p' "$0"; exit 2; }
A=$1 B=$2 UA=$(target_url "$1") UB=$(target_url "$2")
REF=${REF-direct}; UR=""; [ -n "$REF" ] && UR=$(target_url "$REF")
REPEATS=${REPEATS:-5} DURATION=${DURATION:-5} CONNS=${CONNS:-64 256} PAUSE=${PAUSE:-1}

for u in "$UA" "$UB" $UR; do
  curl -sf -o /dev/null -m 2 "$u" || die "$u does not answer 200"
done

mkdir -p "$BENCH_TMP"
TSV=${COMPARE_TSV:-$BENCH_TMP/compare-$(date +%Y%m%d-%H%M%S).tsv}
echo -e "conns\tround\ttarget\trps\tp50\tp90\tp99\tmax\terr\tnon2xx\tcpu_us_per_req\tcpu_pct\tp99_wrk_co\tother_pct\topens_per_kreq" > "$TSV"

# Noise check: "other" = CPU time used on the whole machine by anything but the benchmark
# (target, backends, wrk) during the run, in % of one core: another job steals from the
# balancer or from wrk/backends. Tick-based (/proc/stat), so a few % are accounting slack.
BPIDS=$(for d in "$BENCH_TMP"/backends/*/; do [ -d "$d" ] && port_pids "http://127.0.0.1:$(basename "$d")/"; done | sort -u)
children_ns() { # CPU of this shell's waited-for children (wrk & co), ns
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.0f", ($14 + $15) * 1e9 / hz }' /proc/$$/stat
}
one() { # conns round label url
  local line pids allp c0 c1 a0 a1 k0 k1 w0 w1 t0 t1 cpu_us=0 cpu_pct=0 other opens=0 kopens=-1
  pids=$(port_pids "$4")
  allp=$(printf '%s\n' $pids $BPIDS | sort -u)
  wait_quiet
  command -v nstat >/dev/null && nstat -n >/dev/null 2>&1
  c0=$(cpu_ns $pids); a0=$(cpu_ns $allp); k0=$(cpu_busy_ns); w0=$(children_ns); t0=$(date +%s%N)
  line=$(run_wrk "$4" "$1" "$DURATION")
  c1=$(cpu_ns $pids); a1=$(cpu_ns $allp); k1=$(cpu_busy_ns); w1=$(children_ns); t1=$(date +%s%N)
  command -v nstat >/dev/null && opens=$(nstat -z TcpActiveOpens 2>/dev/null | awk '$1 == "TcpActiveOpens" { print $2 }')
  [ -n "$line" ] || { echo "wrk produced no result for $4" >&2; line="rps=0 p50=0 p90=0 p99=0 max=0 req=0 err=-1 non2xx=0"; }
  local rps p50 p90 p99 max err non2xx req slowpct p99co corrected
  eval "$line"
  if [ "$req" -gt 0 ] && [ -n "$pids" ]; then
    cpu_us=$(awk -v a="$c0" -v b="$c1" -v n="$req" 'BEGIN{printf "%.2f", (b - a) / 1000 / n}')
    cpu_pct=$(awk -v a="$c0" -v b="$c1" -v d="$DURATION" 'BEGIN{printf "%.0f", (b - a) / 1e7 / d}')
    [ -n "$opens" ] && kopens=$(awk -v o="$opens" -v n="$req" 'BEGIN{printf "%.1f", o * 1000 / n}')
  fi
  other=$(awk -v k="$((k1 - k0))" -v a="$((a1 - a0))" -v w="$((w1 - w0))" -v t="$((t1 - t0))" \
    'BEGIN{o = (k - a - w) * 100 / t; printf "%.0f", (o < 0) ? 0 : o}')
  printf '  c=%-4s round %-2s %-4s %8s req/s  p50 %6.2f ms  p99 %6.2f ms  max %7.2f ms  server cpu %5s us/req (%s%%)  opens %s/1k req%s%s\n' \
    "$1" "$2" "$3" "$rps" "$p50" "$p99" "$max" "$cpu_us" "$cpu_pct" "$kopens" \
    "$( [ "$other" -gt "${NOISE_PCT:-20}" ] && echo "  NOISE: other jobs used ${other}% of a core")" \
    "$( [ "$err" != 0 ] || [ "$non2xx" != 0 ] && echo "  ERRORS sock=$err non2xx=$non2xx")"
  echo -e "$1\t$2\t$3\t$rps\t$p50\t$p90\t$p99\t$max\t$err\t$non2xx\t$cpu_us\t$cpu_pct\t$p99co\t$other\t$kopens" >> "$TSV"
  sleep "$PAUSE"
}

echo "A=$A ($UA)  B=$B ($UB)  REF=${REF:-none} ${UR}"
echo "wrk -t${THREADS:-1} -d${DURATION}s, repeats=$REPEATS, wrk cpus=${LOAD_CPUS:-any}, LB cpus=${LB_CPUS:-any}, backend cpus=${BACKEND_CPUS:-any}"
for c in $CONNS; do
  echo "== connections $c"
  # warm-up (not recorded): fills keep-alive pools, faults in pages
  for u in "$UA" "$UB"; do run_wrk "$u" "$c" 1 > /dev/null; done
  for ((r = 1; r <= REPEATS; r++)); do
    if ((r % 2)); then one "$c" "$r" A "$UA"; one "$c" "$r" B "$UB"
    else one "$c" "$r" B "$UB"; one "$c" "$r" A "$UA"; fi
    [ -n "$UR" ] && one "$c" "$r" REF "$UR"
  done
done

echo
echo "== summary (A=$A, B=$B, REF=${REF:-none}); min / median / max over $REPEATS rounds"
awk -F'\t' -v A="$A" -v B="$B" -v R="$REF" '
function med(arr, n,   i, j, t, s) {  # sort copy, return median
  for (i = 1; i <= n; i++) s[i] = arr[i]
  for (i = 2; i <= n; i++) { t = s[i]; for (j = i - 1; j >= 1 && s[j] > t; j--) s[j + 1] = s[j]; s[j + 1] = t }
  mn = s[1]; mx = s[n]
  return (n % 2) ? s[(n + 1) / 2] : (s[n / 2] + s[n / 2 + 1]) / 2
}
function stat(label, arr, n, fmt,   m) {
  m = med(arr, n); printf "  %-26s " fmt " / " fmt " / " fmt "\n", label, mn, m, mx
}
NR > 1 { rps[$1, $2, $3] = $4; p99[$1, $2, $3] = $7; cpu[$1, $2, $3] = $11; cs[$1] = 1; if ($2 > nr) nr = $2 }
END {
  nc = 0; for (c in cs) cl[++nc] = c + 0
  for (i = 2; i <= nc; i++) { t = cl[i]; for (j = i - 1; j >= 1 && cl[j] > t; j--) cl[j + 1] = cl[j]; cl[j + 1] = t }
  for (k = 1; k <= nc; k++) {
    c = cl[k]; print "  -- c=" c
    n = split("A B REF", ts, " ")
    for (t = 1; t <= n; t++) {
      if (!((c, 1, ts[t]) in rps)) continue
      for (r = 1; r <= nr; r++) { x[r] = rps[c, r, ts[t]]; y[r] = p99[c, r, ts[t]]; z[r] = cpu[c, r, ts[t]] }
      name = (ts[t] == "A") ? A : (ts[t] == "B") ? B : R
      stat(ts[t] " " name " req/s", x, nr, "%8.0f"); stat(ts[t] " " name " p99 ms", y, nr, "%8.2f")
      stat(ts[t] " " name " cpu us/req", z, nr, "%8.2f")
    }
    for (r = 1; r <= nr; r++) { q[r] = rps[c, r, "A"] / rps[c, r, "B"]; l[r] = p99[c, r, "A"] / p99[c, r, "B"] }
    line = ""; for (r = 1; r <= nr; r++) line = line sprintf(" %.3f", q[r]); print "  A/B req/s per round:" line
    stat("A/B req/s ratio", q, nr, "%8.3f"); stat("A/B p99 ratio", l, nr, "%8.3f")
    for (r = 1; r <= nr; r++) q[r] = (cpu[c, r, "B"] > 0) ? cpu[c, r, "A"] / cpu[c, r, "B"] : 0
    stat("A/B cpu-per-req ratio", q, nr, "%8.3f")
    if ((c, 1, "REF") in rps) {
      for (r = 1; r <= nr; r++) { q[r] = rps[c, r, "A"] / rps[c, r, "REF"]; l[r] = rps[c, r, "B"] / rps[c, r, "REF"] }
      stat("A/REF req/s ratio", q, nr, "%8.3f"); stat("B/REF req/s ratio", l, nr, "%8.3f")
    }
  }
}' "$TSV"
echo "raw: $TSV"
