"""``hexatlas publish ATLAS DEST``: copy a finished, valid local atlas to where others read it.

``DEST`` is an atlas root: each dataset goes to ``DEST/<name>/`` with its files, its STAC
collection and its manifest (last), and ``DEST/atlas.json`` lists the root's datasets, which
is how HTTP readers find them.

- ``s3://BUCKET/PREFIX`` (any S3-compatible store, e.g. Source Cooperative): each dataset is
  published under its build lock (:mod:`catalog.lock`); an older version's manifest is
  removed first and the new one written last, so readers see the old version, then an
  unfinished one, then the new one. Resumable: uploaded files are recorded in
  ``$HEXATLAS_CACHE/publish/``, and a rerun uploads only what is missing or has another size
  there; a dataset whose manifest is already the same at the destination is skipped.
- ``hf://datasets/ORG/NAME[@BRANCH]`` (the Hugging Face Hub, ``pip install
  'hexatlas[publish]'``; token from ``HF_TOKEN`` or ``huggingface-cli login``, endpoint from
  ``HF_ENDPOINT``): one commit adds every file, a dataset card (``README.md``, written from
  the manifests) and ``atlas.json``, and deletes the files of an older version; the Hub
  applies a commit at once, so readers never see a mix. Resumable: large files already
  uploaded by a failed attempt are not sent again (the Hub keeps them by sha256).

The atlas must be finished (a manifest, no build running or half-swapped) and valid
(``hexatlas validate``: every size and sha256); anything else is refused before a byte moves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog.errors import (
    AtlasBusyError,
    AtlasCorruptError,
    AtlasNotFoundError,
    HexatlasError,
    InvalidArgumentError,
    MissingDependencyError,
    StorageError,
)
from catalog.manifest import (
    ATLAS_INDEX,
    BUILD_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    REBUILD_DIR,
    STAC,
    list_datasets,
    read_manifest,
    validate_dataset,
    write_atlas_index,
)
from catalog.storage import UPLOAD_THREADS, LocalStore, ObjectStore, Store, open_store

__all__ = ["PublishSummary", "configure_publish", "dataset_card", "publish", "run_publish"]

log = logging.getLogger(__name__)
HF_LICENCES = {"mit": "mit", "apache-2.0": "apache-2.0", "apache 2.0": "apache-2.0", "cc-by-4.0": "cc-by-4.0",
               "cc-by-sa-4.0": "cc-by-sa-4.0", "cc-by-nc-4.0": "cc-by-nc-4.0", "bsd-3-clause": "bsd-3-clause"}


@dataclass
class PublishSummary:
    """What a publish did: per dataset ``"uploaded"`` / ``"unchanged"``, files and bytes sent."""

    dest: str
    datasets: dict[str, str] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    skipped_files: int = 0
    commit: str | None = None

    def __str__(self) -> str:
        done = ", ".join(f"{k}: {v}" for k, v in self.datasets.items())
        extra = f", commit {self.commit}" if self.commit else ""
        return (f"{self.dest} ({done}): {self.files} files, {self.bytes / 1e6:.1f} MB sent, "
                f"{self.skipped_files} already there{extra}")


def _finished_datasets(atlas: str | os.PathLike[str]) -> list[LocalStore]:
    """The datasets of a local atlas (or one dataset), each checked finished, idle and valid."""
    store = open_store(atlas)
    if not isinstance(store, LocalStore):
        raise InvalidArgumentError(f"publish reads a local atlas directory, not {store.uri!r}; copy it here first "
                                   "(or publish from where it was built)")
    if not store.root_exists():
        raise AtlasNotFoundError(f"no atlas at {store.uri!r}")
    if store.exists(MANIFEST) or store.exists(f"{BUILD_DIR}/build.json"):
        datasets = [store]  # one dataset (read_manifest below refuses an unfinished one, saying so)
    else:
        unfinished = [n for n in store.subdirs() if not store.child(n).exists(MANIFEST)
                      and store.child(n).exists(f"{BUILD_DIR}/build.json")]
        if unfinished:
            raise AtlasCorruptError(
                f"{store.uri!r} has unfinished builds ({', '.join(unfinished)}): finish them (run the same "
                "'hexatlas build' again) or publish the finished dataset folders one by one")
        datasets = [store.child(n) for n in list_datasets(store)]
        if not datasets:
            raise AtlasCorruptError(f"{store.uri!r} holds no finished hexatlas dataset")
    for dataset in datasets:
        read_manifest(dataset)  # refuses an unfinished or incompatible dataset, saying why
        busy = [p for p in (BUILD_DIR, REBUILD_DIR) if (dataset.root / p).exists()]
        if busy:
            raise AtlasBusyError(f"{dataset.uri!r} has {busy[0]}/: a build or --overwrite rebuild is not finished; "
                                 "let it finish (run it again to resume), then publish")
        problems = validate_dataset(dataset)
        if problems:
            raise AtlasCorruptError(
                f"refusing to publish {dataset.uri!r}: it is not valid ({len(problems)} problem"
                f"{'s' * (len(problems) > 1)}, first: {problems[0]}); run 'hexatlas validate {dataset.uri}' "
                "and rebuild it")
    return datasets


@contextlib.contextmanager
def _not_building(dataset: LocalStore) -> Any:
    """Hold the local build lock while publishing, so a build cannot start and change files under us."""
    with open(dataset.root / "_build.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AtlasBusyError(f"a build is writing {dataset.uri!r}; publish it when that build has finished") from None
        yield


def publish(atlas: str | os.PathLike[str], dest: str, *, break_lock: bool = False, progress: bool | None = None,
            message: str | None = None, private: bool = False) -> PublishSummary:
    """Publish a finished, valid local atlas (or one dataset) to ``s3://...`` or ``hf://datasets/...``.

    Parameters
    ----------
    atlas : path
        A local atlas directory or one dataset directory.
    dest : str
        ``s3://BUCKET/PREFIX`` or ``hf://datasets/ORG/NAME[@BRANCH]``: the atlas root; each
        dataset goes to ``DEST/<name>/``.
    break_lock : bool
        S3: remove a lock a dead build or publish left on a destination dataset first.
    message : str, optional
        Hub: the commit message.
    private : bool
        Hub: create the dataset repository as private (when it does not exist yet).

    Raises
    ------
    AtlasCorruptError
        The atlas is unfinished or not valid.
    AtlasBusyError
        A build is writing it, or another build or publish holds a destination's lock.
    MissingDependencyError
        ``hf://`` without huggingface_hub, ``s3://`` without boto3 (``hexatlas[publish]``).
    """
    text = str(dest).strip()
    lower = text.lower()
    if not lower.startswith(("s3://", "hf://")):
        raise InvalidArgumentError(f"cannot publish to {text!r}; give s3://BUCKET/PREFIX or hf://datasets/ORG/NAME "
                                   "(to serve over HTTPS, copy the atlas folder to the web server: atlas.json lists "
                                   "its datasets)")
    datasets = _finished_datasets(atlas)
    with contextlib.ExitStack() as stack:
        for dataset in datasets:
            stack.enter_context(_not_building(dataset))
        if lower.startswith("s3://"):
            return _publish_s3(datasets, open_store(text), break_lock=break_lock, progress=progress)
        return _publish_hub(datasets, text, message=message, private=private)


# ---------------------------------------------------------------------------------- S3
def _state_file(target: Store, digest: str) -> Path:
    base = Path(os.environ.get("HEXATLAS_CACHE") or Path.home() / ".cache" / "hexatlas") / "publish"
    return base / f"{hashlib.sha256(f'{target.uri}|{digest}'.encode()).hexdigest()[:24]}.jsonl"


def _publish_s3(datasets: list[LocalStore], root: Store, *, break_lock: bool, progress: bool | None) -> PublishSummary:
    from catalog.lock import s3_lock

    if not isinstance(root, ObjectStore):
        raise InvalidArgumentError(f"{root.uri!r} is not an S3 prefix")
    summary = PublishSummary(root.uri)
    for dataset in datasets:
        target = root.child(dataset.name)
        raw = (dataset.root / MANIFEST).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        with s3_lock(target.uri, break_lock=break_lock, what="publish"):
            if target.exists(MANIFEST) and hashlib.sha256(target.read_bytes(MANIFEST)).hexdigest() == digest:
                summary.datasets[dataset.name] = "unchanged"
                continue
            _upload_dataset(dataset, target, json.loads(raw), digest, summary, progress)
            summary.datasets[dataset.name] = "uploaded"
    write_atlas_index(root)
    return summary


def _upload_dataset(dataset: LocalStore, target: ObjectStore, manifest: dict[str, Any], digest: str,
                    summary: PublishSummary, progress: bool | None) -> None:
    from tqdm.auto import tqdm

    target.delete(MANIFEST)  # an older version stops being published before its files change
    records = {rec["path"]: int(rec["bytes"]) for rec in manifest["files"]}
    state = _state_file(target, digest)
    state.parent.mkdir(parents=True, exist_ok=True)
    done = set(state.read_text().split()) if state.exists() else set()
    present = target.files()
    todo = [rel for rel in sorted(records) if not (rel in done and present.get(rel) == records[rel])]
    summary.skipped_files += len(records) - len(todo)
    lock = threading.Lock()
    bar = tqdm(total=sum(records[r] for r in todo), unit="B", unit_scale=True, desc=f"publish {dataset.name}",
               disable=not progress if progress is not None else None)

    def upload(rel: str) -> None:
        target._upload(dataset.root / rel, rel)
        with lock, open(state, "a") as fh:
            fh.write(f"{rel}\n")
            summary.files += 1
            summary.bytes += records[rel]
            bar.update(records[rel])

    try:
        with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="publish") as pool:
            futures = [pool.submit(upload, rel) for rel in todo]
            try:
                for future in futures:
                    future.result()
            except BaseException:  # stop at the first failure; a rerun uploads what is missing
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()
    for rel in present:  # an older version's files the new one does not have
        if rel not in records and rel not in (MANIFEST, STAC) and not rel.startswith(BUILD_DIR):
            target.delete(rel)
    for rel in (STAC, MANIFEST):  # the manifest last: the publish step
        target._upload(dataset.root / rel, rel)
    summary.files += 2
    state.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- the Hub
def _hub_target(text: str) -> tuple[str, str | None, str]:
    rest = text[5:].strip("/")
    kind, _, rest = rest.partition("/")
    pieces = rest.split("/")
    if kind != "datasets" or len(pieces) < 2 or not all(pieces[:2]):
        raise InvalidArgumentError(f"{text!r}: publish to a Hub dataset, hf://datasets/ORG/NAME[@BRANCH]")
    name, _, revision = pieces[1].partition("@")
    sub = "/".join(p for p in pieces[2:] if p)
    return f"{pieces[0]}/{name}", revision or None, f"{sub}/" if sub else ""


def _publish_hub(datasets: list[LocalStore], text: str, *, message: str | None, private: bool) -> PublishSummary:
    try:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    except ImportError:
        raise MissingDependencyError("publishing to the Hub needs huggingface_hub: pip install 'hexatlas[publish]'") \
            from None
    repo_id, revision, sub = _hub_target(text)
    try:
        return _commit_to_hub(datasets, text, repo_id, revision, sub, message=message, private=private, api=HfApi(
            endpoint=os.environ.get("HF_ENDPOINT") or None), add=CommitOperationAdd, delete=CommitOperationDelete)
    except (HexatlasError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's and its HTTP client's errors, named for the user
        raise StorageError(
            f"cannot publish to {text}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Check the "
            "token (HF_TOKEN or 'huggingface-cli login'), HF_ENDPOINT and the network, then publish again: large "
            "files already uploaded are not sent twice") from None


def _commit_to_hub(datasets: list[LocalStore], text: str, repo_id: str, revision: str | None, sub: str, *,
                   message: str | None, private: bool, api: Any, add: Any, delete: Any) -> PublishSummary:
    CommitOperationAdd, CommitOperationDelete = add, delete
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private or None)
    # the commit is made on top of the one listed here: a push in between makes it fail, not mix
    parent = api.repo_info(repo_id, repo_type="dataset", revision=revision).sha
    existing = set(api.list_repo_files(repo_id, repo_type="dataset", revision=parent))
    summary = PublishSummary(text)
    ops: list[Any] = []
    manifests: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        raw = (dataset.root / MANIFEST).read_bytes()
        manifest = manifests[dataset.name] = json.loads(raw)
        prefix = f"{sub}{dataset.name}/"
        keep = {rec["path"] for rec in manifest["files"]} | {MANIFEST, STAC}
        for rel in sorted(keep):
            ops.append(CommitOperationAdd(path_in_repo=prefix + rel, path_or_fileobj=str(dataset.root / rel)))
        summary.files += len(keep)
        summary.bytes += sum(int(r["bytes"]) for r in manifest["files"])
        ops += [CommitOperationDelete(path_in_repo=path) for path in sorted(existing)
                if path.startswith(prefix) and path[len(prefix):] not in keep]
        summary.datasets[dataset.name] = "uploaded"
    earlier = {path[len(sub):].split("/")[0] for path in existing  # datasets published before, kept
               if path.startswith(sub) and path[len(sub):].count("/") == 1 and path.endswith(f"/{MANIFEST}")}
    names = sorted(set(manifests) | earlier)
    card = dict(manifests)
    for name in sorted(earlier - set(manifests)):  # the card describes them too
        with contextlib.suppress(HexatlasError, OSError):
            card[name] = read_manifest(open_store(f"hf://datasets/{repo_id}@{parent}/{sub}{name}"))
    index = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "datasets": names}
    ops.append(CommitOperationAdd(path_in_repo=f"{sub}{ATLAS_INDEX}",
                                  path_or_fileobj=(json.dumps(index, indent=1) + "\n").encode()))
    if not sub:
        ops.append(CommitOperationAdd(path_in_repo="README.md",
                                      path_or_fileobj=dataset_card(card, repo_id).encode()))
    info = api.create_commit(repo_id, repo_type="dataset", operations=ops, revision=revision, parent_commit=parent,
                             commit_message=message or f"hexatlas publish: {', '.join(sorted(manifests))}")
    summary.commit = getattr(info, "oid", None)
    return summary


def dataset_card(manifests: dict[str, dict[str, Any]], repo_id: str) -> str:
    """A Hub dataset card (``README.md``) describing the datasets of an atlas, from their manifests:
    model, weights and licence, resolutions with cells and index recall, fidelity where the
    manifest records it, and how to query it."""
    licences = {HF_LICENCES.get(str(m["provenance"].get("licence", "")).strip().lower(), "other")
                for m in manifests.values()}
    licence = licences.pop() if len(licences) == 1 else "other"
    names = sorted(manifests)
    lines = ["---", f"license: {licence}", f"pretty_name: hexatlas location embeddings ({', '.join(names)})",
             "tags:", "- geospatial", "- h3", "- embeddings", "- hexatlas", "---", "",
             f"# Location embeddings on the H3 grid: {', '.join(names)}", "",
             "Precomputed location-encoder embeddings at the centres of H3 cells, published with "
             "[hexatlas](https://pypi.org/project/hexatlas/) (format "
             f"{FORMAT_NAME} {FORMAT_VERSION}). Each dataset folder holds plain Parquet parts "
             "(`data/res=R/*.parquet`: `cell` uint64, `embedding`), their block tables, a FAISS index "
             "per resolution and a `manifest.json` with every file's sha256.", ""]
    first_model, first_res = None, None
    for name in names:
        m = manifests[name]
        prov = m["provenance"]
        lines += [f"## {name}", "",
                  f"- **Model**: {prov['model']}, {prov['dim']}-d ({prov.get('coordinate_order', 'lat,lon')} input "
                  f"to the network); paper: {prov.get('paper', 'unknown')}",
                  f"- **Weights**: {prov.get('source')} (revision {prov.get('revision') or 'n/a'}, sha256 "
                  f"`{prov.get('sha256')}`)",
                  f"- **Licence of the weights**: {prov.get('licence', 'unknown')}; the embeddings are derived "
                  "from them: check that licence before redistributing",
                  f"- **Stored as** {m['precision']}"
                  f"{', cells that touch land only' if m.get('build', {}).get('land_only') else ', the whole globe'}; "
                  f"built {m.get('created')}", "",
                  "| resolution | cells | parts | index | recall@10 | fidelity |", "|---:|---:|---:|---|---:|---|"]
        for res, info in sorted(m["resolutions"].items(), key=lambda kv: int(kv[0])):
            index = info.get("index") or {}
            lines.append(f"| {res} | {int(info['cells']):,} | {len(info.get('parts', []))} | {index.get('type', '')} "
                         f"| {index.get('recall_at_10', '')} | {_fidelity(info.get('fidelity'))} |")
            first_model, first_res = first_model or name, first_res if first_res is not None else res
        lines.append("")
    target = f"hf://datasets/{repo_id}"
    lines += ["## How to query it", "",
              "Without downloading it: hexatlas reads the blocks a query needs with HTTP range requests, each "
              "checked against the manifest's checksums.", "", "```sh", "pip install hexatlas",
              f"hexatlas info {target}",
              f"hexatlas lookup {target} --lat 48.8566 --lon 2.3522 --res {first_res} --model {first_model}",
              f"hexatlas similar {target} --lat 48.8566 --lon 2.3522 -k 10 --model {first_model}", "```", "",
              "```python", "import query", "", f'atlas = query.open("{target}")  # or "{target}@<commit>" to pin it',
              f'emb = atlas.lookup([48.8566], [2.3522], res={first_res}, model="{first_model}")  # float32 (n, dim)',
              "```", "", "Any Parquet reader works too, e.g. DuckDB:", "", "```sql",
              f"SELECT cell, embedding FROM '{target}/{first_model}/data/res={first_res}/*.parquet' LIMIT 5;",
              "```", ""]
    return "\n".join(lines)


def _fidelity(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(value.items()))
    return str(value)


# ---------------------------------------------------------------------------------- the command
def configure_publish(parser: Any) -> None:
    parser.add_argument("atlas", help="a finished local atlas directory (or one dataset in it)")
    parser.add_argument("dest", help="s3://BUCKET/PREFIX or hf://datasets/ORG/NAME[@BRANCH]: the atlas root")
    parser.add_argument("--message", help="Hub: the commit message")
    parser.add_argument("--private", action="store_true", help="Hub: create the repository as private")
    parser.add_argument("--break-lock", action="store_true",
                        help="S3: first remove a lock that a dead build or publish left (only when none runs)")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def run_publish(args: Any) -> int:
    import sys

    summary = publish(args.atlas, args.dest, break_lock=args.break_lock, message=args.message, private=args.private,
                      progress=False if args.no_progress else None)
    print(f"published {summary}", file=sys.stderr)
    return 0
