"""catalog: coordinate validation, point tables, atomic writes, provenance, errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import catalog
from catalog.coords import as_coordinates, invalid_mask
from catalog.errors import (
    HexatlasError,
    InputFileError,
    InvalidCoordinateError,
    UnknownColumnError,
    UnknownEncoderError,
)
from catalog.provenance import Provenance, sha256_file
from catalog.tables import (
    atomic_path,
    coordinate_columns,
    embedding_array,
    embedding_matrix,
    read_points,
    write_parquet,
)


def test_errors_are_also_builtin_errors() -> None:
    assert issubclass(InvalidCoordinateError, ValueError) and issubclass(InvalidCoordinateError, HexatlasError)
    assert issubclass(UnknownEncoderError, LookupError) and issubclass(InputFileError, OSError)
    assert set(catalog.__all__) <= set(dir(catalog))


def test_invalid_mask_flags_nan_inf_and_range() -> None:
    lat = np.array([0, 90, -90.0001, np.nan, 10, np.inf, 45])
    lon = np.array([0, 180, 0, 0, -180.5, 0, -180])
    assert invalid_mask(lat, lon).tolist() == [False, False, True, True, True, True, False]


def test_as_coordinates_scalars_lists_and_errors() -> None:
    lat, lon = as_coordinates(lat=10, lon=[20])
    assert lat.dtype == np.float64 and lat.shape == (1,) and lon.tolist() == [20.0]
    ro = np.array([1.0, 2.0])
    ro.flags.writeable = False
    assert as_coordinates(lat=ro, lon=ro)[0].flags.writeable
    with pytest.raises(InvalidCoordinateError, match=r"2 of 3 coordinates.*index 1: lat=nan"):
        as_coordinates(lat=[0, np.nan, 100], lon=[0, 0, 0])
    with pytest.raises(InvalidCoordinateError, match="1-D"):
        as_coordinates(lat=[[1.0]], lon=[[1.0]])
    with pytest.raises(InvalidCoordinateError, match="numbers in degrees"):
        as_coordinates(lat=["north"], lon=[0])
    lat, _ = as_coordinates(lat=[np.nan], lon=[0], allow_invalid=True)
    assert np.isnan(lat[0])


def test_read_points_and_coordinate_columns(tmp_path) -> None:
    (tmp_path / "p.csv").write_text("id,LAT,Lon\n1,10.5,20\n2,,30\n")
    table = read_points(tmp_path / "p.csv")
    assert table.num_rows == 2
    with pytest.raises(InvalidCoordinateError, match="index 1"):
        coordinate_columns(table)
    lat, lon = coordinate_columns(table, allow_invalid=True)
    assert lat[0] == 10.5 and np.isnan(lat[1]) and lon.tolist() == [20.0, 30.0]
    with pytest.raises(UnknownColumnError, match=r"no longitude column 'lng'.*'id', 'LAT', 'Lon'"):
        coordinate_columns(table, lon_col="lng")
    with pytest.raises(InputFileError, match="expected a .csv or .parquet"):
        read_points(tmp_path / "p.xlsx")
    with pytest.raises(InputFileError, match="does not exist"):
        read_points(tmp_path / "missing.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputFileError, match="cannot read"):
        read_points(tmp_path / "bad.parquet")


def test_write_parquet_is_atomic_and_keeps_metadata(tmp_path) -> None:
    emb = np.arange(12, dtype=np.float32).reshape(3, 4)
    table = pa.table({"cell": pa.array([1, 2, 3], pa.uint64()), "embedding": embedding_array(emb)})
    write_parquet(table, tmp_path / "sub" / "t.parquet", metadata={"k": "v"})
    back = pq.read_table(tmp_path / "sub" / "t.parquet")
    assert back.schema.metadata[b"k"] == b"v"
    np.testing.assert_array_equal(np.stack(back.column("embedding").to_numpy(zero_copy_only=False)), emb)

    sliced = pa.chunked_array([embedding_array(emb).slice(1), embedding_array(emb[:1])])
    np.testing.assert_array_equal(embedding_matrix(sliced), np.concatenate([emb[1:], emb[:1]]))

    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "sub"]


def test_provenance_round_trip_and_validation(tmp_path) -> None:
    (tmp_path / "w").write_bytes(b"abc")
    digest = sha256_file(tmp_path / "w")
    assert digest == hashlib.sha256(b"abc").hexdigest()
    prov = Provenance(model="m", dim=3, source="s", revision=None, sha256=digest, coordinate_order="lon,lat",
                      licence="MIT", paper="p", config={"L": 10})
    assert Provenance.from_dict({**prov.to_dict(), "future_field": 1}) == prov
    with pytest.raises(ValueError, match="coordinate_order"):
        Provenance(model="m", dim=3, source="s", revision=None, sha256="", coordinate_order="xy", licence="", paper="")


def test_a_list_of_numbers_starting_negative_is_an_options_value() -> None:
    from catalog.cli import _negative_lists

    assert _negative_lists(["similar", "atlas", "--bbox", "-10,35,30,60", "--lat", "-33.9", "-k", "5"]) == [
        "similar", "atlas", "--bbox=-10,35,30,60", "--lat", "-33.9", "-k", "5"]
    assert _negative_lists(["--region", "-1.5,48.6,2.8,49.1"]) == ["--region=-1.5,48.6,2.8,49.1"]
    assert _negative_lists(["--flag", "-v"]) == ["--flag", "-v"]  # an option stays an option


def test_remote_reads_share_one_pool_per_kind() -> None:
    import threading

    from catalog.pools import map_in_pool

    def who(x: int) -> tuple[int, threading.Thread]:
        return x * x, threading.current_thread()

    first = map_in_pool("test-pool", 4, who, range(40))
    assert [v for v, _ in first] == [x * x for x in range(40)]  # in order
    again = map_in_pool("test-pool", 4, who, range(40))
    threads = {t for _, t in first + again}
    # the same threads serve both calls and stay for the next (a pool per call would join its own)
    assert len(threads) <= 4 and all(t.is_alive() and t.name.startswith("test-pool") for t in threads)
    assert map_in_pool("test-pool", 4, who, [3]) == [(9, threading.current_thread())]  # one item: inline
    with pytest.raises(ZeroDivisionError):
        map_in_pool("test-pool", 4, lambda x: 1 // x, [1, 0])


def test_descendants_centres_lie_within_the_spread_of_their_ancestor() -> None:
    """The premise of deciding a filter by ancestors (query.atlas._Filters.of)."""
    import h3.api.numpy_int as h3i

    from catalog.cells import descendant_spread_km
    from catalog.interpolation import haversine_km

    rng = np.random.default_rng(5)
    for res in range(7):
        lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, 12))), rng.uniform(-180, 180, 12)
        cells = [h3i.latlng_to_cell(a, o, res) for a, o in zip(lat, lon)] + h3i.get_pentagons(res).tolist()[:4]
        worst = 0.0
        for cell in cells:
            centre = h3i.cell_to_latlng(cell)
            for depth in (1, 3):
                kids = h3i.cell_to_children(cell, res + depth)
                ll = np.array([h3i.cell_to_latlng(k) for k in kids[rng.choice(len(kids), min(len(kids), 400))]])
                worst = max(worst, haversine_km(ll[:, 0], ll[:, 1], *centre).max())
        assert 0.3 * descendant_spread_km(res) < worst < 0.6 * descendant_spread_km(res), res  # ~0.54 measured


def test_the_checksum_of_runs_is_zlibs_crc32() -> None:
    """``catalog.crc.crc32`` (ISA-L's where installed) gives zlib's CRC-32 for every kind of
    buffer the readers and the builder hand it: the block tables written before stay valid."""
    import zlib

    from catalog.crc import crc32

    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 4096, 256 << 10, (256 << 10) + 3):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32(data) == zlib.crc32(data)
        assert crc32(memoryview(data)) == zlib.crc32(data)
    cells = np.arange(512, dtype="<u8")
    assert crc32(cells) == zlib.crc32(cells.tobytes())


def test_without_isal_the_checksum_is_zlibs_own(monkeypatch) -> None:
    """Where ISA-L is not installed, ``catalog.crc`` falls back to zlib's function."""
    import importlib
    import sys
    import zlib

    import catalog.crc

    monkeypatch.setitem(sys.modules, "isal", None)  # import isal.isal_zlib now raises ImportError
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    try:
        assert importlib.reload(catalog.crc).crc32 is zlib.crc32
    finally:
        monkeypatch.undo()
        importlib.reload(catalog.crc)
