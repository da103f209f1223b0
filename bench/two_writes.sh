#!/usr/bin/env bash
# A backend that writes its head and body separately with Nagle on (bench/two_writes_backend.py,
# Python's http.server), behind Shoal (defaults: only the backend and ports given), nginx
# (upstream keepalive, HTTP/1.1 to the backend, as a user runs it) and directly; one client
# sending requests back to back (wrk -c1) for $DURATION s each, $REPEATS rounds. Reports
# req/s, p50 and p99 per target. SHOALD_OLD=<another shoald> measures that binary too.
#
#   bench/two_writes.sh            # SHOALD (default target/release/shoald), nginx, direct
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-5}
REPEATS=${REPEATS:-3}
BPORT=${BPORT:-19501} SPORT=${SPORT:-19502} OPORT=${OPORT:-19503} NPORT=${NPORT:-19504}
bench_lock
ports_free "$BPORT" "$SPORT" "$OPORT" "$NPORT" 19510 19511 19512 19513 19514 19515
dir=$BENCH_TMP/two_writes
rm -rf "$dir"; mkdir -p "$dir"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

$(pin_prefix "$BACKEND_CPUS") python3 "$BENCH_DIR/two_writes_backend.py" "$BPORT" 2>"$dir/backend.log" & pids+=($!)
start_shoal() { # binary port control admin gossip
  $(pin_prefix "$LB_CPUS") "$1" run --node-id "tw-$2" --listen "127.0.0.1:$2" --control "127.0.0.1:$3" \
    --admin "127.0.0.1:$4" --gossip "127.0.0.1:$5" --backend "127.0.0.1:$BPORT" >"$dir/shoal-$2.log" 2>&1 &
  pids+=($!)
}
start_shoal "$SHOALD" "$SPORT" 19510 19511 19512
[ -n "${SHOALD_OLD:-}" ] && start_shoal "$SHOALD_OLD" "$OPORT" 19513 19514 19515
mkdir -p "$dir/nginx/logs"
cat > "$dir/nginx/nginx.conf" <<CONF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  upstream app { server 127.0.0.1:$BPORT; keepalive 16; }
  server {
    listen 127.0.0.1:$NPORT;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
pin "$LB_CPUS" "$NGINX" -p "$dir/nginx" -c "$dir/nginx/nginx.conf"
targets=("direct $BPORT" "shoal $SPORT" "nginx $NPORT")
[ -n "${SHOALD_OLD:-}" ] && targets+=("shoal-old $OPORT")
for t in "${targets[@]}"; do wait_port "${t#* }" || die "${t% *} does not answer on ${t#* }"; done
echo "two-write backend, one client back to back, ${DURATION}s x $REPEATS ($(date -u +%FT%TZ))"
for ((r = 1; r <= REPEATS; r++)); do
  for t in "${targets[@]}"; do
    printf '%-10s %s\n' "${t% *}" "$(run_wrk "http://127.0.0.1:${t#* }/" 1 "$DURATION")"
  done
done
