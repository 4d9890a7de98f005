"""``hexatlas serve``: the HTTP API against the Python API, its bounds and its errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import h3
import httpx
import numpy as np
import pytest

import query
from query import server
from query.server import Limits, create_app
from tests.query._server import free_port, running, wait_for_health

MODEL = "satclip-vit16-l10"


@pytest.fixture(scope="module")
def atlas(atlas_dir):
    return query.open(atlas_dir[0])


@pytest.fixture(scope="module")
def client(atlas):
    from fastapi.testclient import TestClient

    return TestClient(create_app(atlas))


def test_health_info_and_openapi(client, atlas) -> None:
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["models"] == atlas.models
    info = client.get("/v1/info").json()
    assert set(info) == set(atlas.models)
    assert "path" not in info[MODEL]  # the server's file system stays private
    assert info[MODEL]["resolutions"]["2"]["cells"] == 2 + 120 * 7**2
    fidelity = info[MODEL]["resolutions"]["2"]["fidelity"]  # measured by the build, per resolution
    assert fidelity == atlas.info()[MODEL]["resolutions"]["2"]["fidelity"] and fidelity["points"] == 2000
    assert 0 < fidelity["interpolated"]["p05_cosine"] <= fidelity["interpolated"]["mean_cosine"] <= 1
    spec = client.get("/openapi.json").json()
    assert {"/v1/health", "/v1/info", "/v1/lookup", "/v1/similar", "/v1/map"} <= set(spec["paths"])
    assert {"get", "post"} <= set(spec["paths"]["/v1/lookup"])
    assert "sql" not in json.dumps(spec["paths"]).lower()  # no SQL over HTTP


def test_lookup_one_and_many_match_the_python_api(client, atlas) -> None:
    lat, lon = 48.85, 2.35
    one = client.get("/v1/lookup", params={"lat": lat, "lon": lon, "model": MODEL, "res": 2}).json()
    assert one["cell"] == h3.latlng_to_cell(lat, lon, 2) and one["res"] == 2 and one["model"] == MODEL
    np.testing.assert_array_equal(np.float32(one["embedding"]), atlas.lookup([lat], [lon], res=2, model=MODEL)[0])

    rng = np.random.default_rng(3)
    pts = np.column_stack([rng.uniform(-80, 80, 50), rng.uniform(-180, 180, 50)])
    body = {"points": [{"lat": a, "lon": b} for a, b in pts] + [{"lat": 95.0, "lon": 0.0}],
            "model": MODEL, "interpolate": True, "on_invalid": "null"}
    many = client.post("/v1/lookup", json=body).json()
    assert many["res"] == 2 and len(many["results"]) == 51
    assert many["results"][-1] == {"cell": None, "embedding": None}
    got = np.float32([r["embedding"] for r in many["results"][:-1]])
    np.testing.assert_array_equal(got, atlas.lookup(pts[:, 0], pts[:, 1], model=MODEL, interpolate=True))
    assert [r["cell"] for r in many["results"][:-1]] == [h3.latlng_to_cell(a, b, 2) for a, b in pts]


@pytest.mark.parametrize(("params", "status", "words"), [
    ({"lat": 91, "lon": 0}, 400, "out of range"),
    ({"lat": "nan", "lon": 0}, 400, "NaN"),
    ({"lat": "north", "lon": 0}, 422, "lat"),
    ({"lon": 0}, 422, "lat"),
    ({"lat": 0, "lon": 0, "res": 7}, 404, "resolution 7"),
    ({"lat": 0, "lon": 0, "model": "nope"}, 404, "'nope'"),
    ({"lat": 0, "lon": 0, "res": 2}, 404, "several models"),  # two models: say which
])
def test_lookup_errors_say_what_is_wrong(client, params, status, words) -> None:
    params = {"model": MODEL, **params} if "several" not in words else params
    answer = client.get("/v1/lookup", params=params)
    assert answer.status_code == status
    assert words in json.dumps(answer.json()["detail"])


def test_batches_and_bodies_are_bounded(atlas) -> None:
    from fastapi.testclient import TestClient

    small = TestClient(create_app(atlas, limits=Limits(max_points=5, max_body_bytes=2000)))
    five = {"points": [{"lat": 1.0, "lon": 1.0}] * 5, "model": MODEL}
    assert small.post("/v1/lookup", json=five).status_code == 200
    six = small.post("/v1/lookup", json={**five, "points": five["points"] * 2})
    assert six.status_code == 400 and "limit is 5" in six.json()["detail"]
    big = small.post("/v1/lookup", content=b" " * 5000, headers={"content-type": "application/json"})
    assert big.status_code == 413 and "2000 bytes" in big.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while the body streams
        for _ in range(10):
            yield b" " * 500

    streamed = small.post("/v1/lookup", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    extra = small.post("/v1/lookup", json={**five, "sql": "DROP TABLE x"})
    assert extra.status_code == 422 and "sql" in json.dumps(extra.json()["detail"])
    with pytest.raises(ValueError, match="max_points"):
        Limits(max_points=0)


def test_similar_matches_the_python_api(client, atlas) -> None:
    got = client.get("/v1/similar", params={"lat": 10, "lon": 20, "k": 5, "model": MODEL,
                                            "exclude_within_km": 500, "bbox": "-180,-60,180,60"}).json()
    want = atlas.similar(lat=10, lon=20, k=5, model=MODEL, exclude_within_km=500, bbox=(-180, -60, 180, 60))
    assert [r["cell"] for r in got["results"]] == [h3.int_to_str(c) for c in want.column("cell").to_pylist()]
    np.testing.assert_allclose([r["score"] for r in got["results"]], want.column("score").to_numpy(), rtol=1e-6)
    by_cell = client.get("/v1/similar", params={"cell": got["results"][0]["cell"], "k": 1, "model": MODEL}).json()
    assert by_cell["results"][0]["cell"] == got["results"][0]["cell"]

    bad = {"k": 0}, {"k": 5000}, {"bbox": "1,2"}, {"cell": "zz"}, {"exclude_within_km": -1}
    answers = [client.get("/v1/similar", params={"lat": 10, "lon": 20, "model": MODEL, **b}) for b in bad[:3]]
    answers.append(client.get("/v1/similar", params={"cell": "zz", "model": MODEL}))
    answers.append(client.get("/v1/similar", params={"lat": 1, "lon": 2, "exclude_within_km": -1, "model": MODEL}))
    assert [a.status_code for a in answers] == [422, 422, 400, 400, 422]
    assert "bbox" in answers[2].json()["detail"] and "H3 cell" in answers[3].json()["detail"]


def test_map_layer_colours_every_cell(client, atlas, monkeypatch) -> None:
    data = client.get("/v1/map", params={"res": 2, "model": MODEL}).json()
    cells = np.asarray(atlas._data(MODEL, 2).scan()[0])
    assert data["cells"] == [h3.int_to_str(c) for c in cells.tolist()]
    colours = np.asarray(data["colors"]).reshape(-1, 3)
    assert colours.shape == (len(cells), 3) and colours.min() >= 0 and colours.max() <= 255
    assert len(np.unique(colours, axis=0)) > len(cells) // 2  # a picture, not a flat fill
    assert 0 < sum(data["explained_variance"]) <= 1

    from fastapi.testclient import TestClient

    import query.mapping

    monkeypatch.setattr(query.mapping, "MAX_MAP_CELLS", 1000)
    too_big = TestClient(create_app(atlas)).get("/v1/map", params={"res": 2, "model": MODEL})
    assert too_big.status_code == 400 and "coarser ones: 0, 1" in too_big.json()["detail"]


def test_page_and_static_files(client, monkeypatch, tmp_path) -> None:
    assert client.get("/static/../server.py").status_code == 404
    assert client.get("/static/secrets.txt").status_code == 404
    assert client.get("/static/app.js").status_code == 200
    monkeypatch.setattr(server, "WEB_DIR", tmp_path)  # no front-end packages installed
    page = client.get("/")
    assert page.status_code == 503 and "npm ci" in page.text
    assert client.get("/v1/health").json()["map_page"] is False


def test_many_concurrent_readers_on_a_real_socket(atlas) -> None:
    rng = np.random.default_rng(5)
    pts = np.column_stack([rng.uniform(-80, 80, 64), rng.uniform(-180, 180, 64)])
    want = atlas.lookup(pts[:, 0], pts[:, 1], model=MODEL)
    with running(create_app(atlas)) as url, httpx.Client(base_url=url, timeout=30) as http:
        def one(i: int) -> np.ndarray:
            answer = http.get("/v1/lookup", params={"lat": pts[i, 0], "lon": pts[i, 1], "model": MODEL})
            answer.raise_for_status()
            return np.float32(answer.json()["embedding"])

        with ThreadPoolExecutor(16) as pool:
            got = np.stack(list(pool.map(one, range(64))))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("workers", [1, 2])
def test_cli_serves_on_loopback_until_interrupted(atlas_dir, workers) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "catalog.cli", "serve", str(atlas_dir[0]), "--port", str(port),
                             "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        health = wait_for_health(f"http://127.0.0.1:{port}", proc, timeout=60)
        assert health["models"] == sorted(p.name for p in atlas_dir[0].iterdir() if p.is_dir())  # not atlas.json
        with ThreadPoolExecutor(8) as pool:  # every worker answers the same
            answers = list(pool.map(lambda _: httpx.get(f"http://127.0.0.1:{port}/v1/lookup", timeout=30, params={
                "lat": 10, "lon": 10, "model": MODEL}).json()["embedding"], range(32)))
        assert all(a == answers[0] for a in answers)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in err


def test_cli_refuses_bad_arguments(atlas_dir, tmp_path, capsys) -> None:
    from catalog.cli import main

    assert main(["serve", str(atlas_dir[0]), "--port", "70000"]) == 2
    assert "--port must be 1..65535" in capsys.readouterr().err
    assert main(["serve", str(atlas_dir[0]), "--workers", "0"]) == 2
    assert "--workers must be 1..64" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no atlas" in capsys.readouterr().err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(atlas_dir[0]), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "serving" not in err
