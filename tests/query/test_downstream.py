"""The air-temperature example runs end to end on a small GeoCLIP atlas."""

from __future__ import annotations

import numpy as np
import pytest

from examples.air_temperature import STATIONS, r2_scores

pytest.importorskip("sklearn")


@pytest.mark.skipif(not STATIONS.is_file(), reason="../shared/data/air_temp_stations.csv is not beside the project")
def test_r2_of_exact_and_atlas_embeddings(tmp_path) -> None:
    pytest.importorskip("global_land_mask")
    from builder.build import build

    build("geoclip", resolutions="3", output=tmp_path, land_only=True, device="cpu", progress=False)
    scores = r2_scores(tmp_path, model="geoclip", res=3)
    assert set(scores) == {"exact", "atlas", "atlas, interpolated"}
    assert all(np.isfinite(v) for v in scores.values())
    # GeoCLIP locates climate well; a coarse res-3 atlas is worse than exact but still informative
    assert scores["exact"] > 0.8 and 0.5 < scores["atlas"] <= scores["exact"] + 0.02
