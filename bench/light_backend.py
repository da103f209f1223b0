#!/usr/bin/env python3
"""A keep-alive HTTP/1.1 backend for bench/light_load.sh: answers `backend PORT` after
--delay-ms (asyncio, so concurrent requests overlap), or after --late-ms once --late-after-s
seconds have passed since it started (a backend that becomes slow midway). Stops on SIGTERM."""
import argparse, asyncio, signal, time

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--delay-ms", type=float, default=0.0)
p.add_argument("--late-ms", type=float, default=None)
p.add_argument("--late-after-s", type=float, default=0.0)
a = p.parse_args()
body = f"backend {a.port}\n".encode()
resp = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
start = time.monotonic()


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            late = a.late_ms is not None and time.monotonic() - start >= a.late_after_s
            delay = (a.late_ms if late else a.delay_ms) / 1000.0
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(resp)
            await writer.drain()
            if b"connection: close" in head.lower():
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", a.port, backlog=1024)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


asyncio.run(main())
