#!/usr/bin/env bash
# Gossip bytes a loaded node sends: a 3-node cluster of SHOALD (default target/release/shoald)
# in front of 4 backends (bench/light_backend.py), `wrk -c8` through each node for 20 s, node 1's
# `shoal_gossip_sent_bytes_total` over 10 s of it. Ports 19701-19743.
#
#   bench/gossip_bytes.sh [SHOALD]
set -u
source "$(dirname "$0")/lib.sh"
BIN=${1:-$SHOALD}
B=(19701 19702 19703 19704)
pids=()
for b in "${B[@]}"; do python3 "$BENCH_DIR/light_backend.py" --port "$b" 2>/dev/null & pids+=($!); done
sleep 1
seeds=()
for i in 0 1 2; do
  args=(); for b in "${B[@]}"; do args+=(--backend "127.0.0.1:$b"); done
  "$BIN" run --node-id "g$i" --listen "127.0.0.1:$((19711 + i))" --control "127.0.0.1:$((19721 + i))" \
    --admin "127.0.0.1:$((19731 + i))" --gossip "127.0.0.1:$((19741 + i))" "${seeds[@]}" "${args[@]}" >/dev/null 2>&1 &
  pids+=($!)
  seeds+=(--seed "127.0.0.1:$((19741 + i))")
done
sleep 3
for i in 0 1 2; do timeout 25 "$WRK" -t1 -c8 -d20s "http://127.0.0.1:$((19711 + i))/" >/dev/null 2>&1 & done
sleep 5
sent() { curl -s 127.0.0.1:19731/metrics | awk '/^shoal_gossip_sent_bytes_total/ {print $2}'; }
a=$(sent); sleep 10; b=$(sent)
echo "$BIN: node 1 sent $(((b - a) / 10)) gossip bytes/s"
sleep 6
kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null
