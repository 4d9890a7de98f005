"""Fuzzing ``hexatlas serve`` from its own OpenAPI description (Schemathesis), on loopback.

The server is the real command (``python -m catalog.cli serve``) in its own process, over
one dataset so that generated requests may leave ``model`` out and still reach the atlas.
Schemathesis generates valid and invalid requests for every operation in ``/openapi.json``;
each answer must hold to:

- no 5xx, for any input;
- the status code, content type and body schema it declares;
- a 4xx body is JSON ``{"detail": str, "error": str}``, at most ``MAX_ERROR_BYTES``, and
  never holds the request body, nor any string of the request longer than ``ECHO_CHARS``;
- a 2xx body is no larger than the bound of its endpoint (:func:`size_bound`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from urllib.parse import parse_qsl, urlsplit

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.query._server import free_port, wait_for_health

MODEL = "satclip-vit16-l10"
DIM = 256
MAX_ERROR_BYTES = 1024
ECHO_CHARS = 64  # the longest user-given string (a model name) an error may quote


def size_bound(method: str, path: str, query: dict[str, str], body: object) -> int:
    """The largest 2xx body, in bytes, a request may get.

    A float32 is written by orjson in at most 15 characters (``-1.1754944e-38``) plus a
    comma; a Python float (an echoed lat/lon) in at most 24. So a lookup answer is at most
    ``512 + points * (64 + 16 * dim)`` bytes, a similar-place answer ``512 + k * 160``, a
    map layer ``512 + cells * 32`` (at most 300,000 cells), and health/info 64 KiB.
    """
    if path == "/v1/lookup":
        points = len(body["points"]) if method == "POST" else 1
        return 512 + points * (64 + 16 * DIM)
    if path == "/v1/similar":
        return 512 + int(query.get("k", 10)) * 160
    if path == "/v1/map":
        return 512 + (2 + 120 * 7**2) * 32  # the finest resolution of the test atlas
    return 64 << 10


def strings(value: object):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def short_errors_without_echo(ctx, response, case) -> None:
    """A 4xx says what is wrong in a short JSON body and does not repeat the request."""
    if not 400 <= response.status_code < 500:
        return
    text = response.content
    assert len(text) <= MAX_ERROR_BYTES, f"{len(text)}-byte error body: {text[:200]!r}"
    doc = json.loads(text)
    assert isinstance(doc.get("detail"), str) and doc["detail"], f"no detail: {text!r}"
    assert isinstance(doc.get("error"), str), f"no error kind: {text!r}"
    sent = response.request.body or b""
    if isinstance(sent, str):
        sent = sent.encode()
    if len(sent) > ECHO_CHARS:
        assert sent not in text, "the error repeats the request body"
    query = [v for _, v in parse_qsl(urlsplit(response.request.url).query)]
    body = None
    try:
        body = json.loads(sent) if sent else None
    except ValueError:
        pass
    for value in [*strings(body), *query]:
        if len(value) > ECHO_CHARS:
            assert value not in text.decode("utf-8", "replace"), f"the error echoes {value[:40]!r}..."


def bounded_size(ctx, response, case) -> None:
    """A 2xx answer stays under its endpoint's bound."""
    if not 200 <= response.status_code < 300:
        return
    split = urlsplit(response.request.url)
    body = json.loads(response.request.body) if response.request.body else None
    bound = size_bound(case.method.upper(), case.operation.path, dict(parse_qsl(split.query)), body)
    assert len(response.content) <= bound, f"{len(response.content)} bytes, over the bound {bound}"


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
EXTRA = [short_errors_without_echo, bounded_size]


@pytest.fixture(scope="module")
def served(atlas_dir):
    """``hexatlas serve`` on one dataset, on a free loopback port, in its own process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "catalog.cli", "serve", str(atlas_dir[0] / MODEL),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, proc, timeout=60)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err  # an exception that escaped a handler is a bug even when answered


OPERATIONS = [("GET", "/v1/health"), ("GET", "/v1/info"), ("GET", "/v1/lookup"), ("POST", "/v1/lookup"),
              ("GET", "/v1/similar"), ("GET", "/v1/map")]
# Negative requests need a parameter or body to break; health and info take none.
CASES = [(m, p, mode) for m, p in OPERATIONS for mode in ("positive", "negative")
         if mode == "positive" or p not in ("/v1/health", "/v1/info")]


@pytest.fixture(scope="module")
def api(served):
    return schemathesis.openapi.from_url(f"{served}/openapi.json")


def test_every_operation_is_fuzzed(api) -> None:
    declared = {(op.ok().method.upper(), op.ok().path) for op in api.get_all_operations()}
    assert declared == set(OPERATIONS)


FUZZ = {"deadline": None, "suppress_health_check": list(HealthCheck), "database": None,
        "phases": [Phase.explicit, Phase.generate, Phase.target, Phase.shrink]}
SEEN: dict[str, int] = {}  # requests sent per operation and mode, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if SEEN:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(SEEN.items()))
        print(f"\nfuzzed {sum(SEEN.values())} requests: {counts}")


def _fuzz(api, method: str, path: str, mode: str, data) -> None:
    from schemathesis import GenerationMode

    strategy = api[path][method].as_strategy(generation_mode=GenerationMode(mode))
    case = data.draw(strategy, label="case")
    response = case.call(timeout=30)
    case.validate_response(response, checks=CHECKS, additional_checks=EXTRA)
    SEEN[f"{method} {path} {mode}"] = SEEN.get(f"{method} {path} {mode}", 0) + 1


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
@settings(max_examples=50, derandomize=True, **FUZZ)
@given(data=st.data())
def test_fuzz_api(api, method, path, mode, data) -> None:
    _fuzz(api, method, path, mode, data)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), CASES)
@settings(max_examples=1000, **FUZZ)
@given(data=st.data())
def test_fuzz_api_long(api, method, path, mode, data) -> None:
    _fuzz(api, method, path, mode, data)


# What the fuzzing found, kept as plain regression tests (in-process, no socket needed).
@pytest.fixture(scope="module")
def client(atlas_dir):
    from fastapi.testclient import TestClient

    from query.server import create_app

    return TestClient(create_app(atlas_dir[0] / MODEL), raise_server_exceptions=False)


def test_a_422_names_the_field_and_never_repeats_the_body(client) -> None:
    points = [{"lat": 1.0, "lon": 2.0}] * 3000 + [{"lat": "north", "lon": 2.0}]
    body = json.dumps({"points": points, "secret-" + "x" * 500: 1})
    answer = client.post("/v1/lookup", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422 and len(answer.content) <= MAX_ERROR_BYTES
    detail = answer.json()["detail"]
    assert "body.points.3000.lat: Input should be a valid number" in detail
    assert "Extra inputs are not permitted" in detail and "x" * 100 not in detail
    assert "north" not in answer.text and "input" not in answer.json()  # FastAPI's default echoes both
    for text, words in [("nope{", "not valid JSON"),
                        ('{"points": [{"lat": true, "lon": 1}]}', "points.0.lat"),
                        ('{"points": [{"lat": "1.5", "lon": 1}]}', "valid number"),  # no lax coercion
                        ('{"points": [{"lat": 1, "lon": 1}], "res": 16}', "res: Input should be less than")]:
        answer = client.post("/v1/lookup", content=text, headers={"content-type": "application/json"})
        assert answer.status_code == 422 and words in answer.json()["detail"], (text, answer.text)


def test_an_unreadable_body_is_a_400_that_says_so(client) -> None:
    answer = client.post("/v1/lookup", content=b"O\xff\xfe", headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert answer.json() == {"detail": "There was an error parsing the body", "error": "Bad Request"}


@pytest.mark.parametrize("cell", ["", "0", "-1", "ffffffffffffffffffff", "8009fffffffffff0", "zz"])
def test_similar_refuses_what_is_no_h3_cell(client, cell) -> None:
    answer = client.get("/v1/similar", params={"cell": cell})
    assert answer.status_code == 400 and "is not an H3 cell" in answer.json()["detail"], answer.text


def test_a_batch_with_no_valid_point_interpolates_to_nulls(client) -> None:
    body = {"points": [{"lat": 1e308, "lon": 0.5}, {"lat": 95.0, "lon": 0.0}], "interpolate": True,
            "on_invalid": "null"}
    answer = client.post("/v1/lookup", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"] == [{"cell": None, "embedding": None}] * 2


def test_a_repeated_parameter_is_refused_not_guessed(client) -> None:
    answer = client.get("/v1/lookup?lat=1&lat=2&lon=3")
    assert answer.status_code == 422 and answer.json()["detail"] == "query.lat: given 2 times; give it once"
    assert client.get("/v1/lookup?lat=1&lon=3&unused=1&unused=2").status_code == 200
    from query.server import _QUERY_NAMES

    spec = client.get("/openapi.json").json()
    declared = {p["name"] for ops in spec["paths"].values() for op in ops.values()
                for p in op.get("parameters", [])}
    assert declared == _QUERY_NAMES  # every parameter the API reads is guarded


def test_distances_beyond_half_the_earth_are_refused(client) -> None:
    answer = client.get("/v1/similar", params={"lat": 1, "lon": 2, "exclude_within_km": 25_000})
    assert answer.status_code == 422 and "query.exclude_within_km" in answer.json()["detail"]
    infinite = client.get("/v1/similar", params={"lat": 1, "lon": 2, "exclude_within_km": "inf"})
    assert infinite.status_code == 422


def test_the_largest_answers_stay_within_their_bounds(client) -> None:
    """The worst cases the limits allow: max_points points, k = max_k, the finest map layer."""
    from query.server import Limits

    limits = Limits()
    points = [{"lat": -89.123456789 + i * 0.0178, "lon": -179.987654321 + i * 0.036}
              for i in range(limits.max_points)]
    body = {"points": points}
    answer = client.post("/v1/lookup", json=body)
    assert answer.status_code == 200 and len(answer.json()["results"]) == limits.max_points
    assert len(answer.content) <= size_bound("POST", "/v1/lookup", {}, body)
    params = {"lat": 1.0, "lon": 2.0, "k": limits.max_k}
    answer = client.get("/v1/similar", params=params)
    assert answer.status_code == 200 and len(answer.json()["results"]) == limits.max_k
    assert len(answer.content) <= size_bound("GET", "/v1/similar", {"k": str(limits.max_k)}, None)
    answer = client.get("/v1/map", params={"res": 2})
    assert answer.status_code == 200 and len(answer.content) <= size_bound("GET", "/v1/map", {}, None)
    over = client.post("/v1/lookup", json={"points": points + points[:1]})
    assert over.status_code == 400 and len(over.content) <= MAX_ERROR_BYTES and "limit is 10,000" in over.text
