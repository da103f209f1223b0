#!/usr/bin/env python3
"""Idle-connection client for idle.sh (asyncio, raw sockets, stdlib only).

Opens --n connections to --host:--port, at most --concurrency handshakes in flight:
  --mode http  one `GET / HTTP/1.1` per connection, reads the whole 200 response, then keeps
               the connection open and idle (keep-alive)
  --mode ws    WebSocket upgrade (checks 101 + Sec-WebSocket-Accept), one masked text message
               echoed back, then the WebSocket stays open and idle
Then prints `READY ok=K failed=F secs=S` (stdout, flushed) and holds the connections until the
file --close-file exists (polled every 0.1 s) or --max-hold seconds passed (without
--close-file: closes right away), counts how many are still open (not closed by the server),
closes them all, prints `CLOSED still_open=K` and exits: 0 if all N succeeded and stayed open,
1 otherwise. Every wait is bounded: --timeout per connection, --open-timeout for the whole
opening phase.
"""
import argparse, asyncio, base64, collections, hashlib, os, resource, struct, sys, time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"

p = argparse.ArgumentParser()
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, required=True)
p.add_argument("--n", type=int, required=True)
p.add_argument("--mode", choices=("http", "ws"), default="http")
p.add_argument("--concurrency", type=int, default=200)
p.add_argument("--timeout", type=float, default=10.0, help="per connection (connect + exchange)")
p.add_argument("--open-timeout", type=float, default=180.0, help="whole opening phase")
p.add_argument("--close-file")
p.add_argument("--max-hold", type=float, default=600.0)
a = p.parse_args()

errors = collections.Counter()


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ")
    hdrs = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return int(status[1]) if len(status) > 1 and status[1].isdigit() else 0, hdrs


async def http_exchange(reader, writer):
    writer.write(f"GET / HTTP/1.1\r\nHost: {a.host}:{a.port}\r\n\r\n".encode())
    await writer.drain()
    status, h = await read_head(reader)
    if "chunked" in h.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(h.get("content-length", "0")))
    if status != 200:
        raise RuntimeError(f"status {status}")
    if "close" in h.get("connection", "").lower():
        raise RuntimeError("server said Connection: close")


async def ws_exchange(reader, writer, i):
    key = base64.b64encode(os.urandom(16))
    writer.write(b"GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (a.host.encode(), a.port, key))
    await writer.drain()
    status, h = await read_head(reader)
    if status != 101:
        raise RuntimeError(f"status {status}")
    want = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
    if h.get("sec-websocket-accept") != want:
        raise RuntimeError("bad Sec-WebSocket-Accept")
    msg = b"hello %d" % i
    mask = os.urandom(4)
    writer.write(struct.pack("!BB", 0x81, 0x80 | len(msg)) + mask + bytes(b ^ mask[j & 3] for j, b in enumerate(msg)))
    await writer.drain()
    b0, b1 = await reader.readexactly(2)
    if b0 != 0x81 or b1 & 0x80 or (b1 & 0x7F) != len(msg):
        raise RuntimeError(f"unexpected frame {b0:#x} {b1:#x}")
    if await reader.readexactly(len(msg)) != msg:
        raise RuntimeError("echo mismatch")


async def one(i, sem, conns):
    async with sem:
        writer = None
        try:
            async def go():
                nonlocal writer
                reader, writer = await asyncio.open_connection(a.host, a.port, limit=65536)
                if a.mode == "http":
                    await http_exchange(reader, writer)
                else:
                    await ws_exchange(reader, writer, i)
                return reader
            reader = await asyncio.wait_for(go(), a.timeout)
            conns.append((reader, writer))
        except Exception as e:  # any failure counts, by kind
            errors[type(e).__name__ + (f": {e}" if isinstance(e, RuntimeError) else "")] += 1
            if writer is not None:
                writer.close()


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.n + 50 > hard:
        print(f"error: --n {a.n} needs more than the open-files limit {hard}", file=sys.stderr)
        return 2
    conns = []
    sem = asyncio.Semaphore(a.concurrency)
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one(i, sem, conns)) for i in range(a.n)]
    done, pending = await asyncio.wait(tasks, timeout=a.open_timeout)
    for t in pending:
        t.cancel()
    if pending:
        errors["open-timeout"] += len(pending)
        await asyncio.wait(pending, timeout=5)
    secs = time.monotonic() - t0
    ok = len(conns)
    print(f"READY ok={ok} failed={a.n - ok} secs={secs:.1f}", flush=True)
    for k, v in errors.most_common(10):
        print(f"ERROR {v} x {k}", flush=True)

    # hold: the event loop keeps running, so a server closing a connection is seen (EOF)
    deadline = time.monotonic() + (a.max_hold if a.close_file else 0)
    while time.monotonic() < deadline and not os.path.exists(a.close_file):
        await asyncio.sleep(0.1)
    await asyncio.sleep(0)  # let pending EOFs land
    still = sum(1 for r, w in conns if not r.at_eof() and not w.is_closing())
    for r, w in conns:
        w.close()
    if conns:
        await asyncio.wait([asyncio.ensure_future(w.wait_closed()) for r, w in conns], timeout=10)
    print(f"CLOSED still_open={still}", flush=True)
    return 0 if ok == a.n and still == ok else 1


sys.exit(asyncio.run(main()))
