"""An S3-compatible server on loopback for the object-storage tests (moto's server mode).

moto implements the S3 REST API in-process (no binary to download, no Docker), including
multipart uploads and listing by prefix, which is all hexatlas uses; its `[server]` extra is
in the test dependencies. The environment gets dummy credentials and the endpoint, exactly
as a user points hexatlas at MinIO or Ceph.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

BUCKET = "hexatlas-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_server(bucket: str = BUCKET) -> Iterator[str]:
    """Run moto's S3 server on 127.0.0.1, set the AWS_* variables, create ``bucket``; yield the endpoint."""
    from moto.server import ThreadedMotoServer
    from pyarrow.fs import S3FileSystem

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.update(env)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(k, None)
    try:
        S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                     allow_bucket_creation=True).create_dir(bucket)
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
