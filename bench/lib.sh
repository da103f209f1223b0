# Shared helpers, sourced by the other scripts. No machine-specific absolute paths:
# everything lives under $BENCH_TMP (default ${TMPDIR:-/tmp}/shoalbench).
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_TMP=${BENCH_TMP:-${TMPDIR:-/tmp}/shoalbench}
NGINX=${NGINX:-/usr/sbin/nginx}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
WRK=${WRK:-wrk}
ECHO_MOD=${ECHO_MOD:-/usr/lib/nginx/modules/ngx_http_echo_module.so}
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
SHOALD=${SHOALD:-$REPO_DIR/target/release/shoald}

# CPU placement (2-core box): the balancer under test alone on CPU 0; load generator (wrk)
# and backends on CPU 1. Set any of these to "" to leave that group unpinned.
LOAD_CPUS=${LOAD_CPUS-1}
LB_CPUS=${LB_CPUS-0}
BACKEND_CPUS=${BACKEND_CPUS-1}
# BENCH_NICE=-10 (root only) starts every benchmark process at that niceness so that
# concurrent builds (nice 0) steal less CPU; 0 = leave as is.
BENCH_NICE=${BENCH_NICE:-0}

BACKEND_BASE_PORT=${BACKEND_BASE_PORT:-19000}   # backend i listens on BASE+i (19001..)

pin() { # pin CPULIST cmd...  (CPULIST empty -> unpinned), at niceness $BENCH_NICE
  local cpus=$1; shift
  set -- $(pin_prefix "$cpus") "$@"
  "$@"
}
pin_prefix() { # words to put before a command: [nice -n X] [taskset -c CPUS]
  [ "$BENCH_NICE" != 0 ] && printf 'nice -n %s ' "$BENCH_NICE"
  [ -n "$1" ] && printf 'taskset -c %s ' "$1"
  true
}

die() { echo "error: $*" >&2; exit 1; }

wait_port() { # wait_port PORT [tries]  -> 0 when something answers HTTP on 127.0.0.1:PORT
  local port=$1 tries=${2:-50} i
  for ((i = 0; i < tries; i++)); do
    curl -s -o /dev/null -m 1 "http://127.0.0.1:$port/" && return 0
    sleep 0.1
  done
  return 1
}

# stop_pidfile FILE [SIG]: polite stop of a daemon by the PID in FILE, then wait for it to exit.
stop_pidfile() {
  local f=$1 sig=${2:-TERM} pid i
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# run_wrk URL CONNS DURATION_S [extra wrk args]  -> prints one line:
#   rps=<req/s> p50=<ms> p90=<ms> p99=<ms> max=<ms> req=<n> err=<socket errors> non2xx=<n>
# wrk is pinned to $LOAD_CPUS and wrapped in `timeout` so it always stops by itself.
run_wrk() {
  local url=$1 conns=$2 dur=$3; shift 3
  local threads=${THREADS:-1}
  WRK_CONNS=$conns pin "$LOAD_CPUS" timeout -k 5 $((dur + 15)) "$WRK" -t"$threads" -c"$conns" -d"${dur}s" \
      --timeout 5s -s "$BENCH_DIR/report.lua" "$@" "$url" 2>&1 | grep '^RESULT ' | sed 's/^RESULT //'
}

# target_url TARGET -> the URL of a preset (shoal=:18090 shoal2=:18092 nginx=:18080 haproxy=:18081
# nginx2=:18082 haproxy2=:18083 ideal=:18600 direct=the first backend) or a loopback URL as is
target_url() {
  case "$1" in
    shoal) echo "http://127.0.0.1:18090/" ;;
    shoal2) echo "http://127.0.0.1:18092/" ;;
    nginx) echo "http://127.0.0.1:18080/" ;;
    haproxy) echo "http://127.0.0.1:18081/" ;;
    nginx2) echo "http://127.0.0.1:18082/" ;;
    haproxy2) echo "http://127.0.0.1:18083/" ;;
    ideal) echo "http://127.0.0.1:18600/" ;;
    direct) echo "http://127.0.0.1:$((BACKEND_BASE_PORT + 1))/" ;;
    http://127.*) echo "$1" ;;
    *) die "target must be a preset or a loopback URL http://127.x.x.x:PORT/: $1" ;;
  esac
}

# port_pids URL -> PIDs of every process holding the listening socket of URL's port (ss -p)
port_pids() {
  local port=${1#http://}; port=${port#*:}; port=${port%%/*}
  ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u
}
# cpu_ns PID... -> total on-CPU time (ns) of all threads of those processes (schedstat)
cpu_ns() {
  local p t=0 v
  for p in "$@"; do
    for v in $(cat /proc/"$p"/task/*/schedstat 2>/dev/null | awk '{print $1}'); do t=$((t + v)); done
  done
  echo "$t"
}

# cpu_busy_ns [CPU] -> busy (non-idle, non-iowait) time of that CPU (default: all CPUs) so far,
# ns (/proc/stat, USER_HZ ticks)
cpu_busy_ns() {
  awk -v c="cpu${1:-}" -v hz="$(getconf CLK_TCK)" '$1 == c { printf "%.0f", ($2 + $3 + $4 + $7 + $8 + $9) * 1e9 / hz }' /proc/stat
}
# machine_busy_pct SECONDS -> whole-machine busy % over that window
machine_busy_pct() {
  local a b
  a=$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
  sleep "$1"
  b=$(awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); t = (y[1] - x[1]) + (y[2] - x[2]); printf "%.0f", (t > 0) ? 100 * (y[1] - x[1]) / t : 0 }'
}
# wait_quiet: before a measured run, wait until the machine is idle (busy <= $QUIET_MAX_PCT over
# 1 s), at most $QUIET_TIMEOUT s (then go on with a warning). Another job (a cargo build) on
# the same 2 cores halves req/s. QUIET_TIMEOUT=0 turns it off.
QUIET_MAX_PCT=${QUIET_MAX_PCT:-10}
QUIET_TIMEOUT=${QUIET_TIMEOUT:-60}
wait_quiet() {
  [ "$QUIET_TIMEOUT" -gt 0 ] || return 0
  local t0=$SECONDS b warned=0
  while :; do
    b=$(machine_busy_pct 1)
    [ "$b" -le "$QUIET_MAX_PCT" ] && return 0
    if ((SECONDS - t0 >= QUIET_TIMEOUT)); then
      echo "  (machine still ${b}% busy after ${QUIET_TIMEOUT}s of waiting; measuring anyway)" >&2; return 0
    fi
    [ "$warned" = 1 ] || { echo "  (machine ${b}% busy with something else; waiting up to ${QUIET_TIMEOUT}s)" >&2; warned=1; }
    sleep 2
  done
}

# bench_lock: one benchmark at a time on this machine (run.sh, profile.sh); a second one would
# share ports and CPUs with the first. Holds an flock on $BENCH_TMP/.lock until the script exits.
bench_lock() {
  mkdir -p "$BENCH_TMP"
  exec 9> "$BENCH_TMP/.lock"
  flock -n 9 || die "another benchmark holds $BENCH_TMP/.lock"
}
# ports_free PORT... -> fails naming the first port something already listens on (a benchmark
# with another state dir, a test suite): sharing it would mix the two runs up silently.
ports_free() {
  local p
  for p in "$@"; do
    if [ -n "$(ss -Hltn "sport = :$p" 2>/dev/null)" ]; then
      die "port $p is already in use ($(ss -Hltnp "sport = :$p" | grep -o 'users:.*' | head -1)); stop that first"
    fi
  done
}

# backend_ports -> the backend ports balancers should use: the running backends.sh backends,
# or 127.0.0.1:BASE+1..BASE+$LB_BACKENDS when LB_BACKENDS is set.
backend_ports() {
  if [ -n "${LB_BACKENDS:-}" ]; then
    for ((i = 1; i <= LB_BACKENDS; i++)); do echo $((BACKEND_BASE_PORT + i)); done
  else
    [ -d "$BENCH_TMP/backends" ] || die "no backends running (./backends.sh start N) and LB_BACKENDS unset"
    ls "$BENCH_TMP/backends" | sort -n
  fi
}

balancer_pids() { # DIR KIND -> every process of the balancer whose pid file is in DIR
  # (nginx: master + workers; HAProxy and shoald: one process)
  local d=$1 m
  case $2 in
    nginx) m=$(cat "$d/nginx.pid"); echo "$m"; ps -o pid= --ppid "$m" | tr -d ' ' ;;
    haproxy) cat "$d/haproxy.pid" ;;
    shoal) cat "$d/shoald.pid" ;;
  esac
}
