#!/usr/bin/env python3
"""Light load for bench/light_load.sh: one client per balancer URL, each sending a GET, waiting
for the answer, pausing --pause-ms, for --seconds (bounded). Prints, over all clients: the
requests, the share each backend answered (`backend PORT` bodies), p50/p99/mean ms; and the
same for the second half alone when --halves is given."""
import argparse, http.client, statistics, threading, time

p = argparse.ArgumentParser()
p.add_argument("--seconds", type=float, default=20)
p.add_argument("--pause-ms", type=float, default=30)
p.add_argument("--halves", action="store_true")
p.add_argument("urls", nargs="+")
a = p.parse_args()
records = []  # (t, ms, backend)
lock = threading.Lock()
t0 = time.monotonic()


def client(hostport):
    host, port = hostport.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    while time.monotonic() - t0 < a.seconds:
        s = time.monotonic()
        try:
            conn.request("GET", "/")
            r = conn.getresponse()
            who = r.read().decode().strip()
        except Exception as e:  # noqa: BLE001 - count it and reconnect
            who = "error"
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
        ms = (time.monotonic() - s) * 1000
        with lock:
            records.append((s - t0, ms, who))
        time.sleep(a.pause_ms / 1000)


threads = [threading.Thread(target=client, args=(u,)) for u in a.urls]
for t in threads:
    t.start()
for t in threads:
    t.join()


def report(name, rs):
    if not rs:
        print(f"{name}: no requests")
        return
    ms = sorted(r[1] for r in rs)
    shares = {}
    for r in rs:
        shares[r[2]] = shares.get(r[2], 0) + 1
    share_text = " ".join(f"{k.replace('backend ', '')}={100 * v / len(rs):.1f}%" for k, v in sorted(shares.items()))
    p50 = ms[len(ms) // 2]
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(f"{name}: n={len(rs)} p50={p50:.2f} p99={p99:.2f} mean={statistics.mean(ms):.2f} shares: {share_text}")


report("all", records)
if a.halves:
    report("second half", [r for r in records if r[0] >= a.seconds / 2])
