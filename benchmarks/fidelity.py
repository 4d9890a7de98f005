"""Fidelity by resolution (README "Which resolution do I need?"): not a timing benchmark.

For each encoder and resolution: what a land-only atlas would return at seeded random land
points (:func:`builder.fidelity.predict`: the encoder at the cell centres the atlas would
hold, stored as float16; no atlas is built), against the encoder at the points: mean and
5th-percentile cosine, cell and interpolated lookup. For GeoCLIP also the downstream air
temperature R^2 (ridge, 20% of the 3,076 stations held out, as examples/air_temperature.py)
with exact, cell and interpolated features. SatCLIP rows use seeded random weights in the
released layout (the trained weights are not on this machine): their smoothness follows L,
not the training.

    python -m benchmarks.fidelity [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._common import Row

POINTS = 3000


def _air_temperature(encoder, resolutions: list[int]) -> dict[int | str, dict[str, float]]:
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from builder.fidelity import would_return
    from catalog.cells import latlng_to_cells
    from catalog.interpolation import interpolate
    from catalog.tables import coordinate_columns, read_points
    from examples.air_temperature import STATIONS

    table = read_points(STATIONS)
    lat, lon = coordinate_columns(table)
    target = table.column("meanT").to_numpy()
    train, test = train_test_split(np.arange(len(target)), test_size=0.2, random_state=0)

    def r2(x: np.ndarray) -> float:
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        reg.fit(x[train], target[train])
        return float(reg.score(x[test], target[test]))

    out: dict[int | str, dict[str, float]] = {"exact": {"exact": r2(encoder.encode(lat=lat, lon=lon))}}
    for res in resolutions:
        vectors = would_return(encoder, res)  # every cell held: the stations' own cells
        cells = latlng_to_cells(lat, lon, res)
        out[res] = {"cell": r2(vectors(cells)), "interpolated": r2(interpolate(vectors, lat, lon, cells))}
    return out


def measure_table(quick: bool = False) -> tuple[list[dict], dict]:
    """Rows of (model, res, cell mean, cell p05, interpolated mean, interpolated p05) and GeoCLIP's R^2."""
    from builder.encoders import load_encoder
    from builder.fidelity import predict, sample_points
    from tests.data.satclip_checkpoint import make_checkpoint

    points = 500 if quick else POINTS
    lat, lon = sample_points(points, seed=1, land_only=True)
    rows = []
    geoclip = load_encoder("geoclip", device="cpu")
    cases = [("GeoCLIP (trained weights)", geoclip, range(3, 7 if quick else 9))]
    with tempfile.TemporaryDirectory() as tmp:
        for legendre in (10, 40):
            path = make_checkpoint(Path(tmp) / f"l{legendre}.ckpt", legendre_polys=legendre)
            enc = load_encoder(f"satclip-vit16-l{legendre}", checkpoint=path, device="cpu")
            cases.append((f"SatCLIP L={legendre} (random weights)", enc, range(4 if quick else 6)))
        for name, enc, resolutions in cases:
            exact = enc.encode(lat=lat, lon=lon)
            for res in resolutions:
                fid = predict(enc, res, lat, lon, exact, land_only=True)
                rows.append({"model": name, "res": res, "points": points, **{
                    f"{kind}_{k}": fid[kind][k] for kind in ("cell", "interpolated") for k in ("mean_cosine", "p05_cosine")}})
                print(rows[-1], file=sys.stderr)
    r2 = _air_temperature(geoclip, list(range(3, 7 if quick else 9)))
    return rows, r2


def markdown_table(rows: list[dict], r2: dict) -> str:
    lines = ["| model | res | cell: mean cos | cell: p05 | interpolated: mean cos | interpolated: p05 | air temp R^2 cell / interp. |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        score = r2.get(r["res"]) if r["model"].startswith("GeoCLIP") else None
        r2_text = f"{score['cell']:.3f} / {score['interpolated']:.3f}" if score else ""
        lines.append(f"| {r['model']} | {r['res']} | {r['cell_mean_cosine']:.4f} | {r['cell_p05_cosine']:.4f} | "
                     f"{r['interpolated_mean_cosine']:.4f} | {r['interpolated_p05_cosine']:.4f} | {r2_text} |")
    lines.append(f"\nAir temperature R^2 with exact GeoCLIP embeddings at the stations: {r2['exact']['exact']:.3f}")
    return "\n".join(lines)


def run(quick: bool = False) -> list[Row]:
    rows, r2 = measure_table(quick)
    out = [Row("fidelity: interpolated mean cosine to the encoder", f"{r['model']} res {r['res']}",
               r["interpolated_mean_cosine"], "", "cell lookup", r["cell_mean_cosine"]) for r in rows]
    out += [Row("air temperature R^2, GeoCLIP features (interpolated)", f"res {res}", s["interpolated"], "R^2",
                "exact embeddings", r2["exact"]["exact"]) for res, s in r2.items() if res != "exact"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(markdown_table(*measure_table(args.quick)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
