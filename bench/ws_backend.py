#!/usr/bin/env python3
"""Backend for idle.sh: plain HTTP/1.1 keep-alive AND WebSocket echo on the same ports.

One asyncio process listening on every --ports port (stdlib only, no `websockets` needed):
  * a request with `Upgrade: websocket` + `Sec-WebSocket-Key` gets `101 Switching Protocols`
    (RFC 6455 accept key); afterwards every text/binary frame is echoed back, ping -> pong,
    close -> close. Messages are capped at 1 MiB (bigger: close 1009).
  * any other request gets `200 ok <port>\\n` (Content-Length, keep-alive for HTTP/1.1; a
    request body given by Content-Length is read and dropped; chunked bodies get 400 + close).
Idle connections are kept open until the peer closes them. Stops on SIGTERM/SIGINT.
"""
import argparse, asyncio, base64, hashlib, resource, signal, struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
MAX_HEAD = 16384
MAX_MSG = 1 << 20

p = argparse.ArgumentParser()
p.add_argument("--ports", required=True, help="comma-separated, e.g. 19101,19102")
p.add_argument("--host", default="127.0.0.1")
a = p.parse_args()


def parse_head(head):
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    hdrs = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    version = parts[2] if len(parts) >= 3 else "HTTP/1.0"
    return version, hdrs


def frame(opcode, payload):
    n = len(payload)
    if n < 126:
        hdr = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        hdr = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        hdr = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return hdr + payload


async def websocket(reader, writer):
    msg, msg_op = b"", 0
    while True:
        b0, b1 = await reader.readexactly(2)
        fin, op, masked, n = b0 & 0x80, b0 & 0x0F, b1 & 0x80, b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await reader.readexactly(8))
        if n > MAX_MSG or len(msg) + n > MAX_MSG:
            writer.write(frame(8, struct.pack("!H", 1009)))
            return
        mask = await reader.readexactly(4) if masked else b"\0\0\0\0"
        data = bytearray(await reader.readexactly(n))
        for i in range(n):
            data[i] ^= mask[i & 3]
        data = bytes(data)
        if op == 8:  # close: answer with the same code, then hang up
            writer.write(frame(8, data[:2]))
            return
        if op == 9:
            writer.write(frame(10, data))
        elif op in (0, 1, 2):
            if op:
                msg_op = op
            msg += data
            if fin:
                writer.write(frame(msg_op, msg))
                msg, msg_op = b"", 0
        await writer.drain()


async def handle(reader, writer, port):
    body = f"ok {port}\n".encode()
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n" % len(body)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEAD:
                break
            version, h = parse_head(head)
            if "websocket" in h.get("upgrade", "").lower() and "sec-websocket-key" in h:
                accept = base64.b64encode(hashlib.sha1(h["sec-websocket-key"].encode() + GUID).digest())
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
                await writer.drain()
                await websocket(reader, writer)
                break
            if "chunked" in h.get("transfer-encoding", "").lower():
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                break
            n = int(h.get("content-length", "0") or 0)
            if n:
                await reader.readexactly(n)
            close = version == "HTTP/1.0" or "close" in h.get("connection", "").lower()
            writer.write(ok + (b"Connection: close\r\n\r\n" if close else b"\r\n") + body)
            if close:
                break
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    servers = []
    for port in (int(x) for x in a.ports.split(",") if x):
        servers.append(await asyncio.start_server(
            lambda r, w, port=port: handle(r, w, port), a.host, port, backlog=4096, limit=MAX_HEAD * 2))
    print(f"listening on {a.ports}", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


asyncio.run(main())
