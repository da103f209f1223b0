#!/usr/bin/env bash
# Light load on three balancers: three backends, one of which answers 25 ms late (`steady`) or
# becomes 25 ms late halfway through (`midway`); one client per balancer that waits 30 ms
# between requests (bench/light_client.py). Shoal (3 nodes, one cluster, defaults: only the
# backends and ports given), SHOALD_OLD (another shoald, the same way) when set, and three
# nginx `least_conn` (1 worker, upstream keepalive). Reports per run the slow backend's share
# and the clients' p50/p99/mean; `midway` also the second half alone.
#
#   SECONDS_PER_RUN=20 REPEATS=2 bench/light_load.sh      # SHOALD defaults to target/release/shoald
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUN_S=${SECONDS_PER_RUN:-20}
REPEATS=${REPEATS:-2}
SCENARIOS=${SCENARIOS:-steady midway}
bench_lock
B=(19601 19602 19603) P=(19611 19612 19613) C=(19621 19622 19623) A=(19631 19632 19633) G=(19641 19642 19643)
ports_free "${B[@]}" "${P[@]}" "${C[@]}" "${A[@]}"
dir=$BENCH_TMP/light_load
rm -rf "$dir"; mkdir -p "$dir"
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$dir"/nginx-*/nginx.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  sleep 0.5
}
trap stop_all EXIT

start_backends() { # scenario
  local late=()
  [ "$1" = midway ] && late=(--late-ms 25 --late-after-s "$((RUN_S / 2))")
  $(pin_prefix "$BACKEND_CPUS") python3 "$BENCH_DIR/light_backend.py" --port "${B[0]}" 2>>"$dir/backends.log" & pids+=($!)
  $(pin_prefix "$BACKEND_CPUS") python3 "$BENCH_DIR/light_backend.py" --port "${B[1]}" 2>>"$dir/backends.log" & pids+=($!)
  if [ "$1" = steady ]; then
    $(pin_prefix "$BACKEND_CPUS") python3 "$BENCH_DIR/light_backend.py" --port "${B[2]}" --delay-ms 25 2>>"$dir/backends.log" & pids+=($!)
  else
    $(pin_prefix "$BACKEND_CPUS") python3 "$BENCH_DIR/light_backend.py" --port "${B[2]}" "${late[@]}" 2>>"$dir/backends.log" & pids+=($!)
  fi
  for b in "${B[@]}"; do wait_port "$b" || die "backend $b"; done
}
start_shoal() { # binary
  local i seeds=() backends=()
  for b in "${B[@]}"; do backends+=(--backend "127.0.0.1:$b"); done
  for i in 0 1 2; do
    $(pin_prefix "$LB_CPUS") "$1" run --node-id "light-$((i + 1))" --listen "127.0.0.1:${P[$i]}" --control "127.0.0.1:${C[$i]}" \
      --admin "127.0.0.1:${A[$i]}" --gossip "127.0.0.1:${G[$i]}" "${seeds[@]}" "${backends[@]}" \
      >"$dir/shoal-$i.log" 2>&1 &
    pids+=($!)
    seeds+=(--seed "127.0.0.1:${G[$i]}")
  done
  for p in "${P[@]}"; do wait_port "$p" || die "shoal on $p"; done
  sleep 2 # the members find each other
}
start_nginx() {
  local i d
  for i in 0 1 2; do
    d=$dir/nginx-$i; mkdir -p "$d/logs"
    cat > "$d/nginx.conf" <<CONF
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  upstream app { least_conn; server 127.0.0.1:${B[0]}; server 127.0.0.1:${B[1]}; server 127.0.0.1:${B[2]}; keepalive 16; }
  server { listen 127.0.0.1:${P[$i]}; location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
CONF
    pin "$LB_CPUS" "$NGINX" -p "$d" -c "$d/nginx.conf"
  done
  for p in "${P[@]}"; do wait_port "$p" || die "nginx on $p"; done
}
run_client() { # scenario
  local halves=()
  [ "$1" = midway ] && halves=(--halves)
  pin "$LOAD_CPUS" timeout $((RUN_S + 30)) python3 "$BENCH_DIR/light_client.py" --seconds "$RUN_S" --pause-ms 30 \
    "${halves[@]}" "127.0.0.1:${P[0]}" "127.0.0.1:${P[1]}" "127.0.0.1:${P[2]}"
}

targets=(shoal nginx)
[ -n "${SHOALD_OLD:-}" ] && targets=(shoal shoal-old nginx)
echo "light load: 3 balancers, backends ${B[*]} (${B[2]} slow: 25 ms), 3 clients pausing 30 ms, ${RUN_S}s per run ($(date -u +%FT%TZ))"
for ((r = 1; r <= REPEATS; r++)); do
  for sc in $SCENARIOS; do
    for t in "${targets[@]}"; do
      start_backends "$sc"
      case $t in
        shoal) start_shoal "$SHOALD" ;;
        shoal-old) start_shoal "$SHOALD_OLD" ;;
        nginx) start_nginx ;;
      esac
      # The backends' clock (midway) starts with them; start the clients right away.
      run_client "$sc" | sed "s/^/$sc $t /"
      stop_all
    done
  done
done
