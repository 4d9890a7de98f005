"""CUDA against CPU: an atlas built on the GPU holds what one built on the CPU does, within
the stored precision. Marked ``gpu`` (``pytest -m gpu``); skipped where torch sees no GPU."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

from builder.build import build  # noqa: E402 - after the torch check
from builder.encoders import load_encoder  # noqa: E402
from catalog.manifest import read_manifest  # noqa: E402
from catalog.tables import dequantize, embedding_matrix  # noqa: E402
from tests.data.satclip_checkpoint import make_checkpoint  # noqa: E402
from tests.data.stored_precision import tolerance  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

try:
    distribution("geoclip")
    HAVE_GEOCLIP = True
except PackageNotFoundError:
    HAVE_GEOCLIP = False

CASES = [
    pytest.param("satclip-vit16-l40", "float16", id="satclip-l40-float16"),
    pytest.param("satclip-vit16-l40", "int8", id="satclip-l40-int8"),
    pytest.param("geoclip", "float16", id="geoclip-float16",
                 marks=pytest.mark.skipif(not HAVE_GEOCLIP, reason="the geoclip wheel is not installed")),
]


@pytest.fixture(scope="module")
def satclip_l40(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "satclip-l40.ckpt", legendre_polys=40, seed=3))


def _checkpoint(model: str, satclip_l40: str) -> str | None:
    return satclip_l40 if model.startswith("satclip") else None


def _resolution(dataset, res: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells and float32 embeddings (int8 dequantised with the dataset's quantisation)."""
    table = pq.read_table(dataset / "data" / f"res={res}")
    values = embedding_matrix(table.column("embedding"))
    quantization = read_manifest(dataset)["quantization"]
    if quantization is not None:
        values = dequantize(values, np.asarray(quantization["scale"], np.float32),
                            np.asarray(quantization["offset"], np.float32))
    return table.column("cell").to_numpy(), np.asarray(values, np.float32)


@pytest.mark.parametrize(("model", "precision"), CASES)
def test_cuda_build_matches_cpu_build(tmp_path, satclip_l40, model, precision) -> None:
    checkpoint = _checkpoint(model, satclip_l40)
    built = {device: build(model, resolutions="0-2", output=tmp_path / device, checkpoint=checkpoint, device=device,
                           precision=precision, progress=False)
             for device in ("cuda", "cpu")}
    assert built["cuda"].cells == built["cpu"].cells
    gpu_q, cpu_q = (read_manifest(built[d].dataset)["quantization"] for d in ("cuda", "cpu"))
    for res in (0, 1, 2):
        gpu_cells, gpu = _resolution(built["cuda"].dataset, res)
        cpu_cells, cpu = _resolution(built["cpu"].dataset, res)
        np.testing.assert_array_equal(gpu_cells, cpu_cells)
        if precision == "int8":  # each build calibrates on its own device: one code apart at most
            step = np.maximum(gpu_q["scale"], cpu_q["scale"])
            allowed = 1.001 * step + np.abs(np.subtract(gpu_q["offset"], cpu_q["offset"])) + 1e-6
        else:
            allowed = tolerance(cpu, precision)
        worst = float((np.abs(gpu.astype(np.float64) - cpu) / allowed).max())
        assert worst <= 1.0, f"res {res}: a value {worst:.2f} times the stored precision from the CPU build's"


@pytest.mark.parametrize(("model", "precision"), CASES[::2])
def test_cuda_encode_matches_cpu(satclip_l40, model, precision) -> None:
    """The encoder alone, in float32, at random points."""
    checkpoint = _checkpoint(model, satclip_l40)
    rng = np.random.default_rng(0)
    lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, 20_000))), rng.uniform(-180, 180, 20_000)
    gpu = load_encoder(model, checkpoint=checkpoint, device="cuda").encode(lat=lat, lon=lon)
    cpu = load_encoder(model, checkpoint=checkpoint, device="cpu").encode(lat=lat, lon=lon)
    worst = float((np.abs(gpu.astype(np.float64) - cpu) / tolerance(cpu, "float32")).max())
    assert worst <= 1.0, f"a float32 value {worst:.2f} times 1e-4 of its scale from the CPU's"
