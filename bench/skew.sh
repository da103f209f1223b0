#!/usr/bin/env bash
# Cluster scenario: several independent balancers in front of the same backends, client load
# skewed across them. Measures how evenly balancers that only know their own in-flight counts
# spread load, and what each client's tail latency is.
#
#   skew.sh                       3 nginx balancers (least_conn, keepalive) on :18091-18093
#   LB_KIND=haproxy skew.sh       3 HAProxy balancers (leastconn) instead
#   LB_KIND=shoal skew.sh         a 3-node Shoal cluster (least-conn on the cluster-wide view),
#                                 nodes seeded to each other, each pinned like the others
#   LB_URLS="http://127.0.0.1:P1/ http://127.0.0.1:P2/ http://127.0.0.1:P3/" skew.sh
#                                 an externally started cluster (e.g. the new balancer; its
#                                 nodes must point at 127.0.0.1:19001..19000+BACKENDS)
#   env: BACKENDS=4  SLOW=4 (which backend is slow, "" = none)  DELAY_MS=20
#        CLIENT_CONNS="48 12 4"  (one wrk -t1 per balancer, all at once)
#        DURATION=10  REPEATS=3  PAUSE=1
#        THINK_MS=0   per-connection pause before each request (wrk delay(); 0 = flat out).
#                     With e.g. THINK_MS=2 the offered load is fixed (~conns/(2ms+latency))
#                     instead of "as fast as the balancers go", so runs on a noisy machine
#                     and different balancers see the same load.
#        BASELINE=1   also run the same three clients all against balancer #1 alone
#                     (one balancer = full knowledge of in-flight counts) for reference
#        KEEP=1       leave backends/balancers running afterwards
#        SKIP_BACKENDS=1  use backends already started by `backends.sh start` (same BACKENDS/SLOW)
# Per run: each client's req/s, p50/p99/max (raw, see report.lua), the % of its responses that
# came from the slow backend (body tag, exact) and the % of responses >= DELAY_MS/2 (includes
# stalls from CPU contention);
# each backend's requests (access-log line deltas) and share. Summary: min/median/max over repeats. Raw rows: $BENCH_TMP/skew-<time>.tsv
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"

BACKENDS=${BACKENDS:-4} SLOW=${SLOW-4} DELAY_MS=${DELAY_MS:-20}
CLIENT_CONNS=${CLIENT_CONNS:-48 12 4} DURATION=${DURATION:-10} REPEATS=${REPEATS:-3}
PAUSE=${PAUSE:-1} BASELINE=${BASELINE:-1} LB_KIND=${LB_KIND:-nginx}
read -r -a conns <<< "$CLIENT_CONNS"
# a response counts as "slow" at >= half the slow backend's delay (see report.lua)
export WRK_SLOW_MS=${WRK_SLOW_MS:-$(awk -v d="$DELAY_MS" 'BEGIN{print d / 2}')}
# the slow backend's body starts with "slow", fast ones with "ok": each client counts its hits
export WRK_TAG=${WRK_TAG-slow}
export WRK_THINK_MS=${THINK_MS:-0}
nlb=${#conns[@]}

cleanup() {
  [ "${KEEP:-0}" = 1 ] && return 0
  if [ -z "${LB_URLS:-}" ] && [ "$LB_KIND" = shoal ]; then
    for ((i = 1; i <= nlb; i++)); do "$HERE/shoal.sh" stop "skew$i" > /dev/null; done
  elif [ -z "${LB_URLS:-}" ]; then
    for ((i = 1; i <= nlb; i++)); do "$HERE/lb.sh" stop "skew$i" > /dev/null; done
  fi
  [ "${SKIP_BACKENDS:-0}" = 1 ] || "$HERE/backends.sh" stop > /dev/null
}
# Lock and port check before the cleanup trap: if another benchmark (or a test suite) is using
# these ports, leave it alone instead of stopping its backends. skew_all.sh holds the lock itself.
[ -n "${BENCH_LOCK_HELD:-}" ] || bench_lock
ports=$(seq $((18090 + 1)) $((18090 + nlb)))
[ "$LB_KIND" = shoal ] && ports+=" $(for ((i = 1; i <= nlb; i++)); do echo $((18090 + i + 1400)) $((18090 + i - 600)) $((18090 + i - 100)); done)"
[ "${SKIP_BACKENDS:-0}" = 1 ] || ports+=" $(seq $((BACKEND_BASE_PORT + 1)) $((BACKEND_BASE_PORT + BACKENDS)))"
[ -n "${LB_URLS:-}" ] || ports_free $ports
trap cleanup EXIT

slowarg=(); [ -n "$SLOW" ] && slowarg=(--slow "$SLOW" --delay-ms "$DELAY_MS")
[ "${SKIP_BACKENDS:-0}" = 1 ] || "$HERE/backends.sh" start "$BACKENDS" "${slowarg[@]}"
if [ -n "${LB_URLS:-}" ]; then
  read -r -a urls <<< "$LB_URLS"
  [ ${#urls[@]} -eq "$nlb" ] || die "LB_URLS has ${#urls[@]} URLs but CLIENT_CONNS has $nlb entries"
  for u in "${urls[@]}"; do curl -sf -o /dev/null -m 2 "$u" || die "$u does not answer 200"; done
else
  urls=()
  if [ "$LB_KIND" = shoal ]; then
    # gossip of node i is on 18090+i-100 (see shoal.sh); every node gets the same seed list
    seeds=""; for ((i = 1; i <= nlb; i++)); do seeds+="${seeds:+,}\"127.0.0.1:$((18090 + i - 100))\""; done
    for ((i = 1; i <= nlb; i++)); do
      SHOAL_SEEDS="$seeds" LB_BACKENDS=$BACKENDS "$HERE/shoal.sh" start "skew$i" 1 $((18090 + i))
    done
    # wait until every node sees all members alive (bounded)
    for ((t = 0; t < 50; t++)); do
      alive=$(curl -s -m 1 "http://127.0.0.1:$((18091 + 1400))/status" | grep -o '"state":"alive"' | wc -l)
      [ "$alive" -ge $((nlb + 1)) ] && break
      sleep 0.1
    done
  else
    for ((i = 1; i <= nlb; i++)); do
      LB_BACKENDS=$BACKENDS "$HERE/lb.sh" start-one "skew$i" "$LB_KIND" 1 $((18090 + i))
    done
  fi
  for ((i = 1; i <= nlb; i++)); do urls+=("http://127.0.0.1:$((18090 + i))/"); done
fi

mkdir -p "$BENCH_TMP"
TSV=$BENCH_TMP/skew-$(date +%Y%m%d-%H%M%S).tsv
echo -e "mode\trun\tkind\tname\tconns\trps\tp50\tp99\tmax\terr\trequests\tshare\tslowpct\tslowhitpct" > "$TSV"

snapshot() { "$HERE/backends.sh" counts | awk '{print $1, $2}'; }

one_run() { # mode run
  local mode=$1 run=$2 i before after out
  before=$(snapshot)
  out=$(mktemp -d "$BENCH_TMP/skewrun.XXXX")
  for ((i = 0; i < nlb; i++)); do
    local u=${urls[$i]}; [ "$mode" = single ] && u=${urls[0]}
    ( run_wrk "$u" "${conns[$i]}" "$DURATION" > "$out/wrk$i" ) &
  done
  wait
  after=$(snapshot)
  echo "-- $mode run $run: clients ${conns[*]} conns -> $([ "$mode" = single ] && echo "all to ${urls[0]}" || echo "${urls[*]}"), ${DURATION}s, think ${WRK_THINK_MS} ms"
  for ((i = 0; i < nlb; i++)); do
    local rps=0 p50=0 p90=0 p99=0 max=0 req=0 err=0 non2xx=0 slowpct=0 tagpct=0 p99co=0 corrected=0 line
    line=$(cat "$out/wrk$i"); [ -n "$line" ] && eval "$line"
    printf '   client %d  c=%-3s %6s req/s  p50 %5.2f  p99 %6.2f  max %6.2f ms  hit slow backend %6.3f%%  >=%sms %6.3f%%%s\n' \
      $((i + 1)) "${conns[$i]}" "$rps" "$p50" "$p99" "$max" "$tagpct" "$WRK_SLOW_MS" "$slowpct" \
      "$([ "$err" != 0 ] && echo "  sock-errors=$err")"
    echo -e "$mode\t$run\tclient\t$((i + 1))\t${conns[$i]}\t$rps\t$p50\t$p99\t$max\t$err\t$req\t\t$slowpct\t$tagpct" >> "$TSV"
  done
  rm -rf "$out"
  join <(echo "$before") <(echo "$after") | awk -v mode="$mode" -v run="$run" -v slow=",$SLOW," -v tsv="$TSV" -v base="$BACKEND_BASE_PORT" '
    { port[NR] = $1; d[NR] = $3 - $2; tot += d[NR] }
    END {
      line = "   backends:"
      for (i = 1; i <= NR; i++) {
        s = (tot > 0) ? 100 * d[i] / tot : 0
        tag = (index(slow, "," (port[i] - base) ",") > 0) ? "(slow)" : ""
        line = line sprintf("  %s%s %d (%.1f%%)", port[i], tag, d[i], s)
        printf "%s\t%s\tbackend\t%s\t\t\t\t\t\t\t%d\t%.2f\n", mode, run, port[i], d[i], s >> tsv
      }
      print line
    }'
  sleep "$PAUSE"
}

echo "balancers: ${urls[*]} (${LB_URLS:+external}${LB_URLS:-$LB_KIND}); backends 127.0.0.1:$((BACKEND_BASE_PORT + 1))..$((BACKEND_BASE_PORT + BACKENDS)), slow: ${SLOW:-none} (+${DELAY_MS} ms)"
for ((r = 1; r <= REPEATS; r++)); do
  one_run cluster "$r"
  [ "$BASELINE" = 1 ] && one_run single "$r"
done

echo
echo "== summary over $REPEATS runs: min / median / max   (cluster = each client to its own balancer;"
echo "   single = same clients all to balancer #1)"
awk -F'\t' '
function med(key,   n, i, j, t, s, parts) {
  n = split(vals[key], parts, " ")
  for (i = 1; i <= n; i++) s[i] = parts[i] + 0
  for (i = 2; i <= n; i++) { t = s[i]; for (j = i - 1; j >= 1 && s[j] > t; j--) s[j + 1] = s[j]; s[j + 1] = t }
  return sprintf("%8.2f / %8.2f / %8.2f", s[1], (n % 2) ? s[(n + 1) / 2] : (s[n / 2] + s[n / 2 + 1]) / 2, s[n])
}
NR > 1 {
  if ($3 == "client") { k = $1 " client " $4 " (c=" $5 ") p99 ms"; vals[k] = vals[k] " " $8
                        k2 = $1 " client " $4 " (c=" $5 ") req/s"; vals[k2] = vals[k2] " " $6
                        k3 = $1 " client " $4 " (c=" $5 ") hit-slow %"; vals[k3] = vals[k3] " " $14
                        if (!(k in seen)) { seen[k] = 1; order[++n] = k2; order[++n] = k; order[++n] = k3 } }
  else { k = $1 " backend " $4 " share %"; vals[k] = vals[k] " " $12; if (!(k in seen)) { seen[k] = 1; order[++n] = k } }
}
END { for (i = 1; i <= n; i++) printf "  %-34s %s\n", order[i], med(order[i]) }' "$TSV"
echo "raw: $TSV"
