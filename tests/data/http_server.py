"""nginx on loopback, serving an atlas folder over HTTP with Range support, for the remote tests.

nginx is the server a publisher would put in front of an atlas (Debian's package: `apt-get
install nginx-light`; `make test` installs it where it may), with real Range, ETag and
keep-alive behaviour; Python's http.server answers no ranges. It runs as the test's own
user (``master_process off``) from a config in a temporary folder. The same server also
lays out the Hugging Face Hub's file URLs, so that ``hf://`` is read offline through
``HF_ENDPOINT``: ``/datasets/ORG/NAME/resolve/REV/PATH`` answers as the Hub does for a
large file, a 302 to a CDN path with ``X-Repo-Commit`` naming the commit, and only the
branch ``main`` and that commit resolve.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HUB_REPO = "hexatlas-org/toy-atlas"
HUB_COMMIT = "3f2c1d0e9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if Path(p).is_file()), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CONFIG = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format bytes '$request_method $uri "$http_range" $status $body_bytes_sent';
    access_log {tmp}/access.log bytes;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ application/json json; }}
    default_type application/octet-stream;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        location /atlas/ {{ alias {root}/; }}
        location ~ ^/datasets/{repo}/resolve/(main|{commit})/(.*)$ {{
            add_header X-Repo-Commit {commit} always;
            return 302 /cdn/$2;
        }}
        location /cdn/ {{ alias {root}/; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(root: Path) -> Iterator[str]:
    """Serve ``root`` at ``http://127.0.0.1:PORT/atlas/`` (and as the Hub repo :data:`HUB_REPO`
    at ``http://127.0.0.1:PORT``); yields the base URL. Skips the test when there is no nginx."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("no nginx here (Debian: apt-get install nginx-light; make test installs it as root)")
    tmp = Path(tempfile.mkdtemp(prefix="hexatlas-nginx-"))
    port = _free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(CONFIG.format(tmp=tmp, port=port, root=Path(root).resolve(), repo=HUB_REPO, commit=HUB_COMMIT))
    proc = subprocess.Popen([binary, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.skip(f"nginx did not start: {proc.stderr.read().decode(errors='replace')[-300:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                pytest.skip("nginx did not start listening within 10 s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
