#!/usr/bin/env bash
# The skewed-cluster comparison, end to end, in one session: 3 independent nginx least_conn
# balancers, 3 independent HAProxy leastconn balancers, and a 3-node Shoal cluster, each in
# front of the same 4 backends (#4 answers DELAY_MS slower), with clients of 48, 12 and 4
# connections, one per balancer. "Perfect knowledge" = the same three clients all sent to one
# nginx balancer (it sees every in-flight request). Prints, per setup, each client's p99 and
# share of responses from the slow backend, the slow backend's share, total req/s, and the
# gap Shoal closes on the small clients: (independent - shoal) / (independent - perfect).
#
#   bench/skew_all.sh          env: REPEATS=3 DURATION=10 THINK_MS=2 (fixed offered load), DELAY_MS=20
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
export REPEATS=${REPEATS:-3} DURATION=${DURATION:-10} THINK_MS=${THINK_MS:-2} DELAY_MS=${DELAY_MS:-20}
OUT=${OUT:-$BENCH_TMP/skew-all-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
bench_lock
export BENCH_LOCK_HELD=1
"$HERE/shoal.sh" build
for kind in nginx haproxy shoal; do
  # BASELINE (all clients to balancer #1) only for nginx: that is the perfect-knowledge run.
  BASELINE=$([ "$kind" = nginx ] && echo 1 || echo 0) LB_KIND=$kind "$HERE/skew.sh" | tee "$OUT/$kind.txt"
  grep -o 'raw: .*' "$OUT/$kind.txt" | sed 's/raw: //' > "$OUT/$kind.tsvpath"
done
python3 - "$OUT" "${SLOW:-4}" "${BACKEND_BASE_PORT}" <<'PY'
import csv, statistics, sys, os
out, slow, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rows(kind):
    path = open(os.path.join(out, kind + ".tsvpath")).read().strip()
    return list(csv.DictReader(open(path), delimiter="\t"))
setups = {}
for kind in ["nginx", "haproxy", "shoal"]:
    for r in rows(kind):
        label = "perfect (1 nginx sees all)" if r["mode"] == "single" else f"{kind} x3"
        setups.setdefault(label, []).append(r)
def med(xs): return statistics.median(xs) if xs else float("nan")
table = {}
print("\n| setup | client (conns) | req/s | p99 ms | slow-backend hits % |")
print("|---|---|---:|---:|---:|")
for label, rs in setups.items():
    t = {}
    for c in ["1", "2", "3"]:
        cr = [r for r in rs if r["kind"] == "client" and r["name"] == c]
        t[c] = (med([float(r["rps"]) for r in cr]), med([float(r["p99"]) for r in cr]), med([float(r["slowhitpct"] or 0) for r in cr]), cr[0]["conns"] if cr else "?")
        print(f"| {label} | {c} ({t[c][3]}) | {t[c][0]:.0f} | {t[c][1]:.2f} | {t[c][2]:.3f} |")
    sb = [float(r["share"]) for r in rs if r["kind"] == "backend" and int(r["name"]) == base + slow]
    t["slow_share"] = med(sb)
    # total req/s per run, then the median
    runs = {}
    for r in rs:
        if r["kind"] == "client":
            runs[r["run"]] = runs.get(r["run"], 0) + float(r["rps"])
    t["total"] = med(list(runs.values()))
    table[label] = t
print("\n| setup | slow backend share % | total req/s |")
print("|---|---:|---:|")
for label, t in table.items():
    print(f"| {label} | {t['slow_share']:.2f} | {t['total']:.0f} |")
perfect = table.get("perfect (1 nginx sees all)")
shoal = table.get("shoal x3")
print()
for indep_label in ["nginx x3", "haproxy x3"]:
    indep = table.get(indep_label)
    if not (indep and shoal and perfect):
        continue
    for c in ["2", "3"]:
        i, s, p = indep[c][2], shoal[c][2], perfect[c][2]
        gap = (i - s) / (i - p) if i != p else float("nan")
        print(f"gap closed vs {indep_label}, client {c} ({indep[c][3]} conns): (indep {i:.3f} - shoal {s:.3f}) / (indep {i:.3f} - perfect {p:.3f}) = {gap:.2f}   target >= 0.8")
    print(f"throughput shoal/{indep_label}: {shoal['total'] / indep['total']:.3f}   target >= 1.0")
PY
echo "outputs: $OUT"
