#!/usr/bin/env bash
# HTTPS termination: Shoal (shoald) vs nginx (1 worker) vs HAProxy (1 thread), side by side in
# one run, all pinned to the same CPU, least-connections over the same 4 backends with
# HTTP/1.1 keep-alive to them, all serving the SAME ECDSA P-256 certificate and key
# (openssl, $BENCH_TMP/tls/cert.pem + key.pem). Three tests, each run per balancer:
#   new        full TLS 1.3 handshakes per second: every connection is new (no session offered),
#              handshake + one GET (Connection: close), read to the server's close
#   resume     resumed TLS 1.3 handshakes per second: the same, each connection offering a
#              session ticket its slot received earlier, once (PSK with (EC)DHE, as browsers do)
#   keepalive  HTTPS req/s over KA_CONNS (64) keep-alive connections (wrk -t1 over https)
# For every run: rate, the balancer's on-CPU time (all its threads/processes, schedstat) per
# handshake or request, the balancer's and the client's CPU share, latency, the share of
# resumed handshakes, errors, and the CPU used by other jobs (noise). Rounds interleave the
# balancers (order rotated every round). Summary: medians, and ratios of the first of KINDS
# (shoal) to each other (per-round ratios, median).
# Stops everything it started on exit (also on ^C).
#
#   bench/tls.sh
#   env: KINDS="shoal nginx haproxy"  balancers to run; the first is the ratios' numerator
#                                     (KINDS="nginx haproxy" without a TLS-capable shoald)
#        TESTS="new resume keepalive" REPEATS=3 DURATION=5 (s per run)
#        HS_CONNS=32                  connections in flight in the handshake tests
#        KA_CONNS=64                  wrk -c in the keep-alive test (wrk -t$THREADS, 1)
#        TLS_CLIENT=rust              handshake client: rust (bench/tls_load) or openssl (tls_client.c)
#        SHOAL_KEEPALIVE=16           Shoal's idle pool per backend (= the peers' 64 in total)
#        SHOAL_BUILD=0                1 = cargo build --release -p shoal-node first
#        SHOALD=<repo>/target/release/shoald
#        RESULTS=$BENCH_TMP/tls-<time>   summary.md, runs.tsv, machine.txt, configs, logs
#        BENCH_TMP=${TMPDIR:-/tmp}/shoaltls   (own state dir and lock)
#        QUIET_MAX_PCT=10 QUIET_TIMEOUT=60 NOISE_PCT=20 PAUSE=1   as in compare.sh
#   plus lib.sh's LOAD_CPUS (client, 1) LB_CPUS (balancers, 0) BACKEND_CPUS (backends, 1).
# Ports: nginx :18443, HAProxy :18444, Shoal TLS :18445 (plain :18446, admin :19446, control
# :17446, gossip :17946/udp); backends :19101..19104 (backends.sh, BACKEND_BASE_PORT=19100).
# Each can be moved by its variable (NGINX_PORT HAPROXY_PORT SHOAL_PORT SHOAL_PLAIN SHOAL_ADMIN
# SHOAL_CONTROL SHOAL_GOSSIP BACKEND_BASE_PORT) when something else holds it.
# Clients: the handshake tests use bench/tls_load (Rust: rustls + ring, one thread; built with
# cargo into $BENCH_TMP/tls/target): ~235 us of CPU per full handshake (~160 us resumed) against
# ~590 us (~280 us) for the same client on this machine's OpenSSL 3.0 (bench/tls_client.c,
# TLS_CLIENT=openssl; gcc -lssl), so that one client core can outrun nginx's and HAProxy's core
# (it still bounds Shoal's handshake rates: see the load CPU column). Keep-alive: wrk (OpenSSL).
# Each load run is bounded (client duration + `timeout`). X25519 is the key share everywhere;
# the client checks the CertificateVerify signature but not the chain (self-signed certificate).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export BENCH_TMP=${BENCH_TMP:-${TMPDIR:-/tmp}/shoaltls}
export BACKEND_BASE_PORT=${BACKEND_BASE_PORT:-19100}
. "$HERE/lib.sh"

KINDS=${KINDS:-shoal nginx haproxy}
TESTS=${TESTS:-new resume keepalive}
REPEATS=${REPEATS:-3}
DURATION=${DURATION:-5}
HS_CONNS=${HS_CONNS:-32}
KA_CONNS=${KA_CONNS:-64}
PAUSE=${PAUSE:-1}
NOISE_PCT=${NOISE_PCT:-20}
BACKENDS=4
LB_KEEPALIVE=64
SHOAL_KEEPALIVE=${SHOAL_KEEPALIVE:-$(( (LB_KEEPALIVE + BACKENDS - 1) / BACKENDS ))}
NGINX_PORT=${NGINX_PORT:-18443} HAPROXY_PORT=${HAPROXY_PORT:-18444} SHOAL_PORT=${SHOAL_PORT:-18445}
SHOAL_PLAIN=${SHOAL_PLAIN:-18446} SHOAL_ADMIN=${SHOAL_ADMIN:-19446} SHOAL_CONTROL=${SHOAL_CONTROL:-17446}
SHOAL_GOSSIP=${SHOAL_GOSSIP:-17946}
TDIR=$BENCH_TMP/tls                 # certificate, client binary, per-balancer state
CERT=$TDIR/cert.pem KEY=$TDIR/key.pem
TLS_CLIENT=${TLS_CLIENT:-rust}
case $TLS_CLIENT in rust) CLIENT=$TDIR/target/release/tls-load ;; *) CLIENT=$TDIR/tls_client ;; esac
RESULTS=${RESULTS:-$BENCH_TMP/tls-$(date +%Y%m%d-%H%M%S)}
BE_PORTS=$(seq $((BACKEND_BASE_PORT + 1)) $((BACKEND_BASE_PORT + BACKENDS)))

cleanup() {
  local k f
  for k in shoal nginx haproxy; do
    stop_lb "$k" >/dev/null 2>&1 || true
    for f in "$TDIR/$k"/*.log; do [ -e "$f" ] && cp "$f" "$RESULTS/$k-$(basename "$f")"; done
  done
  "$HERE/backends.sh" stop >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------- certificate, client
make_cert() { # one ECDSA P-256 certificate + key for all balancers (kept across runs)
  mkdir -p "$TDIR"
  if [ ! -s "$CERT" ] || [ ! -s "$KEY" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
      -keyout "$KEY.tmp" -out "$CERT.tmp" 2>/dev/null || die "openssl could not make the certificate"
    mv "$KEY.tmp" "$KEY"; mv "$CERT.tmp" "$CERT"
  fi
  cat "$CERT" "$KEY" > "$TDIR/haproxy.pem"   # HAProxy wants certificate and key in one file
}

build_client() { # the handshake tests' client: tls_load/ (rustls + ring) or tls_client.c (OpenSSL)
  case $TLS_CLIENT in
    rust)
      (cd "$HERE/tls_load" && CARGO_TARGET_DIR=$TDIR/target nice -n 10 cargo build --release --locked -q) \
        || die "building bench/tls_load failed"
      ;;
    openssl)
      local src=$HERE/tls_client.c
      if [ ! -x "$CLIENT" ] || [ "$src" -nt "$CLIENT" ]; then
        gcc -O2 -Wall -o "$CLIENT.tmp" "$src" -lssl -lcrypto || die "building $src failed (libssl-dev: bench/setup.sh)"
        mv "$CLIENT.tmp" "$CLIENT"
      fi
      ;;
    *) die "TLS_CLIENT must be rust or openssl" ;;
  esac
}

# ---------------------------------------------------------------- configs
# nginx and HAProxy: lb.sh's configs (least-conn, 64 idle upstream connections, no access log)
# with a TLS listener instead of the plain one. nginx 1.22 enables TLSv1.3 only when told
# (its default protocols are TLSv1 TLSv1.1 TLSv1.2), hence ssl_protocols; everything else TLS is
# its default (session tickets on, no shared session cache). HAProxy: `bind ... ssl crt`,
# its defaults (TLSv1.2+, tickets on, 20000-entry session cache).
nginx_conf() {
  local p
  cat <<EOF
worker_processes 1;
worker_rlimit_nofile 16384;
pid nginx.pid;
error_log error.log warn;
events { worker_connections 8192; }
http {
  client_body_temp_path body_tmp; proxy_temp_path proxy_tmp; fastcgi_temp_path fcgi_tmp;
  uwsgi_temp_path uwsgi_tmp; scgi_temp_path scgi_tmp;
  access_log off;
  server_tokens off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  upstream be {
    least_conn;
    zone be 64k;
EOF
  for p in $BE_PORTS; do echo "    server 127.0.0.1:$p max_fails=0;"; done
  cat <<EOF
    keepalive $LB_KEEPALIVE;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT ssl backlog=4096;
    ssl_certificate $CERT;
    ssl_certificate_key $KEY;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
}

haproxy_conf() {
  local p i=0
  cat <<EOF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 120s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:$HAPROXY_PORT ssl crt $TDIR/haproxy.pem
  default_backend be
backend be
  balance leastconn
  default-server pool-max-conn $(( (LB_KEEPALIVE + BACKENDS - 1) / BACKENDS ))
EOF
  for p in $BE_PORTS; do i=$((i + 1)); echo "  server b$i 127.0.0.1:$p"; done
}

one_cpu() { # as shoal.sh: true when the taskset list names exactly one CPU
  case "$1" in '' | *,*) return 1 ;; *-*) [ "${1%-*}" = "${1#*-}" ] ;; *) return 0 ;; esac
}

# Shoal: as bench/shoal.sh writes it (its defaults plus the addresses, least-conn, the backends,
# the keep-alive pool; `workers` only when not pinned to one CPU) and the [tls] section.
shoal_conf() {
  local p
  cat <<EOF
# generated by bench/tls.sh
[node]
id = "bench-tls"
listen = "127.0.0.1:$SHOAL_PLAIN"
admin = "127.0.0.1:$SHOAL_ADMIN"
control = "127.0.0.1:$SHOAL_CONTROL"
gossip = "127.0.0.1:$SHOAL_GOSSIP"
EOF
  one_cpu "$LB_CPUS" || echo "workers = 1"
  cat <<EOF

[tls]
listen = "127.0.0.1:$SHOAL_PORT"
certificates = [{ cert = "$CERT", key = "$KEY" }]

[upstream]
algorithm = "least-conn"
keepalive = $SHOAL_KEEPALIVE
EOF
  for p in $BE_PORTS; do printf '\n[[upstream.backend]]\naddr = "127.0.0.1:%s"\n' "$p"; done
}

# ---------------------------------------------------------------- balancers
lb_port() { case $1 in nginx) echo $NGINX_PORT ;; haproxy) echo $HAPROXY_PORT ;; shoal) echo $SHOAL_PORT ;; *) die "unknown balancer $1" ;; esac; }

shoal_has_tls() { [ -x "$SHOALD" ] && "$SHOALD" run --help 2>/dev/null | grep -q -- '--tls-listen'; }

start_lb() { # kind
  local k=$1 d=$TDIR/$1 pre
  stop_lb "$k"
  rm -rf "$d"; mkdir -p "$d"
  case $k in
    nginx)
      nginx_conf > "$d/nginx.conf"
      pin "$LB_CPUS" "$NGINX" -p "$d" -c "$d/nginx.conf" -e "$d/error.log" || die "nginx failed ($d/error.log)"
      ;;
    haproxy)
      haproxy_conf > "$d/haproxy.cfg"
      pin "$LB_CPUS" "$HAPROXY" -D -q -f "$d/haproxy.cfg" -p "$d/haproxy.pid" > "$d/error.log" 2>&1 \
        || { cat "$d/error.log" >&2; die "haproxy failed ($d/error.log)"; }
      ;;
    shoal)
      shoal_conf > "$d/shoal.toml"
      read -ra pre <<< "$(pin_prefix "$LB_CPUS")"
      # taskset/nice/setsid exec in turn, so $! is shoald itself. RUST_LOG: the caller's, if any.
      "${pre[@]}" setsid "$SHOALD" run --config "$d/shoal.toml" > "$d/shoald.log" 2>&1 < /dev/null &
      echo $! > "$d/shoald.pid"
      ;;
  esac
  local port i
  port=$(lb_port "$k")
  for ((i = 0; i < 100; i++)); do
    curl -sfk -o /dev/null -m 1 --resolve "localhost:$port:127.0.0.1" "https://localhost:$port/" && break
    sleep 0.1
  done
  ((i < 100)) || { tail -20 "$d"/*.log >&2 || true; die "$k does not answer https://localhost:$port/ (logs in $d)"; }
  echo "$k: https://localhost:$port/ pids $(lb_pids "$k" | tr '\n' ' ')cpus=${LB_CPUS:-any} body: $(curl -sk -m 2 --resolve "localhost:$port:127.0.0.1" "https://localhost:$port/")"
}

stop_lb() {
  local d=$TDIR/$1
  [ -d "$d" ] || return 0
  stop_pidfile "$d/nginx.pid" QUIT
  stop_pidfile "$d/haproxy.pid" USR1
  stop_pidfile "$d/shoald.pid" TERM
}

lb_pids() { balancer_pids "$TDIR/$1" "$1"; } # kind -> every process of the balancer

# resumption_check KIND -> "yes (Reused, TLSv1.3)" or "NO ...": openssl s_client saves the
# session of one request and offers it on a second connection (independent of tls_client)
resumption_check() {
  local port s=$TDIR/$1.sess out
  port=$(lb_port "$1")
  rm -f "$s"
  printf 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' > "$TDIR/req.txt"
  timeout 10 openssl s_client -connect "127.0.0.1:$port" -servername localhost -tls1_3 -ign_eof \
    -sess_out "$s" < "$TDIR/req.txt" > "$TDIR/$1.s1.out" 2>&1 || true
  [ -s "$s" ] || { echo "NO (no session saved)"; return; }
  timeout 10 openssl s_client -connect "127.0.0.1:$port" -servername localhost -tls1_3 -ign_eof \
    -sess_in "$s" < "$TDIR/req.txt" > "$TDIR/$1.s2.out" 2>&1 || true
  out=$(grep -m1 -E '^(Reused|New),' "$TDIR/$1.s2.out" || echo "?")
  case $out in Reused*) echo "yes ($out)" ;; *) echo "NO ($out)" ;; esac
}

# ---------------------------------------------------------------- one run
children_ns() { # CPU of this shell's waited-for children (the load clients), ns
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.0f", ($14 + $15) * 1e9 / hz }' /proc/$$/stat
}

run_client() { # port mode -> tls_client's RESULT line (without "RESULT ")
  pin "$LOAD_CPUS" timeout -k 5 $((DURATION + 20)) "$CLIENT" --port "$1" --mode "$2" \
    --conns "$HS_CONNS" --secs "$DURATION" 2>> "$RESULTS/client.err" | grep '^RESULT ' | sed 's/^RESULT //' || true
}

shoal_tls_counts() { # -> "handshakes resumed" from Shoal's admin /metrics (its own counters)
  curl -s -m 2 "http://127.0.0.1:$SHOAL_ADMIN/metrics" | awk '/^[a-z_]*tls_handshakes(_total)? / { h = $NF }
    /^[a-z_]*tls_resumed_handshakes(_total)? / { r = $NF } END { printf "%d %d", h, r }'
}

alive() { # kind pids: stop the whole run if a balancer process is gone (a crash, or a kill from
  # outside: once a shoald under test got a SIGTERM from another job on this machine)
  local p
  for p in $2; do
    kill -0 "$p" 2>/dev/null && continue
    tail -5 "$TDIR/$1"/*.log >&2 2>/dev/null || true
    die "$1 (pid $p) is gone; its log: $TDIR/$1/"
  done
}

# one TEST KIND ROUND -> prints a line, appends a row to runs.tsv
one() {
  local test=$1 kind=$2 round=$3 port pids allp c0 c1 a0 a1 k0 k1 w0 w1 t0 t1 line
  local ops=0 rate=0 p50=0 p99=0 errs=0 resumed="-" lb_us=0 lb_pct=0 cl_pct=0 other detail="" l0=0 l1=0 load_pct=-
  port=$(lb_port "$kind")
  pids=$(lb_pids "$kind")
  allp=$(printf '%s\n' $pids $ALL_PIDS | sort -u)
  alive "$kind" "$pids"
  local sv0="" sv1=""   # Shoal's own handshake counters around the run (outside the CPU window)
  [ "$kind" = shoal ] && sv0=$(shoal_tls_counts)
  wait_quiet
  one_cpu "$LOAD_CPUS" && l0=$(cpu_busy_ns "${LOAD_CPUS%-*}")
  c0=$(cpu_ns $pids); a0=$(cpu_ns $allp); k0=$(cpu_busy_ns); w0=$(children_ns); t0=$(date +%s%N)
  case $test in
    new | resume) line=$(run_client "$port" "$test") ;;
    keepalive) line=$(run_wrk "https://localhost:$port/" "$KA_CONNS" "$DURATION") ;;
  esac
  c1=$(cpu_ns $pids); a1=$(cpu_ns $allp); k1=$(cpu_busy_ns); w1=$(children_ns); t1=$(date +%s%N)
  alive "$kind" "$pids"
  [ "$kind" = shoal ] && sv1=$(shoal_tls_counts)
  one_cpu "$LOAD_CPUS" && l1=$(cpu_busy_ns "${LOAD_CPUS%-*}")
  if [ -z "$line" ]; then
    echo "  $test $kind round $round: the client produced no result (see $RESULTS/client.err)" >&2
    errs=-1
  elif [ "$test" = keepalive ]; then
    local tagpct rps p90 max req err non2xx slowpct p99co corrected
    eval "$line"
    ops=$req rate=$rps errs=$((err + non2xx))
    detail="wrk err=$err non2xx=$non2xx"
  else
    local mode conns secs ok reused full err non200 timeout tickets offered p50_ms p99_ms cpu_pct version cipher group
    eval "$line"
    ops=$ok rate=$rate p50=$p50_ms p99=$p99_ms errs=$((err + non200 + timeout))
    resumed=$(awk -v r="$reused" -v n="$ok" 'BEGIN { printf "%.1f", (n > 0) ? 100 * r / n : 0 }')
    detail="$version $cipher $group reused=$reused full=$full err=$err non200=$non200 timeout=$timeout"
    if [ -n "$sv0" ] && [ -n "$sv1" ]; then   # the server's own count of the same run
      set -- $sv0 $sv1
      detail+=" shoal_counted_handshakes=$(($3 - $1)) shoal_counted_resumed=$(($4 - $2))"
    fi
    echo "$kind $test $version $cipher $group" >> "$RESULTS/negotiated.txt"
  fi
  local wall=$((t1 - t0))
  if [ "$ops" -gt 0 ]; then
    lb_us=$(awk -v a="$c0" -v b="$c1" -v n="$ops" 'BEGIN { printf "%.2f", (b - a) / 1000 / n }')
  fi
  lb_pct=$(awk -v a="$c0" -v b="$c1" -v t="$wall" 'BEGIN { printf "%.0f", 100 * (b - a) / t }')
  cl_pct=$(awk -v a="$w0" -v b="$w1" -v t="$wall" 'BEGIN { printf "%.0f", 100 * (b - a) / t }')
  # the load CPU's busy share (client + backends): near 100% = the load side, not the balancer,
  # bounds the rate (then compare CPU per op, not rates)
  one_cpu "$LOAD_CPUS" && load_pct=$(awk -v a="$l0" -v b="$l1" -v t="$wall" 'BEGIN { x = 100 * (b - a) / t; printf "%.0f", (x > 100) ? 100 : x }')
  other=$(awk -v k="$((k1 - k0))" -v a="$((a1 - a0))" -v w="$((w1 - w0))" -v t="$wall" \
    'BEGIN { o = (k - a - w) * 100 / t; printf "%.0f", (o < 0) ? 0 : o }')
  printf '  %-9s %-7s round %-2s %9s /s  balancer %7s us/op (%3s%% cpu)  client %3s%% cpu (cpu %s: %s%%)  p50 %6s ms  p99 %6s ms  resumed %5s%%  errors %s%s\n' \
    "$test" "$kind" "$round" "$rate" "$lb_us" "$lb_pct" "$cl_pct" "${LOAD_CPUS:-any}" "$load_pct" "$p50" "$p99" "$resumed" "$errs" \
    "$( [ "$other" -gt "$NOISE_PCT" ] && echo "  NOISE: other jobs used ${other}% of a core")"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$test" "$kind" "$round" "$rate" "$lb_us" \
    "$lb_pct" "$cl_pct" "$p50" "$p99" "$resumed" "$errs" "$other" "$ops" "$load_pct" "$detail" >> "$RESULTS/runs.tsv"
  sleep "$PAUSE"
}

# ---------------------------------------------------------------- summary
summarize() { # runs.tsv -> markdown
  awk -F'\t' -v kinds="$KINDS" -v tests="$TESTS" -v noise="$NOISE_PCT" '
  function med(a, n,   i, j, t) {
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  # median of column c over the clean runs of (test, kind); all runs when none is clean
  function mcol(t, k, c,   r, n, a, useall) {
    useall = (clean[t, k] == 0)
    n = 0; for (r = 1; r <= nr; r++) if (((t, k, r) in v) && (useall || ok[t, k, r])) a[++n] = col[t, k, r, c]
    return n ? med(a, n) : 0
  }
  function mload(t, k,   x) { x = mcol(t, k, 14); return (loadset[t, k]) ? sprintf("%.0f", x) : "-" }
  NR == 1 { next }
  {
    t = $1; k = $2; r = $3 + 0; if (r > nr) nr = r
    v[t, k, r] = 1
    for (c = 4; c <= 14; c++) col[t, k, r, c] = $c
    ok[t, k, r] = ($12 + 0 <= noise && $11 + 0 == 0)
    if ($14 != "-") loadset[t, k] = 1
    total[t, k]++; if (ok[t, k, r]) clean[t, k]++
    errsum[t, k] += ($11 + 0 < 0) ? 0 : $11
  }
  END {
    nk = split(kinds, K, " "); nt = split(tests, T, " ")
    unit["new"] = "handshakes/s"; unit["resume"] = "handshakes/s"; unit["keepalive"] = "req/s"
    name["new"] = "new TLS 1.3 handshakes"; name["resume"] = "resumed TLS 1.3 handshakes"; name["keepalive"] = "keep-alive HTTPS requests"
    print "| test | balancer | rate | balancer CPU µs per op | ops per balancer CPU-second | balancer CPU % | client CPU % | load CPU busy % | p50 ms | p99 ms | resumed | errors | clean runs |"
    print "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for (i = 1; i <= nt; i++) for (j = 1; j <= nk; j++) {
      t = T[i]; k = K[j]; if (!total[t, k]) continue
      us = mcol(t, k, 5)
      printf "| %s (%s) | %s | %.0f | %.2f | %.0f | %.0f | %.0f | %s | %.2f | %.2f | %s | %d | %d/%d |\n", name[t], unit[t], k,
        mcol(t, k, 4), us, (us > 0) ? 1e6 / us : 0, mcol(t, k, 6), mcol(t, k, 7), mload(t, k), mcol(t, k, 8), mcol(t, k, 9),
        (t == "keepalive") ? "-" : sprintf("%.1f%%", mcol(t, k, 10)), errsum[t, k], clean[t, k], total[t, k]
    }
    if (nk < 2) exit
    print ""
    print "| test | ratio | rate | CPU per op | per-round rate ratios | per-round CPU ratios |"
    print "| --- | --- | ---: | ---: | --- | --- |"
    for (i = 1; i <= nt; i++) for (j = 2; j <= nk; j++) {
      t = T[i]; a = K[1]; b = K[j]; n = 0; m = 0; lr = ""; lc = ""
      delete x; delete y
      for (r = 1; r <= nr; r++) {
        if (!((t, a, r) in v) || !((t, b, r) in v)) continue
        if (col[t, b, r, 4] <= 0 || col[t, b, r, 5] <= 0) continue
        # medians over rounds where both were clean; over all rounds when there is none
        xr = col[t, a, r, 4] / col[t, b, r, 4]; yr = col[t, a, r, 5] / col[t, b, r, 5]
        lr = lr sprintf(" %.2f", xr); lc = lc sprintf(" %.2f", yr)
        if (ok[t, a, r] && ok[t, b, r]) { x[++n] = xr; y[n] = yr }
        allx[r] = xr; ally[r] = yr
      }
      if (n == 0) for (r = 1; r <= nr; r++) if (r in allx) { x[++n] = allx[r]; y[n] = ally[r] }
      delete allx; delete ally
      if (n == 0) continue
      printf "| %s | %s/%s | %.2f | %.2f |%s |%s |\n", name[t], a, b, med(x, n), med(y, n), lr, lc
    }
  }' "$1"
}

# ---------------------------------------------------------------- main
[ $# -eq 0 ] || { sed -n '2,42p' "$0"; exit 2; }
# lock and port check before the cleanup trap: if another run is going on, leave it alone
bench_lock
# shellcheck disable=SC2086
ports_free $BE_PORTS $NGINX_PORT $HAPROXY_PORT $SHOAL_PORT $SHOAL_PLAIN $SHOAL_ADMIN $SHOAL_CONTROL
[ -z "$(ss -Hlun "sport = :$SHOAL_GOSSIP" 2>/dev/null)" ] || die "udp port $SHOAL_GOSSIP is already in use"
for k in $KINDS; do lb_port "$k" > /dev/null; done
if [[ " $KINDS " == *" shoal "* ]]; then
  [ "${SHOAL_BUILD:-0}" = 1 ] && "$HERE/shoal.sh" build
  shoal_has_tls || die "$SHOALD has no TLS listener ('run --help' lists no --tls-listen): build it, set SHOALD, or run KINDS=\"nginx haproxy\""
fi
command -v openssl > /dev/null && command -v gcc > /dev/null && [ -e /usr/include/openssl/ssl.h ] \
  && [ -x "$NGINX" ] && [ -x "$HAPROXY" ] && command -v "$WRK" > /dev/null || "$HERE/setup.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$RESULTS" "$TDIR"
make_cert
build_client
: > "$RESULTS/negotiated.txt"
printf 'test\tkind\tround\trate\tlb_us_per_op\tlb_cpu_pct\tclient_cpu_pct\tp50_ms\tp99_ms\tresumed_pct\terrors\tother_pct\tops\tload_cpu_pct\tdetail\n' > "$RESULTS/runs.tsv"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "bench commit: $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO_DIR" diff --quiet HEAD -- node proto 2>/dev/null || echo ' (+ uncommitted changes in node/ or proto/)')"
  [[ " $KINDS " == *" shoal "* ]] && echo "shoald: $SHOALD (built $(date -u -r "$SHOALD" +%Y-%m-%dT%H:%M:%SZ))"
  echo "cpu: $(nproc) x $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "nginx: $("$NGINX" -v 2>&1 | sed 's/.*: //')  haproxy: $("$HAPROXY" -v 2>&1 | head -1 | awk '{print $3}')  openssl: $(openssl version | awk '{print $2}')  wrk: $("$WRK" -v 2>&1 | head -1 | awk '{print $2}')"
  echo "certificate: $(openssl x509 -in "$CERT" -noout -text | grep -m1 -o 'ASN1 OID: .*\|NIST CURVE: .*' || true) ($CERT)"
  echo "handshake client: $TLS_CLIENT ($( [ "$TLS_CLIENT" = rust ] && echo "bench/tls_load: rustls $(awk '/^name = "rustls"$/ {getline; print $3}' "$HERE/tls_load/Cargo.lock" | tr -d '"') + ring, tokio current-thread" || echo "bench/tls_client.c: OpenSSL $(openssl version | awk '{print $2}')"))"
  echo "placement: balancers cpus=${LB_CPUS:-any}, client cpus=${LOAD_CPUS:-any}, backend cpus=${BACKEND_CPUS:-any}"
  echo "runs: KINDS=\"$KINDS\" TESTS=\"$TESTS\" REPEATS=$REPEATS DURATION=${DURATION}s HS_CONNS=$HS_CONNS KA_CONNS=$KA_CONNS (wrk -t${THREADS:-1}) RUST_LOG=${RUST_LOG:-unset}"
} | tee "$RESULTS/machine.txt"

"$HERE/backends.sh" start "$BACKENDS" --no-log
for k in $KINDS; do
  start_lb "$k"
  cp "$TDIR/$k"/*.conf "$TDIR/$k"/*.cfg "$TDIR/$k"/*.toml "$RESULTS/" 2>/dev/null || true
done
ALL_PIDS=$(for k in $KINDS; do lb_pids "$k"; done
  for p in $BE_PORTS; do port_pids "http://127.0.0.1:$p/"; done)
for k in $KINDS; do echo "resumption ($k, openssl s_client -sess_out / -sess_in): $(resumption_check "$k")"; done \
  | tee "$RESULTS/resumption.txt"

read -ra KA <<< "$KINDS"
for test in $TESTS; do
  echo "== $test"
  for k in "${KA[@]}"; do   # warm-up, not recorded
    case $test in
      keepalive) run_wrk "https://localhost:$(lb_port "$k")/" "$KA_CONNS" 1 > /dev/null ;;
      *) DURATION=1 run_client "$(lb_port "$k")" "$test" > /dev/null ;;
    esac
  done
  for ((r = 1; r <= REPEATS; r++)); do
    for ((i = 0; i < ${#KA[@]}; i++)); do   # order rotated every round
      one "$test" "${KA[$(( (i + r - 1) % ${#KA[@]} ))]}" "$r"
    done
  done
done

# Shoal's own TLS counters (admin /metrics): handshakes and resumed handshakes, server side
SHOAL_TLS=""
if [[ " $KINDS " == *" shoal "* ]]; then
  curl -s -m 2 "http://127.0.0.1:$SHOAL_ADMIN/metrics" | grep -E '^[a-z_]*tls_' > "$RESULTS/shoal-tls-metrics.txt" || true
  SHOAL_TLS=$(awk '/tls_handshakes(_total)?[ {]/ { h += $NF } /tls_resumed_handshakes(_total)?[ {]/ { r += $NF }
    /tls_handshake_failures/ { f += $NF }
    END { if (h) printf "%d handshakes, %d resumed (%.1f%%), %d failed", h, r, 100 * r / h, f }' "$RESULTS/shoal-tls-metrics.txt")
fi

{
  echo "## HTTPS termination ($REPEATS rounds, ${DURATION}s each; medians)"
  echo
  summarize "$RESULTS/runs.tsv"
  echo
  echo "Negotiated (client view): $(sort -u "$RESULTS/negotiated.txt" | awk '{print $1 ": " $3 " " $4 " " $5}' | sort -u | paste -sd';' | sed 's/;/; /g')"
  [ -n "$SHOAL_TLS" ] && echo "Shoal's own counters over the whole run (warm-ups and all tests): $SHOAL_TLS"
  echo "Resumption check (openssl s_client): $(sed 's/^resumption (\([a-z]*\)[^:]*): /\1 /' "$RESULTS/resumption.txt" | paste -sd';' | sed 's/;/; /g')"
  echo "op = one handshake (new connection + one GET) or one keep-alive request; balancer CPU = on-CPU"
  echo "time of all its threads (nginx: master + worker) over the run / ops; ops per balancer CPU-second ="
  echo "1e6 / µs per op (the rate the balancer would reach at 100% of its core); client CPU in % of one"
  echo "core; load CPU busy = CPU ${LOAD_CPUS:-?} (client + backends): near 100% means the load side bounded the rate."
} | tee "$RESULTS/summary.md"
echo "results: $RESULTS"
