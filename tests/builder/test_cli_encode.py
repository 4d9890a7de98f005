"""``hexatlas encode`` and ``hexatlas models``: outputs, metadata and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest

from catalog.cli import main
from tests.data.satclip_checkpoint import make_checkpoint

TOY = "tests.data.toy_encoder:load"


@pytest.fixture
def points_csv(tmp_path):
    path = tmp_path / "points.csv"
    path.write_text("name,Lat,Lon\nParis,48.8566,2.3522\nLima,-12.0464,-77.0428\nSuva,-18.1416,178.4419\n")
    return path


def test_encode_csv_keeps_columns_and_adds_embedding(tmp_path, points_csv, capsys) -> None:
    out = tmp_path / "out.parquet"
    assert main(["encode", "--model", TOY, "--input", str(points_csv), "--output", str(out), "--device", "cpu"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["name", "Lat", "Lon", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert table.column("name").to_pylist() == ["Paris", "Lima", "Suva"]
    from tests.data.toy_encoder import load

    expected = load(device="cpu").encode(lat=[48.8566, -12.0464, -18.1416], lon=[2.3522, -77.0428, 178.4419])
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), expected)
    provenance = json.loads(table.schema.metadata[b"hexatlas.provenance"])
    assert provenance["model"] == "toy" and provenance["coordinate_order"] == "lat,lon"
    assert "wrote 3 4-d embeddings" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_encode_parquet_with_named_columns_and_satclip(tmp_path) -> None:
    ckpt = make_checkpoint(tmp_path / "s.ckpt", legendre_polys=10)
    rng = np.random.default_rng(0)
    src = pa.table({"y": rng.uniform(-90, 90, 500), "x": rng.uniform(-180, 180, 500), "id": np.arange(500)})
    pq.write_table(src, tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"
    argv = ["encode", "--model", "satclip-vit16-l10", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in.parquet"),
            "--lat-col", "y", "--lon-col", "x", "--output", str(out), "--device", "cpu", "--batch-size", "128"]
    assert main(argv) == 0
    table = pq.read_table(out)
    from builder.encoders import load_encoder

    expected = load_encoder("satclip-vit16-l10", checkpoint=ckpt, device="cpu").encode(
        lat=src.column("y").to_numpy(), lon=src.column("x").to_numpy())
    got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert table.column("id").to_pylist() == list(range(500))


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ("lat,lon\n10,20\n95,0\n", [], "index 1: lat=95.0"),
        ("lat,lon\n10,20\n,0\n", [], "NaN or out of range"),
        ("lat,lon\n10,200\n", [], "lon=200.0"),
        ("latitude,lon\n10,20\n", [], ("no latitude column 'lat' and no point geometry (GeoParquet or a GeoDataFrame); "
                                        "the table has 'latitude', 'lon'. Name it with --lat-col")),
        ("lat,lon\n10,20\n", ["--model", "nope"], "unknown encoder 'nope'"),
        ("lat,lon\nabc,20\n", [], "latitude column 'lat' is not numeric"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, rows, extra, message) -> None:
    src = tmp_path / "in.csv"
    src.write_text(rows)
    out = tmp_path / "out.parquet"
    code = main(["encode", "--model", TOY, "--input", str(src), "--output", str(out), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("hexatlas encode: error:")
    assert not out.exists()


def test_missing_input_bad_checkpoint_and_bad_output(tmp_path, points_csv, capsys) -> None:
    assert main(["encode", "--input", str(tmp_path / "no.csv"), "--output", str(tmp_path / "o.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err
    garbage = tmp_path / "bad.ckpt"
    garbage.write_bytes(b"\x00" * 64)
    argv = ["encode", "--model", "satclip-vit16-l10", "--checkpoint", str(garbage), "--input", str(points_csv),
            "--output", str(tmp_path / "o.parquet")]
    assert main(argv) == 2
    assert "not a readable PyTorch file" in capsys.readouterr().err
    assert main(["encode", "--model", TOY, "--input", str(points_csv), "--output", str(tmp_path / "o.csv")]) == 2
    assert "must be a .parquet file" in capsys.readouterr().err


def test_console_script_never_prints_a_traceback(tmp_path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("lat,lon\nnan,1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "catalog.cli", "encode", "--model", TOY, "--input", str(src),
         "--output", str(tmp_path / "o.parquet")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_models_lists_the_registry(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "geoclip" in out and "512" in out and "satclip-vit16-l40" in out


def test_top_level_help_and_unknown_command(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 0
    assert "encode" in capsys.readouterr().out


def test_encode_geometry_in_geometry_out(tmp_path, capsys) -> None:
    gpd = pytest.importorskip("geopandas")
    from builder.points import embed_table
    from tests.data.toy_encoder import load

    rng = np.random.default_rng(5)
    lat, lon = rng.uniform(-60, 60, 40), rng.uniform(-170, 170, 40)
    frame = gpd.GeoDataFrame({"site": np.arange(40)}, geometry=gpd.points_from_xy(lon, lat), crs=4326).to_crs(3857)
    expected = load(device="cpu").encode(lat=lat, lon=lon)
    for suffix, write in ((".parquet", frame.to_parquet), (".gpkg", frame.to_file)):
        src, out = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}.parquet"
        write(src)
        assert main(["encode", "--model", TOY, "--input", str(src), "--output", str(out), "--device", "cpu"]) == 0
        read = gpd.read_parquet(out)
        assert read.crs == frame.crs and read.geometry.geom_equals_exact(frame.geometry, 0).all()
        assert list(read.columns) == ["site", "geometry", "embedding"]
        np.testing.assert_allclose(np.stack(read["embedding"].to_numpy()), expected, atol=1e-5)
        assert json.loads(pq.read_schema(out).metadata[b"hexatlas.provenance"])["model"] == "toy"
    table = embed_table(frame, load(device="cpu"))  # a GeoDataFrame in memory
    back = gpd.GeoDataFrame.from_arrow(table)
    assert back.crs == frame.crs and back.geometry.geom_equals_exact(frame.geometry, 0).all()
    np.testing.assert_allclose(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), expected, atol=1e-5)
    polygons = gpd.GeoDataFrame(geometry=[gpd.points_from_xy([0], [0])[0].buffer(1)], crs=4326)
    polygons.to_parquet(tmp_path / "poly.parquet")
    assert main(["encode", "--model", TOY, "--input", str(tmp_path / "poly.parquet"), "--output",
                 str(tmp_path / "p.parquet"), "--device", "cpu"]) == 2
    assert "first at row 0: a Polygon, not a point" in capsys.readouterr().err
