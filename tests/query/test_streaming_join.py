"""Joins that stream (``Atlas.join_batches``, ``Atlas.join_file``, ``hexatlas join``): the same
rows as the in-memory ``Atlas.join``, written a batch at a time, and nothing read ahead."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

import query
from catalog.cli import main
from catalog.errors import InvalidArgumentError, InvalidCoordinateError
from query.streaming import batch_rows_for

MODEL = "satclip-vit16-l10"


@pytest.fixture
def atlas(atlas_dir):
    return query.open(atlas_dir[0])


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(11)
    n = 203
    return pa.table({"id": np.arange(n), "lat": np.degrees(np.arcsin(rng.uniform(-1, 1, n))),
                     "lon": rng.uniform(-180, 180, n), "tag": [f"t{i % 7}" for i in range(n)]})


def test_join_file_writes_what_join_returns_a_row_group_a_batch(atlas, points, tmp_path) -> None:
    pq.write_table(points, tmp_path / "p.parquet", row_group_size=50)
    expected = atlas.join(points, model=MODEL, land=True)
    for source in (tmp_path / "p.parquet", points, points.to_reader()):
        assert atlas.join_file(source, tmp_path / "o.parquet", model=MODEL, land=True, batch_rows=40) == points.num_rows
        meta = pq.ParquetFile(tmp_path / "o.parquet").metadata
        assert meta.num_row_groups >= math.ceil(points.num_rows / 40)
        assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 40
        assert pq.read_table(tmp_path / "o.parquet").equals(expected)
    reader = atlas.join_batches(tmp_path / "p.parquet", model=MODEL, land=True, batch_rows=64)
    assert isinstance(reader, pa.RecordBatchReader) and reader.schema == expected.schema
    assert pa.Table.from_batches(list(reader)).equals(expected)


def test_csv_in_and_out_streams_the_same_rows(atlas, points, tmp_path) -> None:
    pyarrow.csv.write_csv(points, tmp_path / "p.csv")
    atlas.join_file(tmp_path / "p.csv", tmp_path / "o.csv", model=MODEL, batch_rows=17)
    lines = (tmp_path / "o.csv").read_text().splitlines()
    assert lines[0] == "id,lat,lon,tag,cell,embedding" and len(lines) == points.num_rows + 1
    atlas.join_file(points, tmp_path / "whole.csv", model=MODEL, batch_rows=10_000)
    assert (tmp_path / "whole.csv").read_text().splitlines() == lines
    atlas.join_file(points.slice(0, 0), tmp_path / "empty.csv", model=MODEL)
    assert (tmp_path / "empty.csv").read_text().splitlines() == ["id,lat,lon,tag,cell,embedding"]


def test_nothing_is_read_ahead_of_the_batch_being_joined(atlas, points) -> None:
    def batches():
        yield from points.slice(0, 100).to_batches(max_chunksize=50)
        raise RuntimeError("the stream was read past the first batches")

    reader = atlas.join_batches(pa.RecordBatchReader.from_batches(points.schema, batches()), model=MODEL,
                                batch_rows=50)
    first = reader.read_next_batch()
    assert first.num_rows == 50 and first.schema.names[-2:] == ["cell", "embedding"]
    assert reader.read_next_batch().num_rows == 50
    with pytest.raises(RuntimeError, match="read past"):
        reader.read_next_batch()


def test_a_bad_row_in_a_later_batch_is_named_by_its_row_and_no_file_appears(atlas, points, tmp_path) -> None:
    lat = points.column("lat").to_numpy().copy()
    lat[150] = 95.0
    bad = points.set_column(1, "lat", pa.array(lat))
    with pytest.raises(InvalidCoordinateError, match="first at index 150: lat=95.0"):
        atlas.join_file(bad, tmp_path / "o.parquet", model=MODEL, batch_rows=40)
    assert list(tmp_path.iterdir()) == []
    out = atlas.join_file(bad, tmp_path / "o.parquet", model=MODEL, batch_rows=40, on_invalid="null")
    assert out == points.num_rows and pq.read_table(tmp_path / "o.parquet").column("cell").null_count == 1
    with pytest.raises(InvalidArgumentError, match="must be .parquet or .csv"):
        atlas.join_file(points, tmp_path / "o.xlsx", model=MODEL)
    with pytest.raises(InvalidArgumentError, match="already have a 'cell' column"):
        atlas.join_file(points.append_column("cell", pa.array(np.zeros(points.num_rows))), tmp_path / "o2.parquet",
                        model=MODEL)
    with pytest.raises(InvalidArgumentError, match="batch_rows must be a positive"):
        atlas.join_file(points, tmp_path / "o2.parquet", model=MODEL, batch_rows=0)


def test_cli_join_streams_with_a_progress_bar_when_asked(atlas_dir, points, tmp_path, capsys) -> None:
    pq.write_table(points, tmp_path / "p.parquet")
    root = str(atlas_dir[0])
    argv = ["join", root, "--input", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "o.parquet"),
            "--model", MODEL, "--batch-rows", "64"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "wrote 203 rows" in err and "pt/s" not in err  # stderr is not a terminal here: no bar
    assert pq.ParquetFile(tmp_path / "o.parquet").metadata.num_row_groups == 4
    assert query.open(root).join_file(points, tmp_path / "o.parquet", model=MODEL, progress=True) == 203
    assert "join: 100%" in capsys.readouterr().err
    assert main([*argv[:-2], "--no-progress", "--output", str(tmp_path / "o.xlsx")]) == 2
    assert "must be .parquet or .csv" in capsys.readouterr().err


def test_batches_take_about_64_mb() -> None:
    assert batch_rows_for(256) == 43_690 and batch_rows_for(4) == 127_100
    assert batch_rows_for(100_000) == 4096 and batch_rows_for(1) <= 1 << 20


def test_memory_does_not_follow_the_file(tmp_path) -> None:
    from catalog.tables import open_points

    rng = np.random.default_rng(2)
    n = 2_000_000
    pq.write_table(pa.table({"lat": rng.uniform(-80, 80, n), "lon": rng.uniform(-180, 180, n)}), tmp_path / "p.parquet",
                   row_group_size=200_000)
    reader, total = open_points(tmp_path / "p.parquet", batch_rows=50_000)
    allocated = [pa.total_allocated_bytes() for _ in reader]
    assert total == n and len(allocated) == n // 50_000
    # 30 batches later what the reader holds has not grown (pyarrow's pre-buffered reads kept ~1.8 MB here)
    assert allocated[-1] - allocated[10] < 200_000, allocated
