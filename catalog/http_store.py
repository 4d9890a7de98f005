"""Atlases read over plain HTTP(S) and from the Hugging Face Hub, in place, with range requests.

``https://HOST/PATH`` (or ``http://``) names a dataset (the folder holding ``manifest.json``)
or an atlas root; HTTP cannot list a folder, so a root is found through its ``atlas.json``,
a small index of its datasets that ``hexatlas build`` and ``hexatlas publish`` write.
``hf://datasets/ORG/NAME[@REVISION][/SUBPATH]`` is the same over the Hub's file URLs,
``{HF_ENDPOINT or https://huggingface.co}/datasets/ORG/NAME/resolve/REVISION/PATH``: the
commit the first answer names (``X-Repo-Commit``) pins every later read, so one opened
atlas never mixes two revisions. ``HF_TOKEN`` is sent (to the Hub's host only, never to the
CDN it redirects to) for private datasets.

Only the standard library is used: kept-alive connections shared by the threads (a pool per
host, so a lookup's reader threads reuse those of the last lookup);
redirects followed (and a file's final URL reused); transient failures (connection reset or
refused, timeouts, a short body, 408/425/429/5xx) retried with exponential backoff and
jitter, bounded in attempts and total time, after which a :class:`StorageError` names the
URL, the last status and what to do. Every answer's ETag is compared with the first one
seen for that file: a file replaced under a reader raises :class:`AtlasChangedError`
instead of mixing old and new bytes (the blocks' CRC-32s and the manifest's sha256s catch
the rest). The store itself, read-only, is :class:`catalog.storage.HttpStore`; publish
with ``hexatlas publish``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from catalog.errors import AtlasChangedError, AtlasCorruptError, InvalidArgumentError, StorageError

__all__ = ["ATLAS_INDEX", "HttpFile", "RetryPolicy", "Session", "default_retry", "parse_location"]

ATLAS_INDEX = "atlas.json"  # an atlas root's list of datasets: HTTP has no listing
MAX_ATLAS_INDEX_BYTES = 1 << 20
MANIFEST = "manifest.json"
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
DOWNLOAD_CHUNK = 8 << 20  # whole-file reads (an index, a part for SQL) go in ranges of this size
MAX_REDIRECTS = 5
MAX_IDLE = 32  # kept-alive connections per host: the readers' thread pool (16) and some callers
_TRANSIENT_STATUS = frozenset({408, 425, 429})
_OTHER_BODY = 1 << 20  # of a redirect's or an error's body, at most this much is read


@dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: at most ``attempts`` tries within ``total_s`` seconds,
    waiting ``base_s * 2**n`` (at most ``max_s``, times a random factor in [0.5, 1]) after the
    n-th; each request times out after ``timeout_s``."""

    attempts: int = 6
    base_s: float = 0.25
    max_s: float = 8.0
    total_s: float = 90.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or min(self.base_s, self.max_s, self.total_s, self.timeout_s) < 0:
            raise InvalidArgumentError(f"a retry policy needs attempts >= 1 and times >= 0, got {self}")


def default_retry() -> RetryPolicy:
    """The policy from ``HEXATLAS_HTTP_ATTEMPTS``, ``HEXATLAS_HTTP_BACKOFF`` (first wait, s),
    ``HEXATLAS_HTTP_TOTAL`` (s) and ``HEXATLAS_HTTP_TIMEOUT`` (s), each defaulting as :class:`RetryPolicy`."""
    base = RetryPolicy()
    names = {"attempts": "HEXATLAS_HTTP_ATTEMPTS", "base_s": "HEXATLAS_HTTP_BACKOFF",
             "total_s": "HEXATLAS_HTTP_TOTAL", "timeout_s": "HEXATLAS_HTTP_TIMEOUT"}
    values: dict[str, Any] = {}
    for key, env in names.items():
        text = os.environ.get(env)
        if text:
            try:
                values[key] = int(text) if key == "attempts" else float(text)
            except ValueError:
                raise InvalidArgumentError(f"{env}={text!r} is not a number") from None
    return RetryPolicy(**{**base.__dict__, **values})


class _Transient(Exception):
    """A failure worth retrying; its text says what happened."""


def _strip_etag(value: str | None) -> str | None:
    return value.removeprefix("W/").strip('"') if value else None


class Session:
    """What the stores of one opened location share: connections, pinned revision, ETags, counts."""

    def __init__(self, kind: str, base: str, revision: str | None, token: str | None, retry: RetryPolicy) -> None:
        self.kind, self.base, self.revision, self.token, self.retry = kind, base.rstrip("/"), revision, token, retry
        self.commit: str | None = None  # hf: the commit the first answer named; later reads pinned to it
        self.etags: dict[str, str] = {}  # path -> ETag first seen
        self.final: dict[str, str] = {}  # path -> URL it redirected to (a CDN), reused while it answers
        self.requests = 0
        self.bytes = 0
        self.retries = 0
        self.reconnects = 0  # idle connections found closed by the server, reopened at once
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}  # kept-alive, shared by threads
        self._lock = threading.Lock()
        self._base_host = urlsplit(self.base).netloc

    # ------------------------------------------------------------ addressing
    def url(self, path: str) -> str:
        quoted = quote(path)
        if self.kind == "hf":
            rev = self.commit or self.revision or "main"
            return f"{self.base}/resolve/{quote(rev, safe='')}/{quoted}"
        return f"{self.base}/{quoted}"

    # ------------------------------------------------------------ connections
    def _acquire(self, key: tuple[str, str]) -> tuple[http.client.HTTPConnection, bool]:
        """An idle kept-alive connection to ``key`` (scheme, host:port), or a new one; and whether it was idle."""
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        return self._new(key), False

    def _new(self, key: tuple[str, str]) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if key[0] == "https" else http.client.HTTPConnection
        return cls(key[1], timeout=self.retry.timeout_s)

    def _release(self, key: tuple[str, str], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < MAX_IDLE:
                idle.append(conn)
                return
        conn.close()

    def _once(self, method: str, url: str, headers: dict[str, str], limit: int | None = None
              ) -> tuple[int, http.client.HTTPMessage, bytes]:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        send = {"User-Agent": "hexatlas", "Accept-Encoding": "identity", **headers}
        if self.token and parts.netloc == self._base_host:  # never to the CDN a file redirects to
            send["Authorization"] = f"Bearer {self.token}"
        conn, reused = self._acquire(key)
        while True:
            try:
                conn.request(method, target, headers=send)
                resp = conn.getresponse()
                # a HEAD's empty body too: the connection is reusable only once it is read; no more
                # of it than was asked (a redirect's or an error's page: at most _OTHER_BODY)
                cap = limit if resp.status in (200, 206) else _OTHER_BODY
                body = resp.read() if cap is None else resp.read(cap + 1)
                break
            except (http.client.HTTPException, OSError) as exc:
                conn.close()
                if reused and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                                               http.client.CannotSendRequest)):
                    # an idle connection the server closed meanwhile: once more on a new one, not a retry
                    with self._lock:
                        self.reconnects += 1
                    conn, reused = self._new(key), False
                    continue
                text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                raise _Transient(text) from None
        if resp.status not in (200, 206) and len(body) > _OTHER_BODY:
            conn.close()  # the rest of a long error page is not read
            body = body[:_OTHER_BODY]
        elif limit is not None and len(body) > limit:  # more than was asked: the rest is not read
            conn.close()
            if headers.get("Range") and resp.status == 206:
                raise _Transient(f"a range answer longer than the {limit:,} bytes asked")
            if not headers.get("Range"):  # (a 200 for a range: the caller says the server ignores ranges)
                raise AtlasCorruptError(f"{url} is larger than the {limit:,} bytes a reader expects of it; refusing to "
                                        "read it whole (ask the atlas's publisher)")
        if resp.will_close or conn.sock is None:
            conn.close()
        else:
            self._release(key, conn)
        with self._lock:
            self.requests += 1
            self.bytes += len(body)
        return resp.status, resp.headers, body

    # ------------------------------------------------------------ requests
    def request(self, method: str, path: str, byte_range: tuple[int, int] | None = None, *,
                limit: int | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One logical request (redirects followed, transient failures retried).

        Returns the final status, headers and body; 404 raises :class:`FileNotFoundError`;
        a range is checked (206, its Content-Range and length) before it is returned. No body
        longer than the range, or than ``limit``, is read: a server sending more is refused.
        """
        headers = {"Range": f"bytes={byte_range[0]}-{byte_range[0] + byte_range[1] - 1}"} if byte_range else {}
        policy, start = self.retry, time.monotonic()
        last = "no attempt"
        for attempt in range(policy.attempts):
            if attempt:
                with self._lock:
                    self.retries += 1
            try:
                return self._follow(method, path, headers, byte_range, limit)
            except _Transient as exc:
                last = str(exc)
                wait = min(policy.max_s, policy.base_s * 2 ** attempt) * random.uniform(0.5, 1.0)
                retry_after = getattr(exc, "retry_after", None)
                if retry_after is not None:
                    wait = min(policy.max_s, max(wait, retry_after))
                if attempt + 1 == policy.attempts or time.monotonic() - start + wait > policy.total_s:
                    break
                time.sleep(wait)
        raise StorageError(
            f"cannot read {self.url(path)}: {last}, after {attempt + 1} attempt{'s' * (attempt > 0)} in "
            f"{time.monotonic() - start:.1f} s. Check the URL and the network (a proxy, the server's status), "
            "then try again; the read is safe to repeat"
        )

    def _follow(self, method: str, path: str, headers: dict[str, str], byte_range: tuple[int, int] | None,
                limit: int | None) -> tuple[int, http.client.HTTPMessage, bytes]:
        url = self.final.get(path) or self.url(path)
        cached = path in self.final
        for _ in range(MAX_REDIRECTS + 1):
            status, head, body = self._once(method, url, headers, byte_range[1] if byte_range else limit)
            self._note_commit(head)
            if status in (301, 302, 303, 307, 308) and head.get("Location"):
                url = urljoin(url, head["Location"])
                continue
            if cached and status in (401, 403, 404, 410):  # an expired CDN link: resolve the file again
                self.final.pop(path, None)
                url, cached = self.url(path), False
                continue
            break
        else:
            raise StorageError(f"{self.url(path)} redirects more than {MAX_REDIRECTS} times; check the URL")
        if status == 404:
            raise FileNotFoundError(path)
        if status in _TRANSIENT_STATUS or status >= 500:
            exc = _Transient(f"HTTP {status} {_reason(status)}")
            with contextlib.suppress(TypeError, ValueError):
                exc.retry_after = float(head.get("Retry-After"))  # type: ignore[attr-defined]
            raise exc
        if status in (401, 403):
            hint = " (set HF_TOKEN to a token that may read this dataset)" if self.kind == "hf" else ""
            raise StorageError(f"{self.url(path)} answered HTTP {status} {_reason(status)}: access denied{hint}")
        if status == 416 and byte_range == (0, 1):  # a probe of an empty file
            return status, head, b""
        if status == 416:
            raise AtlasCorruptError(f"{self.url(path)} is shorter than its manifest says (HTTP 416 for bytes "
                                    f"{headers.get('Range', '')[6:]}); the published copy is truncated: republish it")
        if status not in (200, 206):
            raise StorageError(f"{self.url(path)} answered HTTP {status} {_reason(status)}; expected 200 or 206")
        if url != self.url(path) and not cached:
            self.final[path] = url
        self._check_etag(path, head)
        if byte_range is not None and method == "GET":
            self._check_range(path, status, head, body, byte_range)
        return status, head, body

    def probe(self, path: str) -> int:
        """The size of ``path`` (FileNotFoundError when there is none), from a one-byte range
        request: a HEAD is not always allowed where the Hub redirects (presigned GET links)."""
        status, head, _ = self.request("GET", path, (0, 1))
        if status == 416:
            return 0
        total = head.get("Content-Range", "").rpartition("/")[2]
        if not total.isdigit():
            raise StorageError(f"{self.url(path)} gives no file size in its Content-Range ({head.get('Content-Range')!r}); "
                               "serve the atlas with a server that does (nginx, S3 and the Hub do)")
        return int(total)

    def _note_commit(self, head: http.client.HTTPMessage) -> None:
        if self.kind != "hf" or self.commit is not None:
            return
        commit = head.get("X-Repo-Commit")
        if commit:
            with self._lock:
                if self.commit is None:
                    self.commit = commit.strip()
                    self.final.clear()  # URLs resolved under the branch name; re-resolve under the commit

    def _check_etag(self, path: str, head: http.client.HTTPMessage) -> None:
        etag = _strip_etag(head.get("X-Linked-Etag") or head.get("ETag"))
        if not etag:
            return
        with self._lock:
            first = self.etags.setdefault(path, etag)
        if self.kind == "hf" and self.commit is not None:
            return  # a commit's files cannot change; a CDN node may tag the same bytes differently
        if first != etag:
            raise AtlasChangedError(
                f"{self.url(path)} changed while it was being read (ETag {first!r}, now {etag!r}): the atlas was "
                "republished under this reader. Open it again to read the new version (or pin a revision)"
            )

    def _check_range(self, path: str, status: int, head: http.client.HTTPMessage, body: bytes,
                     byte_range: tuple[int, int]) -> None:
        offset, size = byte_range
        if status == 200:
            raise StorageError(f"{self.url(path)} ignores Range requests (HTTP 200 for a range); serve the atlas from "
                               "a server that supports them (nginx, S3, the Hub do)")
        content_range = head.get("Content-Range", "")
        try:
            span, total = content_range.removeprefix("bytes ").split("/")
            first, last = (int(v) for v in span.split("-"))
        except ValueError:
            raise _Transient(f"a 206 answer without a valid Content-Range ({content_range!r})") from None
        want_last = min(offset + size, int(total) if total != "*" else offset + size) - 1
        if first != offset or last != want_last or len(body) != last - first + 1:
            raise _Transient(f"a short or misplaced range (asked bytes {offset}-{offset + size - 1}, got "
                             f"{content_range!r} with {len(body)} bytes)")


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def parse_location(location: str, *, retry: RetryPolicy | None = None) -> tuple[Session, str, str]:
    """``(session, root path, uri)`` for ``https://...``, ``http://...`` or ``hf://datasets/ORG/NAME[@REV][/PATH]``."""
    policy = retry or default_retry()
    text = location.strip()
    if text.lower().startswith("hf://"):
        rest = text[5:].strip("/")
        kind, _, rest = rest.partition("/")
        if kind != "datasets":
            raise InvalidArgumentError(f"{text!r}: only Hub datasets hold atlases; write hf://datasets/ORG/NAME")
        pieces = rest.split("/")
        if len(pieces) < 2 or not pieces[0] or not pieces[1]:
            raise InvalidArgumentError(f"{text!r} names no dataset repository; write hf://datasets/ORG/NAME[@REVISION]")
        name, _, revision = pieces[1].partition("@")
        repo = f"{pieces[0]}/{name}"
        sub = "/".join(p for p in pieces[2:] if p)
        if "@" in pieces[1] and not revision:
            raise InvalidArgumentError(f"{text!r}: '@' must be followed by a branch, tag or commit")
        endpoint = (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")
        session = Session("hf", f"{endpoint}/datasets/{repo}", revision or None,
                           os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"), policy)
        uri = f"hf://datasets/{repo}{'@' + revision if revision else ''}"
        return session, sub, uri
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgumentError(f"{text!r} is not an http(s) URL; write https://HOST/PATH")
    if parts.query or parts.fragment:
        raise InvalidArgumentError(f"{text!r}: give the atlas's folder URL, without a query or fragment")
    base = f"{parts.scheme}://{parts.netloc}"
    return Session("http", base, None, None, policy), parts.path.strip("/"), base


class HttpFile:
    """A read-only, seekable file over a store's ``read_range`` (what pyarrow's readers and ``_RemoteBytes`` take)."""

    def __init__(self, store: Any, rel: str, size: int) -> None:
        self.store, self.rel, self._size, self._pos, self.closed = store, rel, size, 0, False

    def size(self) -> int:
        return self._size

    def read_at(self, nbytes: int, offset: int) -> bytes:
        return self.store.read_range(self.rel, offset, min(nbytes, max(0, self._size - offset)))

    def read(self, nbytes: int = -1) -> bytes:
        end = self._size if nbytes is None or nbytes < 0 else min(self._size, self._pos + nbytes)
        data = self.store.read_range(self.rel, self._pos, end - self._pos) if end > self._pos else b""
        self._pos = end
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> HttpFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


