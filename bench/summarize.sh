#!/usr/bin/env bash
# Summary table of a run.sh results directory (markdown on stdout):
#   summarize.sh RESULTS_DIR
# Reads shoal-vs-nginx.tsv, shoal-vs-haproxy.tsv and shoal-vs-ideal.tsv (compare.sh raw rows;
# any that exist; the ideal forwarder is bench/ideal/fwd.c, the floor). A run is "noisy"
# when processes outside the benchmark used more than $NOISE_PCT % (default 20) of a core during
# it (TSV column other_pct; a few % are accounting slack even on an idle machine).
# Medians per target use the clean runs only (all runs, marked *, if none is clean); Shoal and
# the direct reference ran in both comparisons, so they have up to 2 x REPEATS runs. Ratios are
# medians of per-round ratios (the two targets of a round ran back to back) over the rounds in
# which both were clean (all rounds, marked *, if none).
# The last table puts the CPU per request of the four side by side (per-target medians) with
# the per-round ratios and Shoal's distance to the floor:
#   above floor = Shoal - ideal (µs/request): what later work on the request path can remove;
#   closed vs X = (X - Shoal) / (X - ideal): the share of X's distance to the floor that Shoal
#                 has closed (0 = as costly as X, 1 = at the floor, < 0 = costlier than X).
set -euo pipefail
R=${1:?usage: summarize.sh RESULTS_DIR}
NOISE_PCT=${NOISE_PCT:-20}
files=()
for f in "$R/shoal-vs-nginx.tsv" "$R/shoal-vs-haproxy.tsv" "$R/shoal-vs-ideal.tsv"; do [ -s "$f" ] && files+=("$f"); done
[ ${#files[@]} -gt 0 ] || { echo "no TSVs in $R" >&2; exit 1; }

awk -F'\t' -v noise="$NOISE_PCT" '
function median(list,   n, a, i, j, t) {
  n = split(list, a, " ")
  for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
  return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function add(key, c, name, row) {
  rps[key, c, name] = rps[key, c, name] " " $4; p50[key, c, name] = p50[key, c, name] " " $5
  p99[key, c, name] = p99[key, c, name] " " $7; cpu[key, c, name] = cpu[key, c, name] " " $11
  n[key, c, name]++
}
FNR == 1 { f++; other = FILENAME; sub(/^.*shoal-vs-/, "", other); sub(/\.tsv$/, "", other); vs[f] = other; next }
{
  c = $1; r = $2; name = ($3 == "A") ? "shoal" : ($3 == "B") ? other : "direct"
  clean = ($14 == "" || $14 == "NA" || $14 + 0 <= noise)
  add("all", c, name); if (clean) add("clean", c, name)
  errs[c, name] += $9 + $10
  v[f, c, r, $3, "rps"] = $4; v[f, c, r, $3, "p99"] = $7; v[f, c, r, $3, "cpu"] = $11; v[f, c, r, $3, "clean"] = clean
  cs[c] = 1; if (r > nr) nr = r
}
END {
  print "| conns | target | req/s | p50 ms | p99 ms | CPU µs/req | clean runs | socket err + non-2xx |"
  print "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  split("shoal nginx haproxy ideal direct", names, " ")
  label["direct"] = "direct (1 backend)"; label["ideal"] = "ideal forwarder (floor)"
  nc = 0; for (c in cs) cl[++nc] = c + 0
  for (i = 2; i <= nc; i++) { t = cl[i]; for (j = i - 1; j >= 1 && cl[j] > t; j--) cl[j + 1] = cl[j]; cl[j + 1] = t }
  for (k = 1; k <= nc; k++) for (t = 1; t <= 5; t++) {
    c = cl[k]; nm = names[t]; if (!(("all", c, nm) in n)) continue
    key = (("clean", c, nm) in n) ? "clean" : "all"
    mcpu[c, nm] = median(cpu[key, c, nm])
    printf "| %d | %s | %.0f | %.2f | %.2f | %.2f | %d/%d%s | %d |\n", c, (nm in label) ? label[nm] : nm,
      median(rps[key, c, nm]), median(p50[key, c, nm]), median(p99[key, c, nm]), mcpu[c, nm],
      n["clean", c, nm], n["all", c, nm], (key == "all") ? " *" : "", errs[c, nm]
  }
  print ""
  print "| conns | ratio | req/s | p99 | CPU µs/req | rounds used | per-round req/s ratios (clean ones marked c) |"
  print "| ---: | --- | ---: | ---: | ---: | ---: | --- |"
  for (k = 1; k <= nc; k++) for (ff = 1; ff <= f; ff++) {
    c = cl[k]; per = ""; got = 0; used = 0
    for (pass = 1; pass <= 2 && !used; pass++) {
      q = ""; l = ""; u = ""; used = 0; per = ""
      for (r = 1; r <= nr; r++) {
        if (!((ff, c, r, "A", "rps") in v)) continue
        ok = v[ff, c, r, "A", "clean"] && v[ff, c, r, "B", "clean"]
        x = (v[ff, c, r, "B", "rps"] > 0) ? v[ff, c, r, "A", "rps"] / v[ff, c, r, "B", "rps"] : 0
        per = per sprintf(" %.3f%s", x, ok ? "c" : "")
        if (pass == 1 && !ok) continue
        q = q " " x; used++
        l = l " " ((v[ff, c, r, "B", "p99"] > 0) ? v[ff, c, r, "A", "p99"] / v[ff, c, r, "B", "p99"] : 0)
        u = u " " ((v[ff, c, r, "B", "cpu"] > 0) ? v[ff, c, r, "A", "cpu"] / v[ff, c, r, "B", "cpu"] : 0)
      }
      mark = (pass == 2) ? " *" : ""
    }
    if (!used) continue
    cratio[c, vs[ff]] = sprintf("%.3f%s", median(u), mark)
    printf "| %d | shoal/%s | %.3f | %.3f | %.3f | %d%s |%s |\n", c, vs[ff], median(q), median(l), median(u), used, mark, per
  }
  # CPU per request against the floor (needs the ideal pair)
  have = 0; for (k = 1; k <= nc; k++) if ((cl[k], "ideal") in mcpu && (cl[k], "shoal") in mcpu) have = 1
  if (!have) exit
  print ""
  print "CPU per request (µs) against the floor (the ideal forwarder):"
  print ""
  print "| conns | Shoal | nginx | HAProxy | ideal | Shoal/nginx | Shoal/HAProxy | Shoal/ideal | Shoal above floor | nginx above floor | HAProxy above floor | closed vs nginx | closed vs HAProxy |"
  print "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for (k = 1; k <= nc; k++) {
    c = cl[k]; if (!((c, "ideal") in mcpu) || !((c, "shoal") in mcpu)) continue
    s = mcpu[c, "shoal"]; id = mcpu[c, "ideal"]
    line = sprintf("| %d | %.2f", c, s)
    split("nginx haproxy", peers, " ")
    for (i = 1; i <= 2; i++) line = line (((c, peers[i]) in mcpu) ? sprintf(" | %.2f", mcpu[c, peers[i]]) : " | -")
    line = line sprintf(" | %.2f", id)
    split("nginx haproxy ideal", peers3, " ")
    for (i = 1; i <= 3; i++) line = line " | " (((c, peers3[i]) in cratio) ? cratio[c, peers3[i]] : "-")
    line = line sprintf(" | %.2f", s - id)
    for (i = 1; i <= 2; i++) line = line (((c, peers[i]) in mcpu) ? sprintf(" | %.2f", mcpu[c, peers[i]] - id) : " | -")
    for (i = 1; i <= 2; i++) {
      x = ((c, peers[i]) in mcpu) ? mcpu[c, peers[i]] : ""
      line = line ((x != "" && x - id > 0) ? sprintf(" | %.2f", (x - s) / (x - id)) : " | -")
    }
    print line " |"
  }
}' "${files[@]}"
echo
echo "Targets (issue 11): with its defaults, Shoal req/s >= nginx and >= HAProxy at 64 and 256 connections, p99 <= theirs."
if [ -s "$R/shoal-vs-ideal.tsv" ]; then
  echo "Floor: the ideal forwarder (bench/ideal/fwd.c) pairs each client connection with its own"
  echo "backend connection and copies bytes (no HTTP, no pool): no balancer can spend less CPU per"
  echo "request. Absolute µs are per-target medians, the X/Y columns medians of per-round ratios;"
  echo "above floor = target - ideal; closed vs X = (X - Shoal) / (X - ideal), the share of X's"
  echo "distance to the floor Shoal has closed (1 = at the floor, 0 = like X, < 0 = costlier than X)."
  echo "At 256 connections the forwarder holds 256 backend connections (1:1) while the balancers"
  echo "keep a pool of 64 idle ones and open/close backend connections continuously: there the"
  echo "floor is an ideal no pooled balancer with that pool can reach, not a like-for-like peer."
fi
echo "clean run: processes outside the benchmark used at most ${NOISE_PCT}% of a core during it;"
echo "* = no clean run/round, the median is over all of them."
if [ -s "$R/shoald.log" ]; then
  # shoald colours its log; strip the escapes before looking for levels
  sed 's/\x1b\[[0-9;]*m//g' "$R/shoald.log" > "$R/shoald.plain.log"
  cnt=$(grep -cE ' (WARN|ERROR) ' "$R/shoald.plain.log" || true)
  echo
  echo "shoald log: ${cnt:-0} WARN/ERROR lines; the first 10:"
  grep -E ' (WARN|ERROR) ' "$R/shoald.plain.log" | cut -c1-240 | sed 's/^/    /' | head -10 || true
fi
