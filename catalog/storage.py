"""Where an atlas lives: a local directory, an object-store prefix (``s3://bucket/prefix``), or
(read-only) an HTTP(S) folder or a Hugging Face Hub dataset (:mod:`catalog.http_store`).

A :class:`Store` addresses files by paths relative to its root, so the builder, the
validator and the query layer do not care which kind they hold. Local stores use the
operating system directly; ``s3://`` stores use pyarrow's S3 filesystem (the AWS SDK for
C++), which reads credentials the usual way: ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``~/.aws``, or the instance's role.
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (with ``http://`` for plain HTTP) point it
at an S3-compatible server (MinIO, Ceph, moto) and ``AWS_REGION`` or ``AWS_DEFAULT_REGION``
sets the region; both are read here explicitly so that every pyarrow version honours them.

Publishing is atomic per file on both kinds. Locally a file is written to a temporary name
beside its destination and renamed. S3 has no rename, but an object appears only when its
upload completes (one PUT, or a completed multipart upload), so each file is written
complete to a local temporary file and then uploaded; a killed upload leaves no object.
Readers therefore never see half a file, and the builder publishes the manifest last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from catalog.paths import inside, safe_name
from catalog.errors import AtlasCorruptError, InvalidArgumentError, StorageError
from catalog.http_store import ATLAS_INDEX, DOWNLOAD_CHUNK, MAX_ATLAS_INDEX_BYTES, HttpFile, RetryPolicy, Session, parse_location
from catalog.tables import atomic_path

__all__ = ["HttpStore", "LocalStore", "ObjectStore", "Store", "is_remote", "open_store", "s3_filesystem", "settle"]

REMOTE_SCHEMES = ("s3://", "http://", "https://", "hf://")
HTTP_SCHEMES = ("http://", "https://", "hf://")
_CHUNK = 1 << 20
UPLOAD_THREADS = 16


def settle(path: str | os.PathLike[str]) -> None:
    """Make a written file durable and take its pages out of the page cache.

    Called before a file is published: a build's files are then on disk before they are
    recorded as done, and a build writes far more than it reads back, so its files need
    not crowd the cache (or, in a VM that backs guest memory lazily, cost fresh pages:
    1 GB in 10 MB files took 2.7 s of kernel time plain, 0.37 s settled, on the
    development machine).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        getattr(os, "fdatasync", os.fsync)(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _disk_full(exc: BaseException) -> bool:
    """Whether an error is a full disk (or quota), from the OS or from a library's own message."""
    import errno

    if isinstance(exc, StorageError):  # already said
        return False
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


@contextlib.contextmanager
def _space_errors(where: Path) -> Iterator[None]:
    """A full disk while a file is written, as a :class:`StorageError` that says what to do."""
    try:
        yield
    except Exception as exc:
        if not _disk_full(exc):
            raise
        raise StorageError(
            f"no space left on device at {where}: free space (or give the build more) and run the same build "
            "again to resume; what was written before is kept, the file being written was removed"
        ) from exc


def _within(size: int, limit: int, where: str) -> None:
    if size > limit:
        raise AtlasCorruptError(f"{where} has more than the {limit:,} bytes a reader expects of it; refusing to "
                                "read it whole (run 'hexatlas validate', or ask the atlas's publisher)")


def is_remote(location: str | os.PathLike[str] | Store) -> bool:
    """True for ``s3://``, ``http(s)://`` and ``hf://`` locations (and their stores), False for local paths."""
    if isinstance(location, Store):
        return not location.is_local
    return isinstance(location, str) and location.lower().startswith(REMOTE_SCHEMES)


def open_store(location: str | os.PathLike[str] | Store, *, retry: RetryPolicy | None = None) -> Store:
    """The :class:`Store` for a local path, an ``s3://bucket/prefix`` URI, an ``http(s)://`` URL or
    ``hf://datasets/ORG/NAME[@REVISION][/PATH]`` (the last two read-only; ``retry`` says how
    their transient failures are retried).

    Raises
    ------
    InvalidArgumentError
        An unsupported scheme (``gs://``...), an ``s3://`` URI without a bucket, a malformed URL.
    MissingDependencyError
        pyarrow was built without S3 support.
    """
    if isinstance(location, Store):
        return location
    text = os.fspath(location)
    if text.lower().startswith(HTTP_SCHEMES):
        return HttpStore(*parse_location(text, retry=retry))
    if is_remote(text):
        bucket_path = text[len("s3://"):].strip("/")
        if not bucket_path or bucket_path.startswith("/"):
            raise InvalidArgumentError(f"{text!r} names no bucket; write s3://BUCKET/PREFIX")
        return ObjectStore(s3_filesystem(), bucket_path, f"s3://{bucket_path}")
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise InvalidArgumentError(
            f"cannot store an atlas at {text!r}: scheme {scheme!r} is not supported; use a local path, s3://BUCKET/PREFIX, https://HOST/PATH or hf://datasets/ORG/NAME"
        )
    return LocalStore(Path(text))


def s3_filesystem() -> Any:
    """A ``pyarrow.fs.S3FileSystem`` configured from the standard AWS environment variables."""
    try:
        from pyarrow.fs import S3FileSystem
    except ImportError:  # pragma: no cover - pyarrow wheels ship S3 support
        from catalog.errors import MissingDependencyError

        raise MissingDependencyError(
            "this pyarrow was built without S3 support; install a pyarrow wheel from PyPI: pip install -U pyarrow"
        ) from None
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        if not sep:
            scheme, host = "https", endpoint
        options.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return S3FileSystem(**options)


class Store:
    """The root of an atlas or dataset; files are named by ``/``-separated relative paths."""

    uri: str
    is_local: bool
    listable = True  # files() and subdirs() list what is there (HTTP cannot)
    writable = True

    def child(self, name: str) -> Store:
        """The store rooted at ``name`` under this one."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The last component of the root (a dataset's name)."""
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def exists(self, rel: str) -> bool:
        """Whether the file ``rel`` exists."""
        raise NotImplementedError

    def root_exists(self) -> bool:
        """Whether anything is stored at the root (a directory, or at least one object under the prefix)."""
        raise NotImplementedError

    def size(self, rel: str) -> int:
        """Size in bytes of the file ``rel`` (FileNotFoundError when there is none)."""
        with self.open_input(rel) as fh:
            return int(fh.size()) if hasattr(fh, "size") else os.fstat(fh.fileno()).st_size

    def describe(self) -> dict[str, Any]:
        """Where the bytes are read from, for ``info``: URL, revision, ETag where the store knows them."""
        return {}

    def read_bytes(self, rel: str, *, limit: int | None = None) -> bytes:
        """The whole file ``rel``; with ``limit``, an :class:`AtlasCorruptError` instead when it is
        larger (what an atlas names is read whole only up to what the reader expects)."""
        raise NotImplementedError

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, data: Any) -> None:
        """Write JSON atomically (and, locally, durably: :meth:`staged` settles the file)."""
        with self.staged(rel) as tmp, open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.write("\n")

    @contextlib.contextmanager
    def staged(self, rel: str) -> Iterator[Path]:
        """Yield a local temporary path to write ``rel`` into; publish it on success, atomically."""
        raise NotImplementedError
        yield  # pragma: no cover

    @contextlib.contextmanager
    def staged_dir(self, rel: str) -> Iterator[Path]:
        """Yield a local temporary directory; on success it replaces the directory ``rel``."""
        raise NotImplementedError
        yield  # pragma: no cover

    def files(self, prefix: str = "") -> dict[str, int]:
        """Every file under ``prefix`` (recursively): relative path -> size in bytes."""
        raise NotImplementedError

    def subdirs(self) -> list[str]:
        """Names of the directories (prefixes) directly under the root."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        """Remove the file ``rel`` if it exists."""
        raise NotImplementedError

    def move(self, src: str, dest: str) -> None:
        """Move the file ``src`` to ``dest`` (replacing it), within this store."""
        raise NotImplementedError

    def delete_tree(self, rel: str = "", *, keep: tuple[str, ...] = ()) -> None:
        """Remove the directory ``rel`` with everything in it; with ``rel`` empty, everything in
        the root except the names in ``keep``."""
        raise NotImplementedError

    def open_input(self, rel: str) -> Any:
        """A seekable binary file for reading ``rel`` (pyarrow readers take it)."""
        raise NotImplementedError

    def filesystem(self) -> tuple[Any, str]:
        """``(pyarrow.fs.FileSystem, root path in it)`` for pyarrow datasets."""
        raise NotImplementedError

    def sha256(self, rel: str) -> str:
        """sha256 of the file ``rel``, streamed."""
        digest = hashlib.sha256()
        with self.open_input(rel) as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def download(self, rel: str, dest: Path) -> None:
        """Copy ``rel`` to the local file ``dest`` atomically."""
        with atomic_path(dest) as tmp, self.open_input(rel) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


def _remove_tree(path: Path, tries: int = 100, quiet: int = 10) -> None:
    """Remove ``path``, again while writes still in flight land in it (zarr's own I/O tasks
    can outlive the error that stopped a build: a full disk fails one chunk, not the rest,
    and a late chunk write makes the directory again): done once it has stayed absent for
    ``quiet`` checks 50 ms apart (CI saw it come back after a first removal under load)."""
    absent = 0
    for _ in range(tries):
        if path.exists():
            absent = 0
            shutil.rmtree(path, ignore_errors=True)
        else:
            absent += 1
            if absent >= quiet:
                return
        time.sleep(0.05)


class LocalStore(Store):
    """A directory on a local (or shared, e.g. NFS) filesystem."""

    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def __reduce__(self) -> Any:  # picklable for Ray tasks
        return (LocalStore, (self.root,))

    def child(self, name: str) -> LocalStore:
        return LocalStore(self.root / name)

    @property
    def name(self) -> str:
        return self.root.name

    def path(self, rel: str) -> Path:
        """The local path of ``rel`` for reading it (links that leave the root are refused)."""
        return self._file(rel)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def root_exists(self) -> bool:
        return self.root.is_dir()

    def _file(self, rel: str) -> Path:
        """Where ``rel`` is, checked to stay in the root once links are followed."""
        return inside(self.root, self.root / rel, where=str(self.root))

    def read_bytes(self, rel: str, *, limit: int | None = None) -> bytes:
        with open(self._file(rel), "rb") as fh:
            if limit is not None:
                _within(os.fstat(fh.fileno()).st_size, limit, f"{self.root}/{rel}")
            return fh.read()

    @contextlib.contextmanager
    def staged(self, rel: str) -> Iterator[Path]:
        # beside the destination, so the rename is atomic; '*.tmp' is swept by a resumed build
        with _space_errors(self.root / rel), atomic_path(self.root / rel) as tmp:
            yield tmp
            settle(tmp)

    @contextlib.contextmanager
    def staged_dir(self, rel: str) -> Iterator[Path]:
        dest = self.root / rel
        tmp = self.root / f"{rel}.tmpdir"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with _space_errors(dest):
                tmp.mkdir(parents=True)
                yield tmp
        except BaseException:
            _remove_tree(tmp)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)

    def files(self, prefix: str = "") -> dict[str, int]:
        base = self.root / prefix
        if not base.is_dir():
            return {}
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in base.rglob("*") if p.is_file()}

    def subdirs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def move(self, src: str, dest: str) -> None:
        (self.root / dest).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / src, self.root / dest)

    def delete_tree(self, rel: str = "", *, keep: tuple[str, ...] = ()) -> None:
        base = self.root / rel
        if rel:
            shutil.rmtree(base, ignore_errors=True)
            return
        if not base.is_dir():
            return
        for child in base.iterdir():
            if child.name in keep:
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()

    def open_input(self, rel: str) -> Any:
        return open(self._file(rel), "rb")

    def filesystem(self) -> tuple[Any, str]:
        from pyarrow.fs import LocalFileSystem

        return LocalFileSystem(), str(self.root.resolve())


class ObjectStore(Store):
    """A prefix in an S3 (or S3-compatible) bucket, through a pyarrow filesystem."""

    is_local = False

    def __init__(self, fs: Any, root: str, uri: str) -> None:
        self.fs, self.root, self.uri = fs, root.strip("/"), uri.rstrip("/")

    def __reduce__(self) -> Any:
        # Re-resolved from the environment where it is unpickled (a Ray worker): credentials
        # are never shipped with a task.
        return (open_store, (self.uri,))

    def child(self, name: str) -> ObjectStore:
        return ObjectStore(self.fs, f"{self.root}/{name}", f"{self.uri}/{name}")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    @contextlib.contextmanager
    def _errors(self, what: str, rel: str = "") -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as exc:
            where = f"{self.uri}/{rel}" if rel else self.uri
            raise StorageError(
                f"cannot {what} {where}: {exc}. Check the bucket name, the credentials (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY) and, for an S3-compatible server, AWS_ENDPOINT_URL"
            ) from None

    def exists(self, rel: str) -> bool:
        from pyarrow.fs import FileType

        with self._errors("read", rel):
            return self.fs.get_file_info(self._path(rel)).type == FileType.File

    def root_exists(self) -> bool:
        from pyarrow.fs import FileSelector

        with self._errors("list"):
            return bool(self.fs.get_file_info(FileSelector(self.root, recursive=False, allow_not_found=True)))

    def read_bytes(self, rel: str, *, limit: int | None = None) -> bytes:
        with self._errors("read", rel), self.fs.open_input_stream(self._path(rel)) as fh:
            data = fh.read() if limit is None else fh.read(limit + 1)
        if limit is not None:
            _within(len(data), limit, f"{self.uri}/{rel}")
        return data

    def _upload(self, local: Path, rel: str) -> None:
        with self._errors("write", rel), open(local, "rb") as src, self.fs.open_output_stream(self._path(rel)) as out:
            shutil.copyfileobj(src, out, _CHUNK)

    @contextlib.contextmanager
    def staged(self, rel: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="hexatlas-") as tmpdir:
            tmp = Path(tmpdir) / Path(rel).name
            with _space_errors(Path(tmpdir)):  # the local staging disk ($TMPDIR)
                yield tmp
            self._upload(tmp, rel)

    @contextlib.contextmanager
    def staged_dir(self, rel: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="hexatlas-") as tmpdir:
            with _space_errors(Path(tmpdir)):
                yield Path(tmpdir)
            # Not atomic as a whole: the builder records the directory as done only after this
            # returns, and readers find it only through the manifest, which is written last.
            self.delete_tree(rel)
            files = [p for p in sorted(Path(tmpdir).rglob("*")) if p.is_file()]
            # Zarr stores are many small objects: request latency, not bandwidth, is the cost
            with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="upload") as pool:
                list(pool.map(lambda p: self._upload(p, f"{rel}/{p.relative_to(tmpdir).as_posix()}"), files))

    def files(self, prefix: str = "") -> dict[str, int]:
        from pyarrow.fs import FileSelector, FileType

        with self._errors("list", prefix):
            infos = self.fs.get_file_info(FileSelector(self._path(prefix), recursive=True, allow_not_found=True))
        cut = len(self.root) + 1
        return {i.path[cut:]: i.size for i in infos if i.type == FileType.File}

    def subdirs(self) -> list[str]:
        from pyarrow.fs import FileSelector, FileType

        with self._errors("list"):
            infos = self.fs.get_file_info(FileSelector(self.root, recursive=False, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == FileType.Directory)

    def delete(self, rel: str) -> None:
        with self._errors("delete", rel), contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self._path(rel))

    def move(self, src: str, dest: str) -> None:
        with self._errors("move", src):
            self.fs.move(self._path(src), self._path(dest))  # S3: a server-side copy, then a delete

    def delete_tree(self, rel: str = "", *, keep: tuple[str, ...] = ()) -> None:
        from pyarrow.fs import FileSelector, FileType

        with self._errors("delete", rel):
            if rel:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_dir(self._path(rel))
                return
            infos = self.fs.get_file_info(FileSelector(self._path(rel), recursive=False, allow_not_found=True))
            for info in infos:
                if info.base_name in keep:
                    continue
                if info.type == FileType.Directory:
                    self.fs.delete_dir(info.path)
                else:
                    self.fs.delete_file(info.path)

    def open_input(self, rel: str) -> Any:
        with self._errors("read", rel):
            return self.fs.open_input_file(self._path(rel))

    def filesystem(self) -> tuple[Any, str]:
        return self.fs, self.root


class HttpStore(Store):
    """A folder on an HTTP(S) server or in a Hub dataset repository: read-only, and not listable
    (an atlas root lists its datasets in ``atlas.json``). Stores made by :meth:`child` share one
    :class:`~catalog.http_store.Session`: connections, the pinned Hub commit, the ETags seen."""

    is_local = False
    listable = False
    writable = False

    def __init__(self, session: Session, root: str, uri: str) -> None:
        self.session, self.root = session, root.strip("/")
        self.uri = f"{uri.rstrip('/')}/{self.root}" if self.root else uri.rstrip("/")

    def __reduce__(self) -> Any:
        return (_reopen_http, (self.uri, self.session.commit))

    def _rel(self, rel: str) -> str:
        return f"{self.root}/{rel}".strip("/") if self.root else rel

    def child(self, name: str) -> HttpStore:
        store = HttpStore.__new__(HttpStore)
        store.session, store.root, store.uri = self.session, self._rel(name), f"{self.uri}/{name}"
        return store

    def url(self, rel: str) -> str:
        """The URL ``rel`` is read from now (under the pinned commit, on the Hub)."""
        return self.session.url(self._rel(rel))

    def exists(self, rel: str) -> bool:
        try:
            self.session.probe(self._rel(rel))
        except FileNotFoundError:
            return False
        return True

    def size(self, rel: str) -> int:
        return self.session.probe(self._rel(rel))

    def root_exists(self) -> bool:
        return self.exists("manifest.json") or self.exists(ATLAS_INDEX)

    def read_bytes(self, rel: str, *, limit: int | None = None) -> bytes:
        return self.session.request("GET", self._rel(rel), limit=limit)[2]

    def read_range(self, rel: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``rel`` from ``offset``: one range request, retried when transient."""
        if size <= 0:
            return b""
        return self.session.request("GET", self._rel(rel), (offset, size))[2]

    def subdirs(self) -> list[str]:
        """The datasets an atlas root's ``atlas.json`` lists (HTTP cannot list folders)."""
        try:
            index = json.loads(self.read_bytes(ATLAS_INDEX, limit=MAX_ATLAS_INDEX_BYTES))
        except FileNotFoundError:
            return []
        except (ValueError, RecursionError) as exc:
            raise AtlasCorruptError(f"{self.url(ATLAS_INDEX)} is not JSON ({exc}); republish the atlas") from None
        names = index.get("datasets") if isinstance(index, dict) else None
        if not isinstance(names, list) or len(names) > 4096:
            raise AtlasCorruptError(f"{self.url(ATLAS_INDEX)} does not list datasets; republish the atlas")
        return sorted(safe_name(n, field=f"datasets[{i}]", where=self.url(ATLAS_INDEX)) for i, n in enumerate(names))

    def files(self, prefix: str = "") -> dict[str, int]:
        raise InvalidArgumentError(f"{self.uri} cannot be listed over HTTP; its manifest says what it holds")

    def open_input(self, rel: str) -> HttpFile:
        return HttpFile(self, rel, self.size(rel))

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        size = self.size(rel)
        for offset in range(0, size, DOWNLOAD_CHUNK):
            digest.update(self.read_range(rel, offset, min(DOWNLOAD_CHUNK, size - offset)))
        return digest.hexdigest()

    def download(self, rel: str, dest: Path) -> None:
        size = self.size(rel)
        with atomic_path(dest) as tmp, open(tmp, "wb") as out:
            for offset in range(0, size, DOWNLOAD_CHUNK):  # each range retried on its own
                out.write(self.read_range(rel, offset, min(DOWNLOAD_CHUNK, size - offset)))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url("manifest.json").rsplit("/", 1)[0]}
        if self.session.kind == "hf":
            out["revision"] = self.session.revision or "main"
            out["commit"] = self.session.commit
        out["etag"] = self.session.etags.get(self._rel("manifest.json"))
        return out

    def _read_only(self, *_: Any, **__: Any) -> Any:
        raise InvalidArgumentError(
            f"{self.uri} is read-only here: build to a local directory or s3:// and publish it with "
            "'hexatlas publish ATLAS DEST'")

    staged = staged_dir = delete = move = delete_tree = filesystem = _read_only  # type: ignore[assignment]


def _reopen_http(uri: str, commit: str | None) -> HttpStore:
    store = open_store(uri)
    assert isinstance(store, HttpStore)
    store.session.commit = commit
    return store
