"""The examples, links and paths of the README and docs/, checked against the code so they cannot drift.

What each fenced block's language means here (``docs/development.md`` says the same for writers):

- ``sh``: every ``hexatlas`` command is parsed by the real CLI (``catalog.cli.main`` with the
  command's ``run_*`` stubbed out). ``[...]`` marks an optional part and ``a | b`` inside it
  alternatives: each command is parsed without its optional parts and with all of them (first
  alternatives). The read-only commands on the atlas ``atlas`` also run, without their optional
  parts, against a small atlas built here (toy encoder, resolutions 0-3, global; the PNG map
  is not drawn, its call only bound to ``render_png``'s signature). ``make``
  targets must exist, ``python -m`` modules must be importable, ``python -c`` code must
  compile, and ``curl`` requests to ``http://127.0.0.1:8000`` go to the server app.
- ``python``: compiled; ``from X import Y`` must resolve; a block after a line
  ``<!-- docs-test: run -->`` is executed beside that atlas, with ``lat`` and ``lon`` defined.
- ``text`` and ``yaml``: not checked (output samples, file trees, a cluster file).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"sh", "python", "text", "yaml"}
RUN_MARK = "<!-- docs-test: run -->"
# A file of this repository named in inline code, e.g. `tests/query/test_remote.py`.
REPO_PATH = r"(builder|catalog|query|tests|benchmarks|examples|docs)/[\w./-]+\.(py|md|png|toml)"
# Commands that only read an atlas and return: run for real against the fixture atlas.
READ_ONLY = {"info", "lookup", "join", "similar", "sql", "validate", "map"}
SERVER = "http://127.0.0.1:8000"
PLACES = [("Paris", 48.8566, 2.3522), ("Sydney", -33.8688, 151.2093), ("Cairo", 30.0444, 31.2357),
          ("Manaus", -3.119, -60.0217), ("New York", 40.7128, -74.006), ("Reykjavik", 64.1466, -21.9426)]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    run: bool  # preceded by RUN_MARK

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    blocks, lines = [], page.read_text().split("\n")
    i = 0
    while i < len(lines):
        fence = re.match(r"^ {0,3}(```+)(.*)$", lines[i])
        if fence is None:
            i += 1
            continue
        ticks, info = fence[1], fence[2].strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(ticks)
                    and not lines[j].strip().strip("`")), None)
        assert end is not None, f"{page.name}:{i + 1}: a code fence that is never closed"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        blocks.append(Block(page, i + 1, info.split()[0] if info else "", "\n".join(lines[i + 1:end]),
                            before == RUN_MARK))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in _blocks(page)]
SH = [b for b in BLOCKS if b.language == "sh"]
PYTHON = [b for b in BLOCKS if b.language == "python"]


def _prose(page: Path) -> str:
    """The page without its fenced blocks (links and inline code there are not the page's)."""
    text, out, fenced = page.read_text(), [], False
    for line in text.split("\n"):
        if re.match(r"^ {0,3}```", line):
            fenced = not fenced
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page).split("\n"):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _slug(heading[1])
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _inline_code(page: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", _prose(page))


# ---------------------------------------------------------------------------- the pages as a whole
def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move reference material to docs/"
    text = (ROOT / "README.md").read_text()
    assert "## Two commands" in text and "make demo" in text and "make test" in text
    picture = ROOT / "docs" / "map.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert picture.stat().st_size < 300_000, "docs/map.png should stay small (see docs/development.md)"


def test_every_block_says_what_it_is() -> None:
    unknown = [f"{b.id} ```{b.language}" for b in BLOCKS if b.language not in LANGUAGES]
    assert unknown == [], f"fences need one of {sorted(LANGUAGES)} (text: not checked)"
    misplaced = [b.id for b in BLOCKS if b.run and b.language != "python"]
    assert misplaced == [], f"{RUN_MARK} goes before python blocks only"


def test_links_and_anchors_resolve() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", _prose(page))):
            if re.match(r"^[a-z]+:", target):
                continue  # https://, mailto: ...
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading with that anchor)")
    assert broken == []


def test_named_paths_exist() -> None:
    missing = []
    for page in PAGES:
        for code in _inline_code(page):
            if re.fullmatch(REPO_PATH, code):
                if not (ROOT / code).is_file():
                    missing.append(f"{page.relative_to(ROOT)}: {code}")
            for module in re.findall(r"(?:^|\s)python -m ([a-z_][a-z0-9_.]*)", code):
                if importlib.util.find_spec(module) is None:
                    missing.append(f"{page.relative_to(ROOT)}: python -m {module}")
    assert missing == []


def _resolve(dotted: str) -> object:
    """``package.module.name`` -> the object, importing modules on the way."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        if not hasattr(obj, part):
            importlib.import_module(".".join(parts[:i]))  # a submodule not imported yet
        obj = getattr(obj, part)
    return obj


def test_named_objects_exist() -> None:
    """`query.server.create_app(...)`, `catalog.HexatlasError`...: the names in inline code
    exist, and those written as calls are callables, not modules."""
    wrong = []
    for page in PAGES:
        for code in _inline_code(page):
            named = re.match(r"((?:builder|catalog|query)(?:\.\w+)+)(\()?", code)
            if named is None:
                continue
            try:
                obj = _resolve(named[1])
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.split(".")[0] not in ("builder", "catalog", "query"):
                    continue  # an optional dependency is missing here
                wrong.append(f"{page.relative_to(ROOT)}: {code} (no such module)")
            except AttributeError:
                wrong.append(f"{page.relative_to(ROOT)}: {code} (no such name)")
            else:
                if named[2] and (inspect.ismodule(obj) or not callable(obj)):
                    wrong.append(f"{page.relative_to(ROOT)}: {code} ({named[1]} is not callable)")
    assert wrong == []


# ---------------------------------------------------------------------------------- shell blocks
def _optional_groups(line: str) -> tuple[str, str]:
    """``line`` without its ``[...]`` parts, and with each of them (its first ``a | b``
    alternative); brackets inside quotes are text."""
    bare, full, quote, i = [], [], None, 0
    while i < len(line):
        ch = line[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            end = line.index("]", i)
            group = line[i + 1:end]
            assert "[" not in group, f"nested optional parts: {line}"
            full.append(group.split("|")[0].strip())
            i = end + 1
            continue
        bare.append(ch)
        full.append(ch)
        i += 1
    return "".join(bare), "".join(full)


def _commands(text: str) -> list[tuple[list[str], list[str]]]:
    """The shell block's commands as argument lists: each without and with its optional parts."""
    logical, current = [], ""
    for line in text.split("\n"):
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    commands = []
    for line in logical:
        bare, full = (shlex.split(form, comments=True) for form in _optional_groups(line))
        if bare:
            commands.append((bare, full))
    return commands


def _hexatlas_argv(words: list[str]) -> list[str] | None:
    """The arguments after ``hexatlas``, also where another command runs it (``ray job submit --``)."""
    if words[0] == "hexatlas":
        return words[1:]
    if "--" in words and words[words.index("--") + 1:][:1] == ["hexatlas"]:
        return words[words.index("--") + 2:]
    return None


def _parse(argv: list[str], monkeypatch, capsys) -> None:
    """Parse through the real ``hexatlas`` entry point, with the command's work stubbed out."""
    from catalog.cli import COMMANDS, main

    assert argv and argv[0] in COMMANDS, f"unknown hexatlas command: {argv[:1]}"
    seen = []
    module = importlib.import_module(COMMANDS[argv[0]][0])
    monkeypatch.setattr(module, f"run_{argv[0]}", lambda args: seen.append(args) or 0)
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse: a usage error
        pytest.fail(f"hexatlas {shlex.join(argv)}: the parser refused it ({exc.code}): "
                    f"{capsys.readouterr().err}")
    assert status == 0 and len(seen) == 1, f"hexatlas {shlex.join(argv)}: {capsys.readouterr().err}"


def _makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


@pytest.mark.parametrize("block", SH, ids=[b.id for b in SH])
def test_shell_block_parses(block: Block, monkeypatch, capsys) -> None:
    for words, full in _commands(block.text):
        if _hexatlas_argv(words) is not None:
            for form in dict.fromkeys(map(tuple, (words, full))):
                with monkeypatch.context() as patch:
                    _parse(_hexatlas_argv(list(form)), patch, capsys)
        elif words[0] == "make":
            assert set(words[1:]) <= _makefile_targets(), f"{block.id}: {shlex.join(words)}: no such target"
        elif words[0] == "python" and words[1:2] == ["-c"]:
            compile(words[2], f"{block.id} python -c", "exec")
        elif words[0] == "python" and words[1:2] == ["-m"]:
            assert importlib.util.find_spec(words[2]) is not None, f"{block.id}: no module {words[2]}"


# --------------------------------------------------------------------------------- Python blocks
def _submodule(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package
        return False


def _check_imports(tree: ast.AST, where: str) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            module, names = node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            module, names = None, [a.name for a in node.names]
        else:
            continue
        for name in names if module is None else [module]:
            try:
                mod = importlib.import_module(name)
            except ModuleNotFoundError as exc:  # a missing optional dependency, not a wrong name
                if exc.name and exc.name.split(".")[0] == name.split(".")[0]:
                    raise AssertionError(f"{where}: import {name}: no such module") from None
                continue
            if module is not None:
                absent = [n for n in names if not hasattr(mod, n) and not _submodule(f"{module}.{n}")]
                assert absent == [], f"{where}: from {module} import {', '.join(absent)}: not there"


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_compiles(block: Block) -> None:
    code = compile(block.text, block.id, "exec")
    assert code is not None
    _check_imports(ast.parse(block.text), block.id)


# ------------------------------------------------------------------- running against a small atlas
@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    """A folder holding ``atlas`` (toy encoder, resolutions 0-3, global: 48,008 cells, land flags
    and the exported encoder) and ``stations.csv`` / ``stations.parquet`` (a few places)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pytest.importorskip("torch", reason="building the docs' atlas needs the builder (hexatlas[build])")
    from builder.build import build

    root = tmp_path_factory.mktemp("docs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEXATLAS_CACHE", str(root / "cache"))
        build("tests.data.toy_encoder:load", resolutions="0-3", output=root / "atlas", device="cpu",
              progress=False)
    names, lat, lon = zip(*PLACES)
    points = pa.table({"name": list(names), "lat": list(lat), "lon": list(lon)})
    pq.write_table(points, root / "stations.parquet")
    (root / "stations.csv").write_text("name,lat,lon\n" + "".join(f"{n},{a},{o}\n" for n, a, o in PLACES))
    return root


@pytest.fixture
def in_docs_dir(docs_dir, monkeypatch):
    """Inside ``docs_dir``; the PNG map is not drawn (seconds of matplotlib, drawn by
    tests/query/test_mapping.py): its calls are bound to ``render_png``'s real signature."""
    import query.mapping

    signature = inspect.signature(query.mapping.render_png)

    def render_png(*args, **kwargs):
        return Path(signature.bind(*args, **kwargs).arguments["output"])

    monkeypatch.setattr(query.mapping, "render_png", render_png)
    monkeypatch.chdir(docs_dir)
    monkeypatch.setenv("HEXATLAS_CACHE", str(docs_dir / "cache"))
    return docs_dir


def test_shell_examples_run(in_docs_dir, capsys) -> None:
    from catalog.cli import main

    ran = []
    for block in SH:
        for bare, _ in _commands(block.text):
            argv = _hexatlas_argv(bare)
            if argv is None or argv[0] not in READ_ONLY or argv[1:2] != ["atlas"] or argv in ran:
                continue
            status = main(argv)
            out = capsys.readouterr()
            assert status == 0, f"{block.id}: hexatlas {shlex.join(argv)} exited {status}: {out.err}"
            ran.append(argv)
    commands = {a[0] for a in ran}
    assert READ_ONLY <= commands, f"no example ran {sorted(READ_ONLY - commands)}"


def test_server_examples_answer(in_docs_dir) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import query
    from query.server import create_app

    app = create_app(query.open("atlas"))
    client = TestClient(app)
    sent = 0
    for block in SH:
        for words, _ in _commands(block.text):
            if words[0] != "curl":
                continue
            url = next(w for w in words if w.startswith(SERVER))
            method = words[words.index("-X") + 1] if "-X" in words else "GET"
            body = words[words.index("-d") + 1] if "-d" in words else None
            answer = client.request(method, url.removeprefix(SERVER), content=body,
                                    headers={"content-type": "application/json"} if body else None)
            assert answer.status_code == 200, f"{block.id}: {shlex.join(words)}: {answer.text}"
            sent += 1
    assert sent >= 2

    routes = {(m, r.path) for r in app.routes for m in getattr(r, "methods", ())}
    table = (ROOT / "docs" / "server.md").read_text()
    rows = re.findall(r"^\| `(GET|POST) (/[^`?\s]*)", table, flags=re.M)
    assert len(rows) >= 6
    unknown = [f"{m} {p}" for m, p in rows if (m, p) not in routes]
    assert unknown == [], "endpoints in docs/server.md's table that the app does not serve"


@pytest.mark.parametrize("block", [b for b in PYTHON if b.run], ids=[b.id for b in PYTHON if b.run])
def test_python_example_runs(block: Block, in_docs_dir) -> None:
    names, lat, lon = zip(*PLACES)
    namespace = {"__name__": "__docs__", "lat": np.array(lat), "lon": np.array(lon)}
    exec(compile(block.text, block.id, "exec"), namespace)  # noqa: S102 - the docs' own examples


def test_some_examples_run() -> None:
    """The run mark is in use: the README's tour and the Python and SQL pages' examples run."""
    marked = {b.page.name for b in PYTHON if b.run}
    assert {"README.md", "python.md", "sql.md"} <= marked, json.dumps(sorted(marked))
