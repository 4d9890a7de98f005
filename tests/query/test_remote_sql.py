"""SQL on a remote atlas reads row groups in place through DuckDB's httpfs (HTTPS, the Hub's
layout, S3), and falls back to downloading the parts, saying so, where httpfs is missing."""

from __future__ import annotations

import logging
import shutil

import pytest

import query
from catalog.manifest import write_atlas_index
from tests.data.fault_proxy import FaultProxy
from tests.data.http_server import HUB_COMMIT, HUB_REPO, nginx

TOY = "tests.data.toy_encoder:load"
COUNTS = "SELECT res, count(*) AS n FROM embeddings GROUP BY res ORDER BY res"
JOIN = ("SELECT p.id, e.cell, e.embedding FROM pts p JOIN embeddings e "
        "ON e.res = 3 AND e.cell = h3_latlng_to_cell(p.lat, p.lon, 3) ORDER BY p.id")


def _httpfs() -> str:
    from query.sql import httpfs_extension

    found = httpfs_extension()
    if found is None:
        pytest.skip("DuckDB's httpfs extension is not installed (pip install 'hexatlas[remote-sql]')")
    return found


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    from builder.build import build

    root = tmp_path_factory.mktemp("sql-served")
    build(TOY, resolutions="0-4", output=root, device="cpu", progress=False)
    write_atlas_index(root)
    return root


@pytest.fixture(scope="module")
def server(local):
    with nginx(local) as base:
        yield base


def _points_sql(atlas: query.Atlas, text: str) -> dict:
    con = atlas.connect()
    con.execute("CREATE TABLE pts AS SELECT range AS id, 45 + (range % 50) / 10.0 AS lat, (range % 60) / 10.0 AS lon "
                "FROM range(200)")
    return con.sql(text).to_arrow_table().to_pydict()


def test_sql_over_https_reads_row_groups_in_place(local, server) -> None:
    _httpfs()
    near = query.open(local)
    with FaultProxy(server) as proxy:
        far = query.open(f"{proxy.url}/atlas")
        assert far.sql(COUNTS).to_pydict() == near.sql(COUNTS).to_pydict()
        parts = sum(p.stat().st_size for p in local.glob("toy/data/res=*/*.parquet"))
        part_bytes = sum(e[4] for e in proxy.log if ".parquet" in e[1])
        assert part_bytes < parts / 2, (part_bytes, parts)  # footers, not the parts
        assert all(e[2] for e in proxy.log if ".parquet" in e[1] and e[0] == "GET")  # ranges only
        assert _points_sql(far, JOIN) == _points_sql(near, JOIN)
    assert not (far._mirrors["toy"] / "data").exists()  # nothing downloaded


def test_a_view_join_of_clustered_points_reads_only_their_row_groups(local, server) -> None:
    """2,000 points in France fall in ~300 cells of resolution 4: the join pushes them into the
    scan as an IN list (not one min..max range) and builds its hash table on the points (the
    largest part is listed first), so it reads their row groups: ~2% of the parts, where
    DuckDB's defaults read 6% (a range) or 42% (a hash table built on the parts)."""
    _httpfs()
    import numpy as np

    rng = np.random.default_rng(1)
    points = {"id": list(range(2000)), "lat": rng.uniform(43, 50, 2000).tolist(), "lon": rng.uniform(-1, 7, 2000).tolist()}
    join = ("SELECT p.id, e.cell FROM pts p JOIN embeddings e ON e.res = 4 AND e.cell = h3_latlng_to_cell(p.lat, p.lon, 4) "
            "ORDER BY p.id")
    answers = []
    with FaultProxy(server) as proxy:
        for atlas in (query.open(local), query.open(f"{proxy.url}/atlas")):
            con = atlas.connect()
            con.execute("CREATE TABLE pts AS SELECT unnest($1) AS id, unnest($2) AS lat, unnest($3) AS lon",
                        [points["id"], points["lat"], points["lon"]])
            proxy.log.clear()
            answers.append(con.sql(join).fetchall())
        parts = sum(p.stat().st_size for p in local.glob("toy/data/res=*/*.parquet"))
        read = sum(e[4] for e in proxy.log if ".parquet" in e[1])
    assert answers[0] == answers[1] and len(answers[0]) == 2000
    assert read < 0.03 * parts, f"{read / parts:.1%} of the parts read"


def test_sql_on_the_hub_reads_the_pinned_commit(local, server, monkeypatch) -> None:
    _httpfs()
    monkeypatch.setenv("HF_ENDPOINT", server)
    far = query.open(f"hf://datasets/{HUB_REPO}@{HUB_COMMIT}")
    assert far.sql(COUNTS).to_pydict() == query.open(local).sql(COUNTS).to_pydict()
    assert all(f"/resolve/{HUB_COMMIT}/" in url for url in far._parquet_glob("toy", True))


def test_sql_on_s3_reads_in_place(local, tmp_path_factory) -> None:
    _httpfs()
    from tests.data.s3_server import BUCKET, s3_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with s3_server():
        from catalog.storage import open_store

        target = open_store(f"s3://{BUCKET}/sql/toy")
        for rel in sorted(p.relative_to(local / "toy").as_posix() for p in (local / "toy").rglob("*") if p.is_file()):
            with target.staged(rel) as tmp:
                shutil.copyfile(local / "toy" / rel, tmp)
        far = query.open(f"s3://{BUCKET}/sql/toy")
        assert far.sql(COUNTS).to_pydict() == query.open(local).sql(COUNTS).to_pydict()
        assert not (far._mirrors["toy"] / "data").exists()


def test_without_httpfs_sql_downloads_the_parts_and_says_so(local, server, monkeypatch) -> None:
    import query.sql

    monkeypatch.setattr(query.sql, "httpfs_extension", lambda: None)
    far = query.open(f"{server}/atlas")
    with pytest.warns(UserWarning, match=r"remote-sql"):
        assert far.sql(COUNTS).to_pydict() == query.open(local).sql(COUNTS).to_pydict()
    assert (far._mirrors["toy"] / "data").is_dir()
