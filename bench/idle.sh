#!/usr/bin/env bash
# Memory per idle client connection: Shoal (shoald, default config) vs nginx (1 worker) vs
# HAProxy (1 thread), least-connections over the same 4 backends. For every balancer and mode
# a fresh balancer is started alone (only one alive while it is measured), warmed up with one
# request, and its RSS (/proc/PID/status VmRSS; nginx: master + worker) is sampled
#   before   no client connected (after the warm-up)
#   idle     with N connections open and idle, SETTLE s after the last one was opened
#   after    CLOSE_SAMPLES s after the client closed them all (the last sample is reported)
# bytes/conn = (idle - before) / N. Stops everything it started on exit (also on ^C).
#
#   bench/idle.sh
#   env: N=10000                 idle HTTP/1.1 keep-alive connections (one GET each, then idle)
#        WS_N=9000               idle WebSockets (upgrade + one echoed message, then idle); each
#                                costs the balancer 2 fds, so WS_N stays under nofile / 2
#        LBS="shoal nginx haproxy"   MODES="keepalive ws"
#        SETTLE=2                s between "all N idle" and the idle sample
#        CLOSE_SAMPLES="1 3 5"   s after close at which RSS is sampled
#        CONCURRENCY=200         connection handshakes in flight at once (idle_client.py)
#        OPEN_TIMEOUT=180        s for opening all N (client gives up after that)
#        SHOAL_BUILD=0           1 = cargo build --release -p shoal-node first (shoal.sh build)
#        SHOALD=<repo>/target/release/shoald   the binary under test
#        RESULTS=$BENCH_TMP/idle-<time>        idle.md, machine.txt, configs, logs
#        BENCH_TMP=${TMPDIR:-/tmp}/shoalidle   (own state dir + lock, not shoalbench's)
#   plus lib.sh's LOAD_CPUS (client, 1) LB_CPUS (balancer, 0) BACKEND_CPUS (backends, 1).
# Ports: balancers nginx :18180, HAProxy :18181, Shoal :18190 (admin 19690, control 17690,
# gossip 18290/udp); backends 19101..19104 (ws_backend.py: plain GET and WebSocket echo).
# None of them is used by run.sh, so both can run at once (they would share CPUs, not ports;
# memory figures do not mind CPU noise). The open-files limit is raised to the hard limit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export BENCH_TMP=${BENCH_TMP:-${TMPDIR:-/tmp}/shoalidle}
export BACKEND_BASE_PORT=${BACKEND_BASE_PORT:-19100}
. "$HERE/lib.sh"

N=${N:-10000}
WS_N=${WS_N:-9000}
LBS=${LBS:-shoal nginx haproxy}
MODES=${MODES:-keepalive ws}
SETTLE=${SETTLE:-2}
CLOSE_SAMPLES=${CLOSE_SAMPLES:-1 3 5}
CONCURRENCY=${CONCURRENCY:-200}
OPEN_TIMEOUT=${OPEN_TIMEOUT:-180}
BACKENDS=4
NGINX_PORT=18180 HAPROXY_PORT=18181 SHOAL_PORT=18190
SHOAL_ADMIN=19690 SHOAL_CONTROL=17690 SHOAL_GOSSIP=18290
RESULTS=${RESULTS:-$BENCH_TMP/idle-$(date +%Y%m%d-%H%M%S)}
IDIR=$BENCH_TMP/idle            # per-run state: configs, pid files, logs of the current balancer
BE_PORTS=$(seq $((BACKEND_BASE_PORT + 1)) $((BACKEND_BASE_PORT + BACKENDS)))
BE_LIST=$(seq -s, $((BACKEND_BASE_PORT + 1)) $((BACKEND_BASE_PORT + BACKENDS)))

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[ "$NOFILE" = unlimited ] && NOFILE=1048576

cleanup() {
  local d
  if [ -n "${CLIENT_PID:-}" ]; then kill "$CLIENT_PID" 2>/dev/null || true; fi
  for d in nginx haproxy shoal; do stop_lb "$d" >/dev/null 2>&1 || true; done
  stop_pidfile "$IDIR/backend.pid" TERM
}

# ---------------------------------------------------------------- configs
nginx_conf() { # port
  local p
  cat <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid nginx.pid;
error_log error.log warn;
events { worker_connections $NOFILE; }
http {
  client_body_temp_path body_tmp; proxy_temp_path proxy_tmp; fastcgi_temp_path fcgi_tmp;
  uwsgi_temp_path uwsgi_tmp; scgi_temp_path scgi_tmp;
  access_log off;
  server_tokens off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  # WebSocket: pass Upgrade on; plain requests keep an empty Connection (upstream keep-alive)
  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
  upstream be {
    least_conn;
    zone be 64k;
EOF
  for p in $BE_PORTS; do echo "    server 127.0.0.1:$p max_fails=0;"; done
  cat <<EOF
    keepalive 64;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$1 backlog=4096;
    location / {
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }
  }
}
EOF
}

haproxy_conf() { # port maxconn
  local p i=0
  # maxconn counts client connections (the mode's N + 100). HAProxy sizes its fd table for
  # 2 x maxconn and, by default (strict-limits), refuses to start when that exceeds the
  # open-files limit, as for N=10000 with a 20000 limit. `no strict-limits` turns that into a
  # warning: N idle keep-alive clients need N + <=64 fds (WS_N WebSockets: 2 x WS_N, checked).
  cat <<EOF
global
  nbthread 1
  maxconn $2
  ulimit-n $NOFILE
  no strict-limits
defaults
  mode http
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-request 300s
  timeout http-keep-alive 300s
  timeout tunnel 3600s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:$1
  default_backend be
backend be
  balance leastconn
  default-server pool-max-conn 16
EOF
  for p in $BE_PORTS; do i=$((i + 1)); echo "  server b$i 127.0.0.1:$p"; done
}

shoal_conf() { # port -- the DEFAULT config: addresses, algorithm, backends, nothing else
  local p
  cat <<EOF
# generated by bench/idle.sh: Shoal's defaults (no workers, keepalive, timeouts)
[node]
listen = "127.0.0.1:$1"
admin = "127.0.0.1:$SHOAL_ADMIN"
control = "127.0.0.1:$SHOAL_CONTROL"
gossip = "127.0.0.1:$SHOAL_GOSSIP"

[upstream]
algorithm = "least-conn"
EOF
  for p in $BE_PORTS; do printf '\n[[upstream.backend]]\naddr = "127.0.0.1:%s"\n' "$p"; done
}

# ---------------------------------------------------------------- balancers
lb_port() { case $1 in nginx) echo $NGINX_PORT ;; haproxy) echo $HAPROXY_PORT ;; shoal) echo $SHOAL_PORT ;; *) die "unknown balancer $1" ;; esac; }

start_lb() { # name maxconn(HAProxy)
  local name=$1 port d=$IDIR/$1 pre
  port=$(lb_port "$name")
  stop_lb "$name"
  rm -rf "$d"; mkdir -p "$d"
  case "$name" in
    nginx)
      nginx_conf "$port" > "$d/nginx.conf"
      pin "$LB_CPUS" "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log" || die "nginx failed ($d/error.log)"
      ;;
    haproxy)
      haproxy_conf "$port" "$2" > "$d/haproxy.cfg"
      pin "$LB_CPUS" "$HAPROXY" -D -f "$d/haproxy.cfg" -p "$d/haproxy.pid" > "$d/error.log" 2>&1 \
        || { cat "$d/error.log" >&2; die "haproxy failed ($d/error.log)"; }
      ;;
    shoal)
      [ -x "$SHOALD" ] || die "$SHOALD not found: build it (SHOAL_BUILD=1, or cargo build --release -p shoal-node) or set SHOALD"
      shoal_conf "$port" > "$d/shoal.toml"
      read -ra pre <<< "$(pin_prefix "$LB_CPUS")"
      # taskset/setsid exec in turn, so $! is shoald itself
      "${pre[@]}" setsid "$SHOALD" run --config "$d/shoal.toml" > "$d/shoald.log" 2>&1 < /dev/null &
      echo $! > "$d/shoald.pid"
      ;;
  esac
  if ! wait_port "$port" 100; then
    tail -20 "$d"/*.log >&2 || true
    die "$name did not answer on :$port (logs in $d)"
  fi
}

stop_lb() { # name
  local d=$IDIR/$1
  [ -d "$d" ] || return 0
  stop_pidfile "$d/nginx.pid" TERM      # fast shutdown (closes idle connections)
  stop_pidfile "$d/haproxy.pid" TERM    # hard stop
  stop_pidfile "$d/shoald.pid" TERM
}

lb_pids() { balancer_pids "$IDIR/$1" "$1"; } # kind -> every process of the balancer

rss() { # name -> RSS = total VmRSS (kB) of its processes, RSS_PARTS = "pid:kB,..."
  local v p
  RSS=0 RSS_PARTS=""
  for p in $(lb_pids "$1"); do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
    [ -n "$v" ] || die "$1: process $p is gone"
    RSS=$((RSS + v)); RSS_PARTS+="${RSS_PARTS:+,}$p:$v"
  done
  [ "$RSS" -gt 0 ] || die "$1: no process found"
}

estab() { ss -Htn state established "( sport = :$1 )" 2>/dev/null | wc -l; }

# ---------------------------------------------------------------- client
# run_client PORT MODE N CLOSE_FILE OUT  (background; sets CLIENT_PID = the `timeout` process)
run_client() {
  local port=$1 mode=$2 n=$3 close=$4 out=$5 pre
  read -ra pre <<< "$(pin_prefix "$LOAD_CPUS")"
  "${pre[@]}" timeout -k 5 $((OPEN_TIMEOUT + 660)) python3 "$HERE/idle_client.py" --port "$port" \
      --mode "$mode" --n "$n" --concurrency "$CONCURRENCY" --open-timeout "$OPEN_TIMEOUT" \
      --close-file "$close" --max-hold 600 > "$out" 2>&1 < /dev/null &
  CLIENT_PID=$!
}

warm_up() { # port mode: one GET (curl) and one connection of the mode through the balancer
  local port=$1 mode=$2
  curl -sf -m 2 -o /dev/null "http://127.0.0.1:$port/" || die "warm-up GET via :$port failed"
  timeout 30 python3 "$HERE/idle_client.py" --port "$port" --mode "$mode" --n 1 > "$IDIR/warmup.out" 2>&1 \
    || die "warm-up $mode via :$port failed: $(cat "$IDIR/warmup.out")"
}

mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# measure NAME MODE -> appends one table row to $RESULTS/rows.md
measure() {
  local name=$1 mode=$2 port n cmode out close a b c t t0 f ok still est line samples=""
  port=$(lb_port "$name")
  case $mode in keepalive) n=$N cmode=http ;; ws) n=$WS_N cmode=ws ;; *) die "unknown mode $mode" ;; esac
  out=$RESULTS/client-$name-$mode.out close=$IDIR/close-$name-$mode
  rm -f "$close"
  echo "== $name $mode N=$n"
  start_lb "$name" $((n + 100))
  warm_up "$port" "$cmode"
  sleep 1
  rss "$name"; a=$RSS; echo "  before: $a kB ($RSS_PARTS)"

  run_client "$port" "$cmode" "$n" "$close" "$out"
  t0=$SECONDS
  until grep -q '^READY' "$out" 2>/dev/null; do
    kill -0 "$CLIENT_PID" 2>/dev/null || { cat "$out" >&2; die "client exited before READY ($name $mode)"; }
    ((SECONDS - t0 <= OPEN_TIMEOUT + 15)) || die "client not READY after $((OPEN_TIMEOUT + 15)) s"
    sleep 0.2
  done
  line=$(grep '^READY' "$out"); echo "  client: $line"; grep '^ERROR' "$out" | sed 's/^/  /' || true
  ok=$(sed -n 's/^READY ok=\([0-9]*\).*/\1/p' "$out")
  sleep "$SETTLE"
  rss "$name"; b=$RSS; est=$(estab "$port")
  echo "  idle:   $b kB ($RSS_PARTS), established at :$port: $est"

  touch "$close"
  t0=$SECONDS
  until grep -q '^CLOSED' "$out" 2>/dev/null; do
    kill -0 "$CLIENT_PID" 2>/dev/null || break
    ((SECONDS - t0 <= 30)) || die "client did not close within 30 s"
    sleep 0.1
  done
  wait "$CLIENT_PID" || true; CLIENT_PID=
  still=$(sed -n 's/^CLOSED still_open=\([0-9]*\).*/\1/p' "$out"); still=${still:-0}
  echo "  client: CLOSED still_open=$still"
  local prev=0
  for t in $CLOSE_SAMPLES; do
    sleep $((t - prev)); prev=$t
    rss "$name"; c=$RSS; samples+="${samples:+ / }$(mb "$c")"
    echo "  after close +${t}s: $c kB ($RSS_PARTS)"
  done
  for f in "$IDIR/$name"/*.conf "$IDIR/$name"/*.cfg "$IDIR/$name"/*.toml "$IDIR/$name"/*.log; do
    if [ -e "$f" ]; then cp "$f" "$RESULTS/$name-$mode-$(basename "$f")"; fi
  done
  stop_lb "$name"

  local check="$ok/$n"
  if [ "${ok:-0}" != "$n" ] || [ "$still" != "$n" ]; then
    check="**$ok/$n ok, $still still open**"; FAILED+=("$name $mode: $ok of $n connections succeeded, $still stayed open until close")
    echo "  ERROR: only $ok of $n connections succeeded, $still stayed open" >&2
  fi
  awk -v lb="$name" -v m="$mode" -v n="$n" -v a="$a" -v b="$b" -v c="$c" -v chk="$check" -v smp="$samples" 'BEGIN {
    freed = (b > a) ? 100 * (b - c) / (b - a) : 0; if (freed > -0.5 && freed < 0.5) freed = 0
    printf "| %s | %s | %d | %s | %.1f | %.1f | %.2f | %.1f | %.0f%% | %.0f%% | %s |\n",
      lb, m, n, chk, a / 1024, b / 1024, (b - a) / n, c / 1024, 100 * c / a, freed, smp }' >> "$RESULTS/rows.md"
}

# ---------------------------------------------------------------- main
# lock and port check before the cleanup trap: if another run is going on, leave it alone
bench_lock
# shellcheck disable=SC2086
ports_free $BE_PORTS $NGINX_PORT $HAPROXY_PORT $SHOAL_PORT $SHOAL_ADMIN $SHOAL_CONTROL
[ -z "$(ss -Hlun "sport = :$SHOAL_GOSSIP" 2>/dev/null)" ] || die "udp port $SHOAL_GOSSIP is already in use"
trap cleanup EXIT
trap 'exit 130' INT TERM

for m in $MODES; do
  case $m in
    keepalive) ((N + 100 <= NOFILE)) || die "N=$N does not fit the open-files limit $NOFILE" ;;
    ws) ((2 * WS_N + 100 <= NOFILE)) || die "WS_N=$WS_N needs 2 fds per WebSocket in the balancer; limit $NOFILE (WS_N <= $(((NOFILE - 100) / 2)))" ;;
  esac
done
if [ ! -x "$NGINX" ] || [ ! -x "$HAPROXY" ]; then "$HERE/setup.sh"; fi
[ "${SHOAL_BUILD:-0}" = 1 ] && "$HERE/shoal.sh" build
mkdir -p "$RESULTS" "$IDIR"
: > "$RESULTS/rows.md"
FAILED=()

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "bench commit: $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "shoald: $SHOALD ($("$SHOALD" --version 2>/dev/null | head -1 || echo '?'); built $(date -u -r "$SHOALD" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo '?'); commit $(git -C "$(dirname "$SHOALD")" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$(dirname "$SHOALD")" diff --quiet HEAD -- node proto 2>/dev/null || echo ' (+ uncommitted changes in node/ or proto/, or not in a git tree)'))"
  echo "cpu: $(nproc) x $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ *//')"
  echo "kernel: $(uname -r)  memory: $(awk '/MemTotal/ {printf "%.1f GB", $2 / 1048576}' /proc/meminfo)  nofile: $NOFILE"
  echo "nginx: $("$NGINX" -v 2>&1 | sed 's/.*: //')  haproxy: $("$HAPROXY" -v 2>&1 | head -1 | awk '{print $3}')  python: $(python3 -V 2>&1 | awk '{print $2}')"
  echo "placement: balancer cpus=${LB_CPUS:-any}, client cpus=${LOAD_CPUS:-any}, backend cpus=${BACKEND_CPUS:-any}"
  echo "runs: N=$N WS_N=$WS_N LBS=\"$LBS\" MODES=\"$MODES\" SETTLE=${SETTLE}s CLOSE_SAMPLES=\"$CLOSE_SAMPLES\" RUST_LOG=${RUST_LOG:-unset}"
} | tee "$RESULTS/machine.txt"

# backends: one asyncio process serving all ports (plain GET + WebSocket echo)
read -ra pre <<< "$(pin_prefix "$BACKEND_CPUS")"
"${pre[@]}" setsid python3 "$HERE/ws_backend.py" --ports "$BE_LIST" \
    > "$IDIR/backend.log" 2>&1 < /dev/null &
echo $! > "$IDIR/backend.pid"
for p in $BE_PORTS; do wait_port "$p" || die "backend :$p did not come up ($IDIR/backend.log)"; done
echo "backends: $BE_LIST (ws_backend.py pid $(cat "$IDIR/backend.pid"))"

for lb in $LBS; do
  for m in $MODES; do measure "$lb" "$m"; done
done

{
  echo "## Idle connections: RSS per balancer (1 worker each)"
  echo
  echo "| balancer | mode | N | ok | RSS before (MB) | RSS with N idle (MB) | bytes/conn (KB) | RSS after close (MB) | after/before | freed | after close +${CLOSE_SAMPLES// /\/+}s (MB) |"
  echo "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
  cat "$RESULTS/rows.md"
  echo
  echo "bytes/conn = (idle - before) / N; freed = (idle - after) / (idle - before); RSS = VmRSS"
  echo "(nginx: master + worker). Before: after one warm-up request of the mode."
} | tee "$RESULTS/idle.md"
echo "results: $RESULTS"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
