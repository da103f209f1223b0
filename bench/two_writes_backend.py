#!/usr/bin/env python3
"""A backend that answers in two writes, head then body, with Nagle on: Python's own
http.server (HTTP/1.1 keep-alive), as many small application servers behave. For
bench/two_writes.sh. Usage: two_writes_backend.py PORT"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = b"two writes\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()  # first write: the head
        self.wfile.write(BODY)  # second write: the body (held by Nagle until the head is ACKed)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
