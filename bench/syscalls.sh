#!/usr/bin/env bash
# What one request costs a balancer in system calls and wake-ups, and what it makes the load
# core (wrk and the backends) pay in context switches: the figures behind "one failed read per
# request" and "least-conn wakes a sleeping backend" in docs/BENCHMARKS.md.
#
#   syscalls.sh TARGET...     TARGET: a loopback URL or a preset of compare.sh (shoal, nginx,
#                             haproxy, ideal, ...); the targets and the backends must be running
#   env: CONNS=64 DURATION=5 (seconds counted, inside a wrk run 2 s longer)
#
# Per target, per request: the balancer's recvfrom / sendto / readv / writev / epoll_wait and
# context switches (`perf stat -e syscalls:sys_enter_*` on every process holding the target's
# port; tracepoints, not strace, so the run keeps its speed), then the bench backends'
# voluntary (slept: no request waiting) and involuntary (preempted) context switches
# (/proc/PID/status of every process of the backends under $BENCH_TMP/backends).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
CONNS=${CONNS:-64} DURATION=${DURATION:-5}
[ $# -ge 1 ] || { sed -n '2,14p' "$0"; exit 2; }
command -v perf >/dev/null 2>&1 || die "perf missing (WITH_PROFILE=1 $HERE/setup.sh)"

switches() { # pids... -> "voluntary involuntary" summed
  local p v=0 n=0 a b
  for p in "$@"; do
    a=$(awk '/^voluntary_ctxt_switches/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)
    b=$(awk '/^nonvoluntary_ctxt_switches/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)
    v=$((v + ${a:-0})); n=$((n + ${b:-0}))
  done
  echo "$v $n"
}

# Every process of the bench backends (nginx: master and worker; the master hardly switches).
mapfile -t backends < <(for p in $(backend_ports); do port_pids "http://127.0.0.1:$p/"; done | sort -u)
[ "${#backends[@]}" -gt 0 ] || die "no bench backends running (bench/backends.sh start 4)"
events=$(printf 'syscalls:sys_enter_%s,' recvfrom sendto readv writev read write epoll_wait)context-switches
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for t in "$@"; do
  url=$(target_url "$t")
  curl -sf -o /dev/null -m 2 "$url" || die "$url does not answer 200"
  pids=$(port_pids "$url" | paste -sd, -)
  [ -n "$pids" ] || die "no process listens for $url"
  read -r v0 n0 < <(switches "${backends[@]}")
  run_wrk "$url" "$CONNS" $((DURATION + 2)) > "$out/wrk" &
  wrk_job=$!
  sleep 1
  timeout -k 5 $((DURATION + 20)) perf stat -x, -e "$events" -p "$pids" -o "$out/perf" -- sleep "$DURATION" 2>/dev/null || true
  wait "$wrk_job" || true
  read -r v1 n1 < <(switches "${backends[@]}")
  rps=$(sed -n 's/.*rps=\([0-9]*\).*/\1/p' "$out/wrk")
  total=$(sed -n 's/.* req=\([0-9]*\).*/\1/p' "$out/wrk")
  [ -n "$rps" ] && [ "${rps:-0}" -gt 0 ] || die "$t: wrk reported no requests"
  # perf counts over DURATION s of the run; the switches over the whole run.
  awk -F, -v t="$t" -v rps="$rps" -v dur="$DURATION" -v total="$total" -v bv=$((v1 - v0)) -v bn=$((n1 - n0)) '
    NF > 3 && $1 ~ /^[0-9]+$/ { n = $3; sub(/.*sys_enter_/, "", n); c[n] = $1 }
    END {
      r = rps * dur
      printf "%-8s %6d req/s  balancer per request:", t, rps
      split("recvfrom sendto readv writev read write epoll_wait context-switches", k, " ")
      for (i = 1; i <= 8; i++) if (c[k[i]] > 0) printf " %s %.2f", k[i], c[k[i]] / r
      printf "  |  backends per request: slept %.3f, preempted %.3f\n", bv / total, bn / total
    }' "$out/perf"
done
