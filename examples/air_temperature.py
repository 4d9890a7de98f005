"""Downstream check: regress mean air temperature at weather stations on location embeddings.

Compares three feature sets for the same stations and the same fixed split: embeddings
computed exactly at the stations with the encoder, embeddings looked up from an atlas (the
station's cell), and atlas embeddings interpolated between the three nearest cell centres.
The atlas is useful when its R^2 stays close to the exact one.

    python examples/air_temperature.py ATLAS [--res 5] [--model geoclip]

Data: ../shared/data/air_temp_stations.csv (3,076 stations; columns Lon, Lat, meanT), from
microsoft/satclip (MIT).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

STATIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "air_temp_stations.csv"


def r2_scores(atlas_path: str | Path, *, model: str = "geoclip", res: int | None = None,
              stations: str | Path = STATIONS, seed: int = 0) -> dict[str, float]:
    """R^2 on a held-out 20% of stations for exact, atlas and interpolated-atlas embeddings."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import query
    from builder.encoders import load_encoder
    from catalog.tables import coordinate_columns, read_points

    table = read_points(stations)
    lat, lon = coordinate_columns(table)
    target = table.column("meanT").to_numpy()
    atlas = query.open(atlas_path)
    features = {
        "exact": load_encoder(model, device="cpu").encode(lat=lat, lon=lon),
        "atlas": atlas.lookup(lat, lon, res=res, model=model),
        "atlas, interpolated": atlas.lookup(lat, lon, res=res, model=model, interpolate=True),
    }
    train, test = train_test_split(np.arange(len(target)), test_size=0.2, random_state=seed)
    scores = {}
    for name, x in features.items():
        reg = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        reg.fit(x[train], target[train])
        scores[name] = float(reg.score(x[test], target[test]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("atlas")
    parser.add_argument("--model", default="geoclip")
    parser.add_argument("--res", type=int, default=None)
    args = parser.parse_args()
    for name, r2 in r2_scores(args.atlas, model=args.model, res=args.res).items():
        print(f"R^2 {name:<20} {r2:.4f}")


if __name__ == "__main__":
    main()
