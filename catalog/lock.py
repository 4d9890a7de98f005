"""The build lock of a dataset in object storage: an object that is written only if it is absent.

S3 has no lock that dies with its holder, but it has conditional writes: a PutObject with
``If-None-Match: *`` succeeds for exactly one of several writers and fails for the others
with 412 Precondition Failed (AWS S3 since August 2024, MinIO, Ceph RGW; moto's server
from 5.0.x, which the tests use). The lock object, ``_build.lock`` in the dataset's prefix,
records who took it (host, pid, start time, command, a random token); its holder deletes it
when done. A build that died leaves it behind: the next one is refused with the holder's
details, whether that holder is known to be gone (same host, no such process) and the exact
ways to clear it. pyarrow's S3 client cannot make conditional writes, so this uses boto3
(``pip install 'hexatlas[publish]'``; the builder's extra has it too), imported only here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from catalog.errors import AtlasBusyError, MissingDependencyError, StorageError

__all__ = ["LOCK_NAME", "s3_lock"]

LOCK_NAME = "_build.lock"
log = logging.getLogger(__name__)


def _client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise MissingDependencyError(
            "locking an s3:// dataset needs boto3 (pyarrow's S3 client cannot write conditionally): "
            "pip install 'hexatlas[publish]'") from None
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint if "://" in endpoint else f"https://{endpoint}"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region_name"] = region
    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}), **options)


def _where(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, f"{prefix.strip('/')}/{LOCK_NAME}".lstrip("/")


def _read(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        held = json.loads(body)
    except ValueError:
        return {"unreadable": body[:200].decode(errors="replace")}
    return held if isinstance(held, dict) else {"unreadable": str(held)[:200]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def describe_holder(held: dict[str, Any] | None) -> str:
    """Who holds a lock, how long since, and whether it is known to be stale."""
    if not held:
        return "a build that has just finished"
    if "unreadable" in held:
        return f"an unreadable lock ({held['unreadable']!r})"
    text = f"pid {held.get('pid')} on {held.get('host')}, since {held.get('started')}"
    with contextlib.suppress(TypeError, ValueError):
        age = datetime.now(timezone.utc) - datetime.fromisoformat(held["started"])
        text += f" ({int(age.total_seconds() // 60)} min ago)"
    if held.get("command"):
        text += f", running {held['command']!r}"
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
        text += "; that process is gone from this host, so the lock is stale"
    return text


@contextlib.contextmanager
def s3_lock(uri: str, *, break_lock: bool = False, what: str = "build") -> Iterator[dict[str, Any]]:
    """Hold the lock of the ``s3://`` dataset ``uri`` while the block runs; yields the lock record.

    Raises
    ------
    AtlasBusyError
        Another build (or publish) holds it: the message names the holder, whether it is
        known to be gone, and how to clear a stale lock.
    StorageError
        The server refused the request, or cannot write conditionally.
    MissingDependencyError
        boto3 is not installed.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client()
    bucket, key = _where(uri)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "what": what,
              "started": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
              "command": " ".join(["hexatlas", *sys.argv[1:]])[:500] if sys.argv else "", "token": uuid.uuid4().hex}
    try:
        if break_lock:
            held = _read(client, bucket, key)
            if held is not None:
                log.warning("breaking the lock on %s held by %s", uri, describe_holder(held))
                client.delete_object(Bucket=bucket, Key=key)
        client.put_object(Bucket=bucket, Key=key, Body=json.dumps(record).encode(), IfNoneMatch="*",
                          ContentType="application/json")
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if error.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            holder = describe_holder(_read(client, bucket, key))
            raise AtlasBusyError(
                f"another {what} holds the lock on {uri}: {holder}. Wait for it to finish; if it is no longer "
                f"running (its machine or process is gone), clear the lock with the same command and --break-lock, "
                f"or delete s3://{bucket}/{key}, then run again") from None
        if error.get("Code") == "NotImplemented" or status == 501:
            raise StorageError(
                f"the S3 server of {uri} cannot write conditionally (If-None-Match), which the build lock needs; "
                "use AWS S3, MinIO or Ceph RGW, or another server that supports it") from None
        raise StorageError(f"cannot take the lock s3://{bucket}/{key}: {error.get('Code')} "
                           f"{error.get('Message', '')}. Check the credentials and AWS_ENDPOINT_URL") from None
    except BotoCoreError as exc:
        raise StorageError(f"cannot take the lock s3://{bucket}/{key}: {exc}. Check AWS_ENDPOINT_URL and the "
                           "network") from None
    try:
        yield record
    finally:
        try:  # only our own lock: one broken meanwhile and taken by another build stays
            held = _read(client, bucket, key)
            if held is not None and held.get("token") == record["token"]:
                client.delete_object(Bucket=bucket, Key=key)
            elif held is not None:
                log.warning("the lock on %s was taken over while this %s ran (%s)", uri, what, describe_holder(held))
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not release the lock s3://%s/%s (%s); delete it by hand", bucket, key, exc)
