#!/usr/bin/env bash
# Where shoald spends its time under the single-node load (64 connections by default):
#   1. perf: `perf record -e cpu-clock -g -p PID -- sleep $PERF_SECS` while wrk runs; prints the
#      time split by DSO (kernel / shoald / libc) and the top self-time symbols.
#   2. strace: `strace -c -f -p PID` over one wrk run of $STRACE_SECS; syscalls per request
#      (strace slows the target down a lot; the per-request counts stay meaningful, req/s don't).
#      Both also for the nginx reference (1 worker) unless PERF_NGINX=0 / STRACE_NGINX=0.
# Starts its own backends and shoald (same setup as run.sh) and stops them on exit.
#   env: PROF_CONNS=64 PERF_SECS=5 STRACE_SECS=3 TOP=30 RESULTS=$BENCH_TMP/profile-<time>
#        PERF_CALLGRAPH=fp (perf -g) | dwarf (slower, full Rust stacks)
# Needs perf and strace: WITH_PROFILE=1 ./setup.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
PROF_CONNS=${PROF_CONNS:-64} PERF_SECS=${PERF_SECS:-5} STRACE_SECS=${STRACE_SECS:-3} TOP=${TOP:-30}
RESULTS=${RESULTS:-$BENCH_TMP/profile-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
command -v perf >/dev/null 2>&1 || die "perf missing (WITH_PROFILE=1 $HERE/setup.sh)"
command -v strace >/dev/null 2>&1 || die "strace missing (WITH_PROFILE=1 $HERE/setup.sh)"

bg_pids=()
cleanup() {
  local p
  for p in "${bg_pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  cp "$BENCH_TMP/shoal/shoal/shoald.log" "$RESULTS/shoald-profile.log" 2>/dev/null || true
  "$HERE/shoal.sh" stop shoal >/dev/null 2>&1 || true
  "$HERE/lb.sh" stop nginx haproxy >/dev/null 2>&1 || true
  "$HERE/backends.sh" stop >/dev/null 2>&1 || true
}
# lock and port check before the cleanup trap: if another benchmark is running, leave it alone
bench_lock
ports_free $(seq $((BACKEND_BASE_PORT + 1)) $((BACKEND_BASE_PORT + ${BACKENDS:-4}))) 18080 18081 18090 19490 17490 17990
trap cleanup EXIT
trap 'exit 130' INT TERM

"$HERE/shoal.sh" build
"$HERE/backends.sh" start "${BACKENDS:-4}" --no-log
"$HERE/shoal.sh" start shoal 1 18090
if [ "${STRACE_NGINX:-1}" = 1 ] || [ "${PERF_NGINX:-1}" = 1 ]; then "$HERE/lb.sh" start nginx; fi
PID=$("$HERE/shoal.sh" pid shoal)
URL=http://127.0.0.1:18090/
curl -sf -o /dev/null -m 2 "$URL" || die "shoal does not proxy"
run_wrk "$URL" "$PROF_CONNS" 2 > /dev/null   # warm-up: fill the upstream pool

# 1. perf, while a wrk run that outlasts it is going on
perf_one() { # label url pids...
  local label=$1 url=$2; shift 2
  local pids; pids=$(echo "$@" | tr ' ' ',')
  echo "### perf $label: pids $pids, $PROF_CONNS connections, ${PERF_SECS}s"
  run_wrk "$url" "$PROF_CONNS" $((PERF_SECS + 3)) > "$RESULTS/perf-$label-wrk.txt" &
  local wrk_job=$!
  sleep 1
  local cg=(-g); [ "${PERF_CALLGRAPH:-fp}" = dwarf ] && cg=(--call-graph dwarf,16384)
  timeout -k 5 $((PERF_SECS + 30)) perf record -e cpu-clock "${cg[@]}" -p "$pids" -o "$RESULTS/perf-$label.data" \
    -- sleep "$PERF_SECS" 2> "$RESULTS/perf-$label-record.log" || true
  wait "$wrk_job" || true
  echo "load during perf: $(cat "$RESULTS/perf-$label-wrk.txt")"
  local rep=(perf report -i "$RESULTS/perf-$label.data" --stdio -g none)
  "${rep[@]}" --no-children --sort dso 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8 > "$RESULTS/perf-$label-dso.txt" || true
  "${rep[@]}" --no-children --sort symbol --percent-limit 0.3 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' > "$RESULTS/perf-$label-symbols.txt" || true
  "${rep[@]}" --children --sort symbol --percent-limit 2 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' > "$RESULTS/perf-$label-children.txt" || true
  echo "-- $label: time by DSO"; cat "$RESULTS/perf-$label-dso.txt"
  echo "-- $label: top $TOP symbols by self time ([k] kernel, [.] user)"; head -"$TOP" "$RESULTS/perf-$label-symbols.txt"
  echo "-- $label: user space only, top $TOP"
  grep -F '[.]' "$RESULTS/perf-$label-symbols.txt" | head -"$TOP" | tee "$RESULTS/perf-$label-user.txt"
}
perf_one shoal "$URL" "$PID"
if [ "${PERF_NGINX:-1}" = 1 ]; then
  sleep 1
  run_wrk http://127.0.0.1:18080/ "$PROF_CONNS" 2 > /dev/null
  perf_one nginx http://127.0.0.1:18080/ $(port_pids http://127.0.0.1:18080/)
fi

# 2. strace -c: syscalls per request
strace_one() { # label url pids...
  local label=$1 url=$2; shift 2
  local args=() p line req
  for p in "$@"; do args+=(-p "$p"); done
  strace -c -f -o "$RESULTS/strace-$label.txt" "${args[@]}" &
  local sj=$!
  bg_pids+=("$sj")
  sleep 1
  line=$(run_wrk "$url" "$PROF_CONNS" "$STRACE_SECS")
  sleep 0.5
  kill -INT "$sj" 2>/dev/null || true
  wait "$sj" 2>/dev/null || true
  eval "req=0; ${line:-}"
  echo "### strace $label: $line"
  awk -v n="$req" -v label="$label" '
    $1 ~ /^[0-9.]+$/ && NF >= 5 { calls = $4; name = $NF; if (name == "total") { tot = calls; next }
      printf "  %-18s %10d calls  %6.3f per request\n", name, calls, (n > 0) ? calls / n : 0 }
    END { printf "  %-18s %10d calls  %6.3f per request (%d requests)\n", "TOTAL " label, tot, (n > 0) ? tot / n : 0, n }
  ' "$RESULTS/strace-$label.txt" | tee "$RESULTS/strace-$label-per-req.txt"
}
sleep 1
strace_one shoal "$URL" "$PID"
if [ "${STRACE_NGINX:-1}" = 1 ]; then
  sleep 1
  strace_one nginx http://127.0.0.1:18080/ $(port_pids http://127.0.0.1:18080/)
fi
echo "results: $RESULTS"
