"""A fault-injecting HTTP proxy on loopback, between a reader and a real server (nginx, moto).

It forwards GET and HEAD requests (keep-alive on both sides) and answers some of them with
a fault instead: the connection reset without an answer, HTTP 503 or 429, the body cut
short and the connection closed, or (for range requests, whose bytes the reader can check)
the body with one byte changed. Which requests get which fault is drawn from the seed, the
request (method, path, range) and how many times it was asked before, so a run is the same
whatever order threads send in; a request is faulted on at most its first ``max_faults``
tries (transient faults), or on every try with ``max_faults=None``. ``corrupt`` names paths
whose bodies always have their first byte changed: bytes damaged where they are stored, not on
the way (a range's first byte is one the reader uses: a block's range may span bytes it skips). It counts requests and the body bytes it
sent, so the tests and benchmarks measure what a lookup costs on the wire.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("reset", "503", "429", "truncate", "flip")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
        "proxy-connection", "content-length"}


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:8080", rates={"reset": 0.1}, seed=1) as proxy:`` then
    read from ``proxy.url``. ``rates``: each fault's share of requests (their sum at most 1)."""

    def __init__(self, upstream: str, *, rates: dict[str, float] | None = None, seed: int = 0,
                 corrupt: tuple[str, ...] = (), max_faults: int | None = 1) -> None:
        parts = urlsplit(upstream)
        self.upstream = parts.netloc
        self.rates = dict(rates or {})
        unknown = set(self.rates) - set(FAULTS)
        if unknown or sum(self.rates.values()) > 1:
            raise ValueError(f"rates must name faults of {FAULTS} with a sum <= 1, got {self.rates}")
        self.corrupt, self.seed, self.max_faults = corrupt, seed, max_faults
        self._seen: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.connections = 0  # accepted from readers
        self.faults: Counter[str] = Counter()
        self.log: list[tuple[str, str, str, int, int]] = []  # method, path, range, status, body bytes
        self._local = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy.connections += 1
                # headers and body go out in separate writes: without this, Nagle's algorithm and the
                # reader's delayed ACK add ~40 ms to each answer, which is the proxy's cost, not the server's
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_HEAD(self) -> None:
                proxy._handle(self, "HEAD")

            def do_GET(self) -> None:
                proxy._handle(self, "GET")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests, self.bytes, self.log, self.connections = 0, 0, [], 0
            self.faults.clear()
            self._seen.clear()

    def _choose(self, key: tuple[str, str, str]) -> str | None:
        with self._lock:
            tries = self._seen[key]
            self._seen[key] += 1
        if self.max_faults is not None and tries >= self.max_faults:
            return None
        draw = random.Random(f"{self.seed}|{key}|{tries}").random()
        total = 0.0
        for fault in FAULTS:
            total += self.rates.get(fault, 0.0)
            if draw < total:
                return fault
        return None

    def _forward(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = getattr(self._local, "conn", None)
        for attempt in range(2):
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self.upstream, timeout=30)
            try:
                conn.request(method, path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.will_close:
                    conn.close()
                    self._local.conn = None
                return resp.status, resp.getheaders(), body
            except (http.client.HTTPException, OSError):
                conn.close()
                conn = self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP and k.lower() != "host"}
        path = h.path
        fault = self._choose((method, path, h.headers.get("Range", "")))
        if fault == "flip" and not h.headers.get("Range"):
            fault = None
        if fault == "reset":
            self._count(method, path, h.headers.get("Range", ""), 0, 0, fault)
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.close_connection = True
            h.connection.close()
            return
        if fault in ("503", "429"):
            self._count(method, path, h.headers.get("Range", ""), int(fault), 0, fault)
            h.send_response(int(fault))
            h.send_header("Content-Length", "0")
            h.send_header("Retry-After", "0")
            h.end_headers()
            return
        status, out_headers, body = self._forward(method, path, headers)
        if method == "GET" and body and (fault == "flip" or any(c in path for c in self.corrupt)):
            data = bytearray(body)
            at = random.Random(f"{self.seed}|{path}").randrange(len(data)) if fault == "flip" else 0
            data[at] ^= 0x5A
            body = bytes(data)
            fault = fault or "corrupt"
        elif fault == "flip":
            fault = None
        truncate = fault == "truncate" and method == "GET" and len(body) > 1
        if fault == "truncate" and not truncate:
            fault = None
        sent = body[: len(body) // 2] if truncate else body if method == "GET" else b""
        # counted before anything goes out: a reader that has its answer sees it counted
        self._count(method, path, h.headers.get("Range", ""), status, len(sent), fault)
        h.send_response(status)
        for k, v in out_headers:
            if k.lower() not in _HOP:
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)) if method == "GET" else
                      next((v for k, v in out_headers if k.lower() == "content-length"), "0"))
        h.end_headers()
        if sent:
            h.wfile.write(sent)
            h.wfile.flush()
        if truncate:
            h.close_connection = True

    def _count(self, method: str, path: str, byte_range: str, status: int, nbytes: int, fault: str | None) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += nbytes
            self.log.append((method, path, byte_range, status, nbytes))
            if fault:
                self.faults[fault] += 1
