"""A process answering lookups in a loop while the atlas under it may be rebuilt, for
tests/builder/test_kill.py.

``python -m tests.data.lookup_loop ATLAS REFERENCE_A REFERENCE_B STOP_FILE REPORT SEED``:
until ``STOP_FILE`` exists, look up a random set of cell centres at a random resolution,
sometimes on an Atlas opened before (reopened after an :class:`AtlasChangedError`, and
now and then anyway),
sometimes on one opened just now, and classify each answer: equal to what ``REFERENCE_A``
answers, to what ``REFERENCE_B`` answers, or neither (a mix). Every other error is counted
by type and message. The counts go to ``REPORT`` (JSON) at the end.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import query
from catalog.cells import cells_to_latlng
from catalog.errors import AtlasChangedError


def main(atlas: str, ref_a: str, ref_b: str, stop: str, report: str, seed: str) -> None:
    import h3.api.numpy_int as h3i

    rng = random.Random(int(seed))
    refs = {"a": query.open(ref_a), "b": query.open(ref_b)}
    centres = {}
    for res in (0, 1, 2):
        cells = np.sort(np.concatenate([h3i.cell_to_children(c, res) for c in h3i.get_res0_cells()])).astype(np.uint64)
        centres[res] = cells_to_latlng(cells)
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    held = None
    while not Path(stop).exists():
        res = rng.choice((0, 1, 2))
        lat, lon = centres[res]
        pick = np.array(sorted(rng.sample(range(len(lat)), min(len(lat), rng.choice((1, 40, 400))))))
        fresh = rng.random() < 0.5
        if rng.random() < 0.05:
            held = None  # a new long-lived reader, whose parts are opened as its lookups need them
        try:
            if held is None:
                held = query.open(atlas)
            reader = query.open(atlas) if fresh else held
            got = reader.lookup(lat[pick], lon[pick], res=res)
        except AtlasChangedError:
            counts["changed"] += 1
            held = None  # the error says what to do: open it again
            continue
        except Exception as exc:  # noqa: BLE001 - anything else is what the test is looking for
            errors[f"{type(exc).__name__}: {exc}"[:300]] += 1
            continue
        kind = [name for name, ref in refs.items() if np.array_equal(got, ref.lookup(lat[pick], lon[pick], res=res))]
        counts[kind[0] if kind else "mix"] += 1
        time.sleep(0.002)
    Path(report).write_text(json.dumps({"answers": counts, "errors": errors}))


if __name__ == "__main__":
    main(*sys.argv[1:])
