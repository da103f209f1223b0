#!/usr/bin/env bash
# Routing cost: Shoal with 1,000 [[route]]s against Shoal with one pool and no routes, the same
# 4 backends behind both, in alternating rounds (A B / B A), at 64 and 256 connections.
#   single      [upstream] with the 4 backends, no routes (shoal.sh's config)
#   routes1000  the same [upstream] (pool "default") and [upstreams.api] with the SAME 4
#               backends, plus 1,000 routes, every other one to api:
#                 500 exact hosts      h0001.example.com .. h0500.example.com   (path "/")
#                 300 wildcard hosts   *.w0001.example.com .. *.w0300.example.com
#                 100 path prefixes    /p0001/ .. /p0100/ under host h0250.example.com
#                 100 path prefixes    /p0101/ .. /p0200/ under any host
# Every request of both runs is `GET /p0050/x` with `Host: h0250.example.com` (wrk -H), which
# in routes1000 matches route #550 of 1,000, h0250.example.com/p0050/ -> api (an exact host
# that carries 101 routes, longest prefix among them; the near miss h0250.example.com/ goes to
# "default"), so every request pays a full lookup with normalisation's fast path (lower-case
# host, no port, clean path) and lands on the same 4 backends with the same keep-alive pool
# (16 idle per backend, per pool) as in single: backend cost is identical.
# Both shoalds stay up the whole time (pinned to CPU 0, one loaded at a time); wrk and the
# backends on CPU 1. Per run: req/s, raw p50/p99 (report.lua), shoald's on-CPU time per
# request (schedstat of all its threads, lib.sh cpu_ns, as compare.sh), shoald's and CPU 1's
# busy share, CPU used by other jobs (noise), wrk errors and non-2xx, and the requests each pool
# counted (admin /status): routes1000 must send them all to api, single to default.
# Before the rounds: a throw-away routes1000 shoald with an access log checks that the request
# really takes that route (and the near miss and a wildcard theirs), and `shoal route list`
# when the CLI is built; `cargo run --release -p shoal-node --example route_match` (the table's
# lookup alone, ns per lookup) is run once, pinned like shoald, if the example exists.
# Summary: medians per target, medians of per-round ratios routes1000/single (req/s, CPU per
# request), against the target "routing at 1,000 routes costs < 3% of req/s".
# At 256 connections the default pool (16 idle per backend, 64 in all, as run.sh gives every
# balancer) makes shoald open ~300 backend connections per 1,000 requests, and that churn moves
# CPU per request by more than the routing costs: SHOAL_KEEPALIVE=64 CONNS=256 removes it.
# Stops everything it started on exit (also on ^C).
#
#   bench/routes.sh
#   env: REPEATS=5 DURATION=5 CONNS="64 256" PAUSE=1     rounds / s per wrk run / wrk -c / s between
#        KINDS="single routes1000"   add routes1 (the same two pools and only the request's route:
#                               what routing costs apart from the table's size); order rotated per round
#        SHOAL_BUILD=1          0 = use the existing target/release/shoald (and example, CLI)
#        SHOAL_KEEPALIVE=16     idle upstream connections per backend, per pool (64 / 4 backends)
#        ROUTE_MATCH=1          0 = skip the route_match example
#        LOCK_WAIT=3600         s to wait for $BENCH_TMP/.lock (run.sh, profile.sh) and for the
#                               locks of tls.sh / idle.sh (held too, so they cannot start meanwhile)
#        RESULTS=$BENCH_TMP/routes-<time>   summary.md, runs.tsv, machine.txt, configs, logs
#        QUIET_MAX_PCT=10 QUIET_TIMEOUT=60 NOISE_PCT=20   as in compare.sh
#   plus lib.sh's LOAD_CPUS (wrk, 1) LB_CPUS (shoald, 0) BACKEND_CPUS (backends, 1) BENCH_TMP.
# Ports: backends :19001..19004 (backends.sh, as run.sh: same lock); single :18710 (admin
# :18711, control :18712, gossip :18713/udp); routes1000 :18720 (18721-18723); the check
# instance :18730 (18731-18733); routes1 :18740 (18741-18743). Every load run is
# `wrk -d DURATION` under `timeout`.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"

REPEATS=${REPEATS:-5}
DURATION=${DURATION:-5}
CONNS=${CONNS:-64 256}
PAUSE=${PAUSE:-1}
NOISE_PCT=${NOISE_PCT:-20}
LOCK_WAIT=${LOCK_WAIT:-3600}
BACKENDS=4
LB_KEEPALIVE=64
SHOAL_KEEPALIVE=${SHOAL_KEEPALIVE:-$(( (LB_KEEPALIVE + BACKENDS - 1) / BACKENDS ))}
KINDS=${KINDS:-single routes1000}
REQ_HOST=h0250.example.com
REQ_PATH=/p0050/x
TARGET_ROUTE=h0250.example.com/p0050/
RDIR=$BENCH_TMP/routes
RESULTS=${RESULTS:-$BENCH_TMP/routes-$(date +%Y%m%d-%H%M%S)}
BE_PORTS=$(seq $((BACKEND_BASE_PORT + 1)) $((BACKEND_BASE_PORT + BACKENDS)))

base_port() { case $1 in single) echo 18710 ;; routes1000) echo 18720 ;; check) echo 18730 ;; routes1) echo 18740 ;; *) die "unknown kind $1" ;; esac; }
admin_port() { echo $(($(base_port "$1") + 1)); }

one_cpu() { # as shoal.sh: true when the taskset list names exactly one CPU
  case "$1" in '' | *,*) return 1 ;; *-*) [ "${1%-*}" = "${1#*-}" ] ;; *) return 0 ;; esac
}

# ---------------------------------------------------------------- configs
# shoal.sh's config (its defaults plus addresses, least-conn, the backends, the keep-alive pool;
# `workers` only when not pinned to one CPU), plus, for routes1000, the api pool and the routes.
pool_table() { # table-name
  local p
  printf '\n[%s]\nalgorithm = "least-conn"\nkeepalive = %s\n' "$1" "$SHOAL_KEEPALIVE"
  for p in $BE_PORTS; do printf '\n[[%s.backend]]\naddr = "127.0.0.1:%s"\n' "$1" "$p"; done
}
route() { # host ("" = any) path pool
  printf '\n[[route]]\n'
  [ -n "$1" ] && printf 'host = "%s"\n' "$1"
  printf 'path = "%s"\nupstream = "%s"\n' "$2" "$3"
}
write_conf() { # kind
  local k=$1 port i h p alt
  port=$(base_port "$k")
  cat <<EOF
# generated by bench/routes.sh ($k)
[node]
id = "bench-$k"
listen = "127.0.0.1:$port"
admin = "127.0.0.1:$((port + 1))"
control = "127.0.0.1:$((port + 2))"
gossip = "127.0.0.1:$((port + 3))"
EOF
  one_cpu "$LB_CPUS" || echo "workers = 1"
  pool_table upstream
  [ "$k" = single ] && return 0
  [ "$k" = check ] && printf '\n[access_log]\npath = "%s"\n' "$RDIR/check/access.log"
  pool_table upstreams.api
  if [ "$k" = routes1 ]; then route "$REQ_HOST" "${TARGET_ROUTE#"$REQ_HOST"}" api; return 0; fi
  # every other route to api (odd numbers); two exceptions below
  for ((i = 1; i <= 500; i++)); do   # h0250.example.com/ (the near miss) -> default
    printf -v h 'h%04d.example.com' "$i"; alt=default; ((i % 2)) && alt=api
    [ "$h" = "$REQ_HOST" ] && alt=default
    route "$h" / "$alt"
  done
  for ((i = 1; i <= 300; i++)); do
    printf -v h '*.w%04d.example.com' "$i"; alt=default; ((i % 2)) && alt=api
    route "$h" / "$alt"
  done
  for ((i = 1; i <= 100; i++)); do   # the request's route -> api
    printf -v p '/p%04d/' "$i"; alt=default; ((i % 2)) && alt=api
    [ "$REQ_HOST$p" = "$TARGET_ROUTE" ] && alt=api
    route "$REQ_HOST" "$p" "$alt"
  done
  for ((i = 101; i <= 200; i++)); do
    printf -v p '/p%04d/' "$i"; alt=default; ((i % 2)) && alt=api
    route "" "$p" "$alt"
  done
}

# ---------------------------------------------------------------- shoald instances
start_shoal() { # kind
  local k=$1 d=$RDIR/$1 port pre i
  stop_shoal "$k"
  rm -rf "$d"; mkdir -p "$d"
  write_conf "$k" > "$d/shoal.toml"
  "$SHOALD" check --config "$d/shoal.toml" > "$d/check.out" 2>&1 || { cat "$d/check.out" >&2; die "shoald check refused $d/shoal.toml"; }
  port=$(base_port "$k")
  read -ra pre <<< "$(pin_prefix "$LB_CPUS")"
  # taskset/nice/setsid exec in turn, so $! is shoald itself. RUST_LOG: the caller's, if any.
  "${pre[@]}" setsid "$SHOALD" run --config "$d/shoal.toml" > "$d/shoald.log" 2>&1 < /dev/null &
  echo $! > "$d/shoald.pid"
  wait_port "$port" 100 || { tail -20 "$d/shoald.log" >&2; die "shoald $k did not answer on :$port ($d/shoald.log)"; }
  [ "$(port_pids "http://127.0.0.1:$port/")" = "$(cat "$d/shoald.pid")" ] || die "port $port is not held by shoald $k"
  echo "shoal $k: http://127.0.0.1:$port/ pid $(cat "$d/shoald.pid") cpus=${LB_CPUS:-any} threads=$(ls /proc/"$(cat "$d/shoald.pid")"/task | wc -l) routes=$(grep -c '^\[\[route\]\]' "$d/shoal.toml" || true) pools=$(curl -s -m 2 "http://127.0.0.1:$((port + 1))/status" | jq -c '[.pools[] | {(.name): .backends}] | add')"
}
stop_shoal() { [ -d "$RDIR/$1" ] && stop_pidfile "$RDIR/$1/shoald.pid" TERM; true; }
shoal_pid() { cat "$RDIR/$1/shoald.pid"; }
pool_counts() { # kind -> "default=N api=M" (requests each pool's backends were sent, /status)
  curl -s -m 2 "http://127.0.0.1:$(admin_port "$1")/status" | jq -r '[.pools[] | "\(.name)=\(.requests)"] | join(" ")'
}
pool_get() { # "a=1 b=2" name -> value (0 when absent)
  local kv
  for kv in $1; do [ "${kv%%=*}" = "$2" ] && { echo "${kv#*=}"; return; }; done
  echo 0
}
alive() {
  local p; p=$(shoal_pid "$1")
  kill -0 "$p" 2>/dev/null || { tail -5 "$RDIR/$1/shoald.log" >&2; die "shoald $1 (pid $p) is gone; log: $RDIR/$1/"; }
}

cleanup() {
  local k
  for k in single routes1000 routes1 check; do
    [ -d "$RDIR/$k" ] || continue
    stop_shoal "$k" >/dev/null 2>&1 || true
    [ -d "$RESULTS" ] && cp "$RDIR/$k/shoald.log" "$RESULTS/$k-shoald.log" 2>/dev/null || true
  done
  "$HERE/backends.sh" stop >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------- locks
# Wait (instead of failing like lib.sh's bench_lock) for run.sh's lock, and hold the locks of
# the other benchmarks (tls.sh, idle.sh: own state dirs) that exist, so none starts meanwhile.
take_locks() {
  local fd=9 d
  mkdir -p "$BENCH_TMP"
  for d in "$BENCH_TMP" "${TMPDIR:-/tmp}/shoaltls" "${TMPDIR:-/tmp}/shoalidle"; do
    [ -d "$d" ] || continue
    eval "exec $fd> \"\$d/.lock\""
    if ! flock -n "$fd"; then
      echo "waiting up to ${LOCK_WAIT}s for $d/.lock (another benchmark is running)" >&2
      flock -w "$LOCK_WAIT" "$fd" || die "$d/.lock still held after ${LOCK_WAIT}s"
    fi
    fd=$((fd - 1))
  done
}

# ---------------------------------------------------------------- one run
tcp_opens() { # TCP connections this machine opened so far (/proc/net/snmp ActiveOpens): during a
  # run, wrk's CONNS plus every connection shoald opens to a backend (pool churn)
  awk '$1 == "Tcp:" && !h { for (i = 2; i <= NF; i++) if ($i == "ActiveOpens") c = i; h = 1; next }
       $1 == "Tcp:" { print $c; exit }' /proc/net/snmp
}
children_ns() { # CPU of this shell's waited-for children (wrk), ns
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.0f", ($14 + $15) * 1e9 / hz }' /proc/$$/stat
}

one() { # kind conns round -> a line on stdout, a row in runs.tsv
  local k=$1 c=$2 r=$3 pid allp c0 c1 a0 a1 k0 k1 w0 w1 t0 t1 l0=0 l1=0 line pc0 pc1 o0 o1 opens=0
  local rps=0 p50=0 p90=0 p99=0 max=0 req=0 err=-1 non2xx=0 tagpct slowpct p99co corrected
  local cpu_us=0 lb_pct=0 load_pct=- other want d_want d_other flag=""
  pid=$(shoal_pid "$k")
  alive "$k"
  allp=$(printf '%s\n' "$pid" $BPIDS | sort -u)
  pc0=$(pool_counts "$k")
  wait_quiet
  one_cpu "$LOAD_CPUS" && l0=$(cpu_busy_ns "${LOAD_CPUS%-*}")
  o0=$(tcp_opens)
  c0=$(cpu_ns "$pid"); a0=$(cpu_ns $allp); k0=$(cpu_busy_ns); w0=$(children_ns); t0=$(date +%s%N)
  line=$(run_wrk "http://127.0.0.1:$(base_port "$k")$REQ_PATH" "$c" "$DURATION" -H "Host: $REQ_HOST")
  c1=$(cpu_ns "$pid"); a1=$(cpu_ns $allp); k1=$(cpu_busy_ns); w1=$(children_ns); t1=$(date +%s%N)
  o1=$(tcp_opens)
  one_cpu "$LOAD_CPUS" && l1=$(cpu_busy_ns "${LOAD_CPUS%-*}")
  alive "$k"
  pc1=$(pool_counts "$k")
  [ -n "$line" ] && eval "$line" || echo "  wrk produced no result ($k c=$c round $r)" >&2
  local wall=$((t1 - t0))
  # backend connections opened per 1,000 requests (ActiveOpens minus wrk's own connections;
  # other jobs' connections count too, so read it with the NOISE column)
  [ "$req" -gt 0 ] && opens=$(awk -v a="$o0" -v b="$o1" -v c="$c" -v n="$req" 'BEGIN { x = (b - a - c) * 1000 / n; printf "%.1f", (x < 0) ? 0 : x }')
  if [ "$req" -gt 0 ]; then cpu_us=$(awk -v a="$c0" -v b="$c1" -v n="$req" 'BEGIN { printf "%.2f", (b - a) / 1000 / n }'); fi
  lb_pct=$(awk -v a="$c0" -v b="$c1" -v t="$wall" 'BEGIN { printf "%.0f", 100 * (b - a) / t }')
  one_cpu "$LOAD_CPUS" && load_pct=$(awk -v a="$l0" -v b="$l1" -v t="$wall" 'BEGIN { x = 100 * (b - a) / t; printf "%.0f", (x > 100) ? 100 : x }')
  other=$(awk -v k="$((k1 - k0))" -v a="$((a1 - a0))" -v w="$((w1 - w0))" -v t="$wall" \
    'BEGIN { o = (k - a - w) * 100 / t; printf "%.0f", (o < 0) ? 0 : o }')
  # the pool every request must reach, and what the other pool got (must be 0)
  if [ "$k" = single ]; then want=default; else want=api; fi
  d_want=$(($(pool_get "$pc1" "$want") - $(pool_get "$pc0" "$want")))
  d_other=0
  for kv in $pc1; do
    [ "${kv%%=*}" = "$want" ] && continue
    d_other=$((d_other + ${kv#*=} - $(pool_get "$pc0" "${kv%%=*}")))
  done
  # Shoal counts requests wrk sent but did not see answered before it stopped (<= conns)
  if [ "$d_other" -ne 0 ] || [ "$d_want" -lt "$req" ] || [ "$d_want" -gt $((req + c)) ]; then
    flag="  POOLS: $want got $d_want of $req requests, the other pool(s) $d_other"
  fi
  [ "$err" != 0 ] || [ "$non2xx" != 0 ] && flag+="  ERRORS sock=$err non2xx=$non2xx"
  [ "$other" -gt "$NOISE_PCT" ] && flag+="  NOISE: other jobs used ${other}% of a core"
  printf '  c=%-4s round %-2s %-10s %8s req/s  p50 %6.2f ms  p99 %6.2f ms  shoald %6s us/req (%3s%% cpu)  cpu %s busy %s%%  %s=%s  upstream opens/1k req %s%s\n' \
    "$c" "$r" "$k" "$rps" "$p50" "$p99" "$cpu_us" "$lb_pct" "${LOAD_CPUS:-any}" "$load_pct" "$want" "$d_want" "$opens" "$flag"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$r" "$k" "$rps" "$p50" "$p99" "$cpu_us" \
    "$lb_pct" "$load_pct" "$other" "$req" "$err" "$non2xx" "$d_want" "$d_other" "$p99co" "$opens" >> "$RESULTS/runs.tsv"
  sleep "$PAUSE"
}

# ---------------------------------------------------------------- summary
summarize() { # runs.tsv -> markdown
  awk -F'\t' -v noise="$NOISE_PCT" -v lookup_ns="${LOOKUP_NS:-}" -v kinds="$KINDS" '
  function med(list,   n, a, i, j, t) {
    n = split(list, a, " ")
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  NR == 1 { next }
  {
    c = $1; r = $2; k = $3; cs[c] = 1; if (r > nr) nr = r
    ok = ($10 + 0 <= noise && $12 == 0 && $13 == 0 && $15 == 0)
    for (i = 4; i <= 17; i++) v[c, r, k, i] = $i
    good[c, r, k] = ok; have[c, r, k] = 1
    tot[c, k]++; if (ok) cln[c, k]++
    bad[c, k] += (($12 > 0) ? $12 : 0) + $13; stray[c, k] += $15
  }
  END {
    nc = 0; for (c in cs) cl[++nc] = c + 0
    for (i = 2; i <= nc; i++) { t = cl[i]; for (j = i - 1; j >= 1 && cl[j] > t; j--) cl[j + 1] = cl[j]; cl[j + 1] = t }
    nk = split(kinds, K, " "); B = K[1]
    print "| conns | Shoal | req/s | p50 ms | p99 ms | **CPU µs/req** | shoald CPU | CPU 1 busy (wrk + backends) | upstream connections opened per 1k req | requests to the intended pool | errors + non-2xx | clean runs |"
    print "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for (q = 1; q <= nc; q++) for (kk = 1; kk <= nk; kk++) {
      c = cl[q]; k = K[kk]; if (!tot[c, k]) continue
      useall = !cln[c, k]
      for (i = 4; i <= 17; i++) L[i] = ""
      sent = 0; got = 0
      for (r = 1; r <= nr; r++) if (have[c, r, k]) {
        sent += v[c, r, k, 11]; got += v[c, r, k, 14]
        if (!useall && !good[c, r, k]) continue
        for (i = 4; i <= 17; i++) L[i] = L[i] " " v[c, r, k, i]
      }
      mcpu[c, k] = med(L[7])
      printf "| %d | %s | %.0f | %.2f | %.2f | **%.2f** | %.0f%% | %s%% | %.1f | %s (%s wrk saw answered), stray %d | %d | %d/%d%s |\n", c, k,
        med(L[4]), med(L[5]), med(L[6]), mcpu[c, k], med(L[8]), (L[9] ~ /-/) ? "-" : sprintf("%.0f", med(L[9])), med(L[17]),
        (k == "single") ? "default " got : "api " got, sent, stray[c, k], bad[c, k], cln[c, k], tot[c, k], useall ? " *" : ""
    }
    print ""
    print "| conns | ratio | req/s | **CPU per request** | p99 | cost: req/s | cost: CPU µs/req | rounds used | per-round req/s ratios | per-round CPU ratios |"
    print "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    for (q = 1; q <= nc; q++) for (kk = 2; kk <= nk; kk++) {
      c = cl[q]; A = K[kk]; used = 0
      for (pass = 1; pass <= 2 && !used; pass++) {
        x = ""; y = ""; z = ""; d = ""; lx = ""; ly = ""; used = 0
        for (r = 1; r <= nr; r++) {
          if (!have[c, r, B] || !have[c, r, A]) continue
          if (v[c, r, B, 4] <= 0 || v[c, r, B, 7] <= 0) continue
          rx = v[c, r, A, 4] / v[c, r, B, 4]; ry = v[c, r, A, 7] / v[c, r, B, 7]
          ok = good[c, r, B] && good[c, r, A]
          if (pass == 1) { lx = lx sprintf(" %.3f%s", rx, ok ? "" : "n"); ly = ly sprintf(" %.3f%s", ry, ok ? "" : "n") }
          if (pass == 1 && !ok) continue
          x = x " " rx; y = y " " ry; used++
          z = z " " ((v[c, r, B, 6] > 0) ? v[c, r, A, 6] / v[c, r, B, 6] : 0)
          d = d " " (v[c, r, A, 7] - v[c, r, B, 7])
        }
        mark = (pass == 2) ? " *" : ""
        if (pass == 1) { keepx = lx; keepy = ly }
      }
      if (!used) continue
      mx = med(x); my = med(y)
      printf "| %d | %s/%s | %.3f | **%.3f** | %.3f | %+.1f%% | %+.1f%% (%+.2f µs) | %d%s |%s |%s |\n", c, A, B, mx, my, med(z),
        100 * (1 - mx), 100 * (my - 1), med(d), used, mark, keepx, keepy
      cost[c, A] = 100 * (my - 1); rcost[c, A] = 100 * (1 - mx)
    }
    print ""
    for (q = 1; q <= nc; q++) {
      c = cl[q]; if (!((c, "routes1000") in cost)) continue
      printf "Target (routing at 1,000 routes costs < 3%% of req/s against a single pool), %d connections: req/s %s (%+.1f%%), CPU per request %s (%+.1f%%)", c,
        (rcost[c, "routes1000"] < 3) ? "met" : "NOT met", -rcost[c, "routes1000"], (cost[c, "routes1000"] < 3) ? "met" : "NOT met", cost[c, "routes1000"]
      if (lookup_ns != "" && (c, B) in mcpu && mcpu[c, B] > 0)
        printf "; route_match predicts +%.3f µs (%.1f%% of %s'"'"'s %.2f µs/req)", lookup_ns / 1000, 100 * lookup_ns / 1000 / mcpu[c, B], B, mcpu[c, B]
      print ""
    }
  }' "$1"
}

# ---------------------------------------------------------------- main
[ $# -eq 0 ] || { sed -n '2,48p' "$0"; exit 2; }
for t in jq curl flock; do command -v "$t" > /dev/null || die "$t is needed"; done
for k in $KINDS; do case $k in single | routes1000 | routes1) ;; *) die "unknown kind $k in KINDS" ;; esac; done
[ "${KINDS%% *}" = single ] || die "KINDS must start with single (the baseline of the ratios)"
# locks and port check before the cleanup trap: if another run is going on, leave it alone
take_locks
# shellcheck disable=SC2086
ports_free $BE_PORTS 18710 18711 18712 18720 18721 18722 18730 18731 18732 18740 18741 18742
for p in 18713 18723 18733 18743; do [ -z "$(ss -Hlun "sport = :$p" 2>/dev/null)" ] || die "udp port $p is already in use"; done
[ -x "$NGINX" ] && command -v "$WRK" > /dev/null || "$HERE/setup.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$RESULTS" "$RDIR"

"$HERE/shoal.sh" build
SHOAL_CLI=""
if [ "${SHOAL_BUILD:-1}" = 1 ]; then
  (cd "$REPO_DIR" && cargo build --release -p shoal-cli) || echo "(the CLI did not build: no 'shoal route list' check)" >&2
fi
[ -x "$REPO_DIR/target/release/shoal" ] && SHOAL_CLI=$REPO_DIR/target/release/shoal

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "shoal commit: $(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO_DIR" diff --quiet HEAD -- node proto 2>/dev/null || echo ' (+ uncommitted changes in node/ or proto/)')"
  echo "shoald: $SHOALD (built $(date -u -r "$SHOALD" +%Y-%m-%dT%H:%M:%SZ))"
  echo "cpu: $(nproc) x $(awk -F: '/model name/{print $2; exit}' /proc/cpuinfo | sed 's/^ *//')"
  echo "kernel: $(uname -r)"
  echo "nginx (backends): $("$NGINX" -v 2>&1 | sed 's/.*: //')  wrk: $("$WRK" -v 2>&1 | head -1 | awk '{print $2}')"
  echo "placement: shoald cpus=${LB_CPUS:-any}, wrk cpus=${LOAD_CPUS:-any} (wrk -t${THREADS:-1}), backend cpus=${BACKEND_CPUS:-any}"
  echo "runs: REPEATS=$REPEATS DURATION=${DURATION}s CONNS=\"$CONNS\" keepalive/backend/pool=$SHOAL_KEEPALIVE RUST_LOG=${RUST_LOG:-unset}"
  echo "request: GET $REQ_PATH, Host: $REQ_HOST (routes1000: route $TARGET_ROUTE -> api)"
} | tee "$RESULTS/machine.txt"

# The lookup alone (before anything else runs: it is pinned to shoald's CPU)
LOOKUP_NS=""
if [ "${ROUTE_MATCH:-1}" = 1 ] && [ -e "$REPO_DIR/node/examples/route_match.rs" ]; then
  if [ "${SHOAL_BUILD:-1}" = 1 ]; then (cd "$REPO_DIR" && cargo build --release -p shoal-node --example route_match) || true; fi
  ex=$REPO_DIR/target/release/examples/route_match
  if [ -x "$ex" ]; then
    wait_quiet
    echo "route_match (cargo run --release -p shoal-node --example route_match, pinned to cpus ${LB_CPUS:-any}):"
    pin "$LB_CPUS" timeout -k 5 600 "$ex" 2>&1 | tee "$RESULTS/route_match.txt" || true
    LOOKUP_NS=$(awk '/^routes=1000 / { for (i = 1; i <= NF; i++) if ($i ~ /^ns_per_lookup=/) { sub(/.*=/, "", $i); print $i } }' "$RESULTS/route_match.txt" | head -1)
  else
    echo "(route_match example did not build)" | tee "$RESULTS/route_match.txt"
  fi
else
  echo "(no node/examples/route_match.rs at this commit: lookup not timed alone)" | tee "$RESULTS/route_match.txt"
fi
export LOOKUP_NS

"$HERE/backends.sh" start "$BACKENDS" --no-log
BPIDS=$(for p in $BE_PORTS; do port_pids "http://127.0.0.1:$p/"; done | sort -u)

# ---- does the request take the intended route? (a throw-away instance with an access log)
start_shoal check
cp "$RDIR/check/shoal.toml" "$RESULTS/check.toml"
cport=$(base_port check)
{
  for probe in "$REQ_HOST $REQ_PATH $TARGET_ROUTE api" "$REQ_HOST /x $REQ_HOST/ default" \
      "a.w0150.example.com /x *.w0150.example.com/ default" "nobody.example /p0151/y */p0151/ api" \
      "nobody.example /x - default"; do
    set -- $probe
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 2 -H "Host: $1" "http://127.0.0.1:$cport$2")
    sleep 0.3   # the access log's writer task
    got=$(tail -1 "$RDIR/check/access.log" | grep -o 'pool=[^ ]* route=[^ ]*' || echo '?')
    if [ "$code" = 200 ] && [ "$got" = "pool=$4 route=$3" ]; then v=ok; else v=WRONG; fi
    echo "check: Host: $1 GET $2 -> $code $got (expected pool=$4 route=$3) $v"
  done
  echo "access log (last 5 lines):"; tail -5 "$RDIR/check/access.log" | sed 's/^/    /'
  if [ -n "$SHOAL_CLI" ]; then
    "$SHOAL_CLI" --node "127.0.0.1:$((cport + 2))" route list > "$RESULTS/route-list.txt" 2>&1 || true
    echo "shoal route list ($(($(wc -l < "$RESULTS/route-list.txt") - 1)) routes; the header, the first 3 and the request's):"
    { head -4 "$RESULTS/route-list.txt"; grep -E "^$REQ_HOST +${TARGET_ROUTE#"$REQ_HOST"} " "$RESULTS/route-list.txt" || true; } | sed 's/^/    /'
  fi
} | tee "$RESULTS/route-check.txt"
stop_shoal check
grep -q WRONG "$RESULTS/route-check.txt" && die "a probe did not take its route (see $RESULTS/route-check.txt)"

for k in $KINDS; do start_shoal "$k"; cp "$RDIR/$k/shoal.toml" "$RESULTS/$k.toml"; done
printf 'conns\tround\tkind\trps\tp50_ms\tp99_ms\tcpu_us_per_req\tshoald_cpu_pct\tload_cpu_pct\tother_pct\treq\terr\tnon2xx\tintended_pool_requests\tother_pool_requests\tp99_wrk_co\tupstream_opens_per_kreq\n' > "$RESULTS/runs.tsv"

read -ra KA <<< "$KINDS"
for c in $CONNS; do
  echo "== connections $c"
  for k in "${KA[@]}"; do run_wrk "http://127.0.0.1:$(base_port "$k")$REQ_PATH" "$c" 1 -H "Host: $REQ_HOST" > /dev/null; done  # warm-up
  for ((r = 1; r <= REPEATS; r++)); do
    for ((i = 0; i < ${#KA[@]}; i++)); do   # order rotated every round (2 kinds: A B / B A)
      one "${KA[$(( (i + r - 1) % ${#KA[@]} ))]}" "$c" "$r"
    done
  done
done

{
  echo "## Routing: 1,000 routes against one pool ($REPEATS rounds, ${DURATION}s each; medians)"
  echo
  summarize "$RESULTS/runs.tsv"
  echo
  if [ -n "$LOOKUP_NS" ]; then
    echo "route_match (the table alone, pinned to CPU ${LB_CPUS:-any}):"
    grep 'ns_per_lookup' "$RESULTS/route_match.txt" | sed 's/^ */    /'
    echo
  fi
  echo "Request: GET $REQ_PATH with Host: $REQ_HOST; routes1000 sends it by route $TARGET_ROUTE"
  echo "(route 550 of 1,000) to pool api, which has the same 4 backends as single's one pool."
  [[ " $KINDS " == *" routes1 "* ]] && echo "routes1: the same two pools and only that route (what routing costs apart from the table's size)."
  echo "CPU µs/req = on-CPU time of all shoald threads (schedstat) / requests; CPU 1 busy near 100%"
  echo "means wrk + backends bounded req/s, then CPU per request is the figure to compare. Upstream"
  echo "connections opened per 1k req: the machine's TCP ActiveOpens during the run minus wrk's own"
  echo "connections: shoald's backend connection churn (its pool keeps $SHOAL_KEEPALIVE idle per backend)."
  echo "Ratios: medians of per-round ratios over rounds where both runs were clean (n = noisy round,"
  echo "left out; * = no clean round, all used). Clean: other jobs used at most ${NOISE_PCT}% of a core, no"
  echo "errors, no request to the other pool."
  sed 's/\x1b\[[0-9;]*m//g' "$RDIR"/*/shoald.log 2>/dev/null \
    | awk '/ (WARN|ERROR) / { n++ } END { print "shoald logs: " n + 0 " WARN/ERROR lines" }'
} | tee "$RESULTS/summary.md"
echo "results: $RESULTS"
