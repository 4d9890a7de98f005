"""Run the hexatlas HTTP app in a background thread on a free loopback port, for tests."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """Poll ``url``/v1/health until a server process answers; returns the health document."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"{url}/v1/health", timeout=2).json()
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.stderr and proc.poll() is not None else "still starting"
                raise RuntimeError(f"hexatlas serve did not answer at {url}: {err}") from None
            time.sleep(0.2)


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn until the block ends; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
