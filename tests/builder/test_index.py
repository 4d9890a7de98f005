"""The FAISS index stage: normalisation, exact top-k, shard lists merged into a memory-mapped
IVF-PQ index that equals FAISS's own, and the tuned index of a build."""

from __future__ import annotations

from pathlib import Path

import faiss
import h3.api.numpy_int as h3i
import numpy as np
import pyarrow.parquet as pq
import pytest
import xarray as xr

from builder import finish, index, ivfpq, write
from builder.build import build
from builder.finish import ShardSource
from builder.grid import Shard, cell_centers, shard_cells
from builder.index import ShardLists, TopK, TrainedIndex, ivf_sample, pq_subquantizers
from builder.probes import Probes
from catalog import vector_index
from catalog.cells import cells_to_latlng, cells_to_parent
from catalog.errors import AtlasCorruptError
from catalog.manifest import file_record, read_manifest
from catalog.storage import open_store
from catalog.tables import embedding_matrix
from catalog.vector_index import ivf_lists, normalize
from query import open as open_atlas
from tests.data.recall import approximate_above, few_recall_queries
from tests.data.satclip_checkpoint import make_checkpoint

TOY = "tests.data.toy_encoder:load"


def test_normalize_into_out_keeps_the_input_and_zero_rows() -> None:
    vectors = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]], dtype=np.float16)
    out = np.full((3, 2), np.nan, dtype=np.float32)
    assert normalize(vectors, out=out) is out
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], rtol=1e-6)
    assert vectors[0, 0] == 3.0
    same = np.array([[0.0, 2.0]], dtype=np.float32)
    normalize(same, out=same)
    np.testing.assert_array_equal(same, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="2-D"):
        normalize(np.ones(3))


def test_stored_values_convert_to_the_same_floats_whichever_way() -> None:
    rng = np.random.default_rng(5)
    for values in (rng.normal(size=(70_000, 3)).astype(np.float16), rng.integers(-127, 128, (500, 7), np.int8)):
        read_only = values.copy()
        read_only.flags.writeable = False  # as Arrow hands them out: numpy converts these
        for given in (values, read_only, values[::2]):
            out = np.full(given.shape, np.nan, np.float32)
            index.to_float32(given, out)
            np.testing.assert_array_equal(out, given.astype(np.float32))


def test_top_k_over_blocks_and_merged_over_shards_equals_a_full_sort() -> None:
    rng = np.random.default_rng(1)
    vectors = normalize(rng.normal(size=(5000, 8)))
    queries = vectors[:7].copy()
    full = np.sort(queries @ vectors.T, axis=1)[:, ::-1]
    kth = TopK(queries, 10)
    for start in range(0, 5000, 512):
        kth.update(vectors[start:start + 512])
    np.testing.assert_allclose(kth.scores(), full[:, 9], rtol=1e-6)
    shards = []
    for start in range(0, 5000, 1700):  # as each shard keeps its own top-10
        top = TopK(queries, 10)
        top.update(vectors[start:start + 1700])
        shards.append(top.best)
    np.testing.assert_allclose(index.merged_top(shards)[:, -10], full[:, 9], rtol=1e-6)


def _source(tmp_path, vectors, ids, shard_rows=7000):
    """Shards as part files of format 2 (float16), with their done records."""
    from catalog.blocks import write_part
    from catalog.manifest import file_record

    records = []
    for i, start in enumerate(range(0, len(ids), shard_rows)):
        cells = ids[start:start + shard_rows].astype(np.uint64)
        part, table = f"data/res=9/part-{i}.parquet", f"blocks/res=9/part-{i}.blocks"
        for rel in (part, table):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_part(tmp_path / part, tmp_path / table, cells, vectors[start:start + shard_rows].astype(np.float16),
                   metadata={})
        records.append({"path": part, "blocks": table, "rows": len(cells), "first_cell": int(cells[0]),
                        "last_cell": int(cells[-1]), "files": [file_record(tmp_path, part), file_record(tmp_path, table)]})
    return ShardSource(open_store(tmp_path), records, vectors.shape[1], "float16")


def _write_index(tmp_path, source, res, n, dim, monkeypatch, trained=lambda: None):
    """Train on cells of the source (then call ``trained``), add its parts' rows, merge and tune:
    as a build does."""
    from builder.plan import BuildState

    store = open_store(tmp_path)
    state = BuildState(store)

    def vectors_of(cells):
        return source.gather_cells(cells)[1]

    monkeypatch.setattr(vector_index, "EXACT_MAX_VALUES", min(vector_index.EXACT_MAX_VALUES, (n - 1) * dim))
    state.mark(f"index-train-res={res}", index.train(store, res, n, dim, 2 * dim, vectors_of))
    trained()
    job = write.ShardJob(store, "float16", None, {})
    finish.finish_index(res, job, state, finish.Timer(), source)
    done = state.done(f"index-res={res}")
    return done["index"], done["file"]


def test_shard_source_gathers_cells_across_shards_reading_only_their_blocks(tmp_path, monkeypatch) -> None:
    from catalog import blocks

    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(20_000, 6)).astype(np.float32)
    ids = np.arange(20_000, dtype=np.int64) * 3 + 5
    source = _source(tmp_path, vectors, ids)
    read, real = [], blocks.Part._check
    monkeypatch.setattr(blocks.Part, "_check",
                        lambda self, b, run, data: read.append((self.info.path, b)) or real(self, b, run, data))
    got_ids, got = source.gather_cells(np.array([4, 5, 21_003, 21_005, 59_999, 60_005]))  # 4, 21_003, 60_005 absent
    np.testing.assert_array_equal(got_ids, [5, 21_005, 59_999])
    rows = (got_ids - 5) // 3
    np.testing.assert_allclose(got, normalize(vectors[rows].astype(np.float16)), atol=1e-6)
    assert list(dict.fromkeys(read)) == [("data/res=9/part-0.parquet", 0), ("data/res=9/part-1.parquet", 0),
                                         ("data/res=9/part-2.parquet", 1)]  # 7,000 rows a part, 4,096 a block


def test_ivf_sample_spreads_distinct_cells_over_the_sphere_and_holds_out_the_queries() -> None:
    train, queries = ivf_sample(3, 2000)
    assert len(train) == 2000 == len(np.unique(train)) and len(queries) == index.RECALL_QUERIES
    assert not np.isin(queries, train).any()  # recall is measured on cells the index was not trained on
    assert {h3i.get_resolution(c) for c in train[:50]} == {3}
    lat, _ = cell_centers(train)
    assert abs(np.mean(lat > 0) - 0.5) < 0.05 and abs(np.mean(np.abs(lat) < 30) - 0.5) < 0.05  # area-uniform
    keep = np.sort(train[::2])
    kept, held = ivf_sample(3, 500, keep)
    assert len(kept) == 500 and np.isin(kept, keep).all() and np.isin(held, keep).all()
    np.testing.assert_array_equal(ivf_sample(3, 2000)[0], train)  # the same every build


def test_pq_codes_and_ids_stay_within_a_tenth_of_the_stored_embeddings() -> None:
    assert pq_subquantizers(256, 512) == 32  # SatCLIP, float16: 40 of 512 bytes a cell
    assert pq_subquantizers(512, 1024) == 64  # GeoCLIP, float16: 72 of 1,024
    assert pq_subquantizers(256, 256) == 16  # SatCLIP, int8
    assert pq_subquantizers(256, 1024) == 64  # float32: at most one sub-quantiser per 4 dimensions
    assert pq_subquantizers(4, 8) == 4  # too small for the budget: the smallest that works


def _smooth(ids, dim, seed=0):
    """Unit vectors smooth in place, as location embeddings are."""
    lat, lon = np.radians(cell_centers(ids.astype(np.uint64)))
    xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
    rng = np.random.default_rng(seed)
    return normalize(np.sin(xyz @ rng.normal(scale=3.0, size=(3, dim)) + rng.uniform(0, 2 * np.pi, dim)))


def _vectors_of(cells, vectors):
    """A search's ``vectors_of`` over these cells and their unit vectors."""
    held = dict(zip(cells.tolist(), vectors, strict=True))

    def vectors_of(ids):
        found = np.array([c for c in ids.tolist() if c in held], np.int64)
        return found, np.array([held[c] for c in found.tolist()], np.float32).reshape(len(found), vectors.shape[1])

    return vectors_of


def test_a_filtered_search_keeps_every_candidate_it_scored_exactly() -> None:
    """A filtered search on a rough field (no hill to climb) whose index orders candidates
    only roughly (as PQ codes do): the passing cells among its pool are all scored exactly,
    so the true best that pass are found wherever in the pool they come, several a region."""
    regions = h3i.grid_disk(h3i.latlng_to_cell(0.0, 0.0, 2), 1).tolist()
    cells = np.sort(np.concatenate([h3i.cell_to_children(p, 5) for p in regions])).astype(np.int64)
    rng = np.random.default_rng(5)
    vectors = normalize(rng.normal(size=(len(cells), 16))).astype(np.float32)
    vectors_of = _vectors_of(cells, vectors)

    rough = faiss.IndexIDMap2(faiss.IndexFlatIP(16))  # proposes by vectors 0.3 off the stored ones
    rough.add_with_ids(normalize(vectors + 0.3 * rng.normal(size=vectors.shape) / 4).astype(np.float32), cells)
    query = vectors[:1]
    def keep(ids):  # the filter: cells east of the meridian
        return cells_to_latlng(ids.astype(np.uint64))[1] > 0

    exact = np.where(keep(cells), vectors @ query[0], -np.inf)
    truth = cells[np.argsort(-exact, kind="stable")[:10]]
    assert len(np.unique(cells_to_parent(truth.astype(np.uint64), 2))) < 10  # several of the best share a region
    _, found = vector_index.reranked_search(rough, query, 10, vectors_of, expand=True, keep=keep)
    assert sorted(found[0].tolist()) == sorted(truth.tolist())


class _CountingIndex:
    """An index whose searches are counted (``ks``: the number asked for, ``probes``: the
    lists probed, a search)."""

    def __init__(self, index) -> None:
        self.index, self.nprobe, self.nlist, self.ks, self.probes = index, index.nprobe, index.nlist, [], []

    def search(self, query, k, **kwargs):
        self.ks.append(k)
        self.probes.append(kwargs["params"].nprobe if "params" in kwargs else self.nprobe)
        return self.index.search(query, k, **kwargs)


def test_a_query_with_a_place_probes_its_own_number_of_lists() -> None:
    """``placed_nprobe`` is what an unfiltered query with a cell of its own probes; a vector
    query and a filtered one probe the index's nprobe."""
    cells = shard_cells(Shard(3)).astype(np.int64)
    vectors = _smooth(cells, 16, seed=2)
    quantizer = faiss.IndexFlatIP(16)
    ivf = faiss.IndexIVFFlat(quantizer, 16, 16, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add_with_ids(vectors, cells)
    ivf.nprobe = 4
    counted = _CountingIndex(ivf)
    vectors_of = _vectors_of(cells, vectors)
    exact = vectors @ vectors[7]
    for seeds, keep in (([cells[7:8]], None), (None, None), ([cells[7:8]], lambda ids: ids != cells[0])):
        got = vector_index.reranked_search(counted, vectors[7:8], 10, vectors_of, expand=True, seeds=seeds, keep=keep,
                                           placed_nprobe=1)
        assert set(got[1][0].tolist()) == set(cells[np.argsort(-exact)[:10]].tolist())
    assert counted.probes[0] == 1 and set(counted.probes[1:]) == {4}  # the filtered pool may ask twice


def test_tuning_gives_queries_with_a_place_the_fewest_lists_that_keep_their_recall() -> None:
    """``nprobe_placed``: the first of PLACED_NPROBES whose placed kinds' bound reaches the
    target (or the bound at nprobe, if that is lower); nprobe when none does."""
    kinds = np.array(["uniform"] * 200 + ["edge"] * 100)
    rows = np.arange(300)

    def found_at(shares):  # nprobe -> the share of each row found
        return lambda rows_, k, rerank, nprobe, placed=None: np.full(len(rows_), shares[placed or nprobe])

    def placed(shares):  # the tuning's share at nprobe 16 is given, never searched again
        chosen, share = index._placed_nprobe(rows, np.full(len(rows), shares.pop(16)), params, kinds,
                                             found_at(shares))
        assert share.shape == (len(rows),)  # the rows' recall with the lists chosen, for the manifest
        return chosen, float(share[0])

    params = {"nprobe": 16, "rerank": 1}
    assert placed({1: 0.9, 2: 0.999, 4: 1.0, 8: 1.0, 16: 1.0}) == (2, 0.999)
    assert placed({1: 0.9, 2: 0.9, 4: 0.9, 8: 0.9, 16: 1.0}) == (16, 1.0)
    # at nprobe the bound is short of the target: fewer lists that do as well are taken
    assert placed({1: 0.5, 2: 0.93, 4: 0.93, 8: 0.93, 16: 0.93}) == (2, 0.93)
    assert index._placed_nprobe(rows[:0], np.empty(0), params, kinds, found_at({}))[0] == 16


def _pool_step_by_step(index, query, want, keep):
    """A filtered search's pool as the search grows it, one 8x step a search."""
    nprobe, pool = index.nprobe, want
    while True:
        _, found = index.search(query[None, :], pool, params=faiss.SearchParametersIVF(nprobe=nprobe))
        row = found[0][found[0] >= 0]
        passing = row[keep(row)]
        if len(passing) >= want:
            return passing
        if len(row) < pool:
            if nprobe >= index.nlist:
                return passing
            nprobe = min(index.nlist, nprobe * 4)
        elif pool >= vector_index.MAX_CANDIDATES:
            return passing
        else:
            pool = min(vector_index.MAX_CANDIDATES, pool * 8)


@pytest.mark.parametrize("passing", ["deep", "early", "none", "few_lists"])
def test_a_filtered_pool_skips_the_steps_its_passing_share_rules_out(monkeypatch, passing) -> None:
    """The pool of a filtered search whose first candidates all fail the filter (an excluded
    circle around the query) is the one the search would reach growing 8x a search, found
    with two searches, not one a step; a pool whose share passing says the next step is
    enough asks for that step; pools that pass never, or exhaust the lists probed, are unchanged."""
    monkeypatch.setattr(vector_index, "MAX_CANDIDATES", 16_000)
    rng = np.random.default_rng(3)
    vectors = normalize(rng.normal(size=(20_000, 8))).astype(np.float32)
    ids = np.arange(20_000, dtype=np.int64) * 7 + 11
    quantizer = faiss.IndexFlatIP(8)
    ivf = faiss.IndexIVFFlat(quantizer, 8, 8, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors)
    ivf.add_with_ids(vectors, ids)
    ivf.nprobe = 4 if passing == "few_lists" else 8  # some lists, or all 8
    query = vectors[0]
    _, ranked = ivf.search(query[None, :], 20_000, params=faiss.SearchParametersIVF(nprobe=8))
    rank = dict(zip(ranked[0].tolist(), range(20_000)))
    rule = {"deep": lambda r: r >= 6_500 and r % 2 == 0, "early": lambda r: r % 3 == 0,
            "none": lambda r: False, "few_lists": lambda r: r >= 3_000}[passing]

    def keep(cells):
        return np.array([rule(rank[c]) for c in cells.tolist()], bool)

    counted = _CountingIndex(ivf)
    got = vector_index._candidates(counted, query, 1000, keep)
    expected = _pool_step_by_step(ivf, query, 1000, keep)
    assert got.tolist() == expected.tolist()
    if passing == "deep":  # 1,000 and then 16,000 (the step of 8,000 answered from its first rows)
        assert counted.ks == [1000, 16_000] and len(got) == 4_750
    if passing == "early":  # a third pass: the next step is enough, and it is the one asked for
        assert counted.ks == [1000, 8000]


def test_a_placed_query_starts_from_fewer_regions_than_a_vector_query(monkeypatch) -> None:
    """A cell or point query (its own cell a seed) asks for SEED_REGIONS regions, a vector
    query for VECTOR_SEED_REGIONS, a filtered one FILTERED_WIDEN times as many."""
    cells = shard_cells(Shard(3)).astype(np.int64)
    vectors = _smooth(cells, 16, seed=2)
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    flat.add_with_ids(vectors, cells)
    asked = []
    regions = vector_index._region_seeds
    monkeypatch.setattr(vector_index, "_region_seeds", lambda c, t, n: asked.append(n) or regions(c, t, n))

    def search(seeds, keep=None):
        vector_index.reranked_search(flat, vectors[:1], 10, _vectors_of(cells, vectors), expand=True,
                                     seeds=seeds, keep=keep)

    search([cells[:1]])
    search([np.empty(0, np.int64)])
    search(None)
    search([cells[:1]], keep=lambda ids: ids != cells[0])
    widen = vector_index.FILTERED_WIDEN
    assert asked == [vector_index.SEED_REGIONS, vector_index.VECTOR_SEED_REGIONS, vector_index.VECTOR_SEED_REGIONS,
                     vector_index.SEED_REGIONS * widen]
    assert vector_index.SEED_REGIONS < vector_index.VECTOR_SEED_REGIONS


def test_a_search_reads_its_candidates_and_seeds_at_once_before_the_walk(monkeypatch) -> None:
    """The index's candidates and every seed not scored yet are read in one call (remotely
    one round trip), so an unfiltered search reads once before its walk and a filtered one
    twice (its pool, scored to rank the regions, then the rest)."""
    cells = shard_cells(Shard(3)).astype(np.int64)
    vectors = _smooth(cells, 16, seed=2)
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    flat.add_with_ids(vectors, cells)
    reads, before_walk = [], []
    walk = vector_index._walk

    def counted(ids):
        reads.append(ids)
        return _vectors_of(cells, vectors)(ids)

    def first_walk(cells_, exact, n_index, *args):
        before_walk.append(len(reads))
        assert len(set(cells_.tolist())) == len(cells_)  # every cell scored once
        return walk(cells_, exact, n_index, *args)

    monkeypatch.setattr(vector_index, "_walk", first_walk)
    for seeds, keep in (([cells[5:6]], None), (None, None), ([cells[5:6]], lambda ids: ids != cells[0])):
        reads.clear()
        got = vector_index.reranked_search(flat, vectors[5:6], 10, counted, expand=True, seeds=seeds, keep=keep)
        exact = vectors @ vectors[5]
        if keep is not None:
            exact[0] = -np.inf
        assert set(got[1][0].tolist()) == set(cells[np.argsort(-exact)[:10]].tolist())
    assert before_walk == [1, 1, 2]


def test_a_filtered_search_climbs_from_the_sample_where_the_index_proposes_nothing_that_passes() -> None:
    """An index whose candidates all lie inside the excluded circle (as the hills nearest a
    query do): the best passing cells of the resolution's sample seed climbs to the exact
    best outside it."""
    from catalog.interpolation import haversine_km

    cells = shard_cells(Shard(3)).astype(np.int64)
    vectors = _smooth(cells, 32, seed=4)
    vectors_of = _vectors_of(cells, vectors)

    lat, lon = cells_to_latlng(cells.astype(np.uint64))
    target = int(np.flatnonzero(cells == h3i.latlng_to_cell(45.0, 10.0, 3))[0])
    km = haversine_km(lat, lon, lat[target], lon[target])
    near = faiss.IndexIDMap2(faiss.IndexFlatIP(32))  # proposes only cells within 1,000 km
    near.add_with_ids(vectors[km < 1000], cells[km < 1000])

    def keep(ids):
        return haversine_km(*cells_to_latlng(ids.astype(np.uint64)), lat[target], lon[target]) >= 3000

    query = vectors[target:target + 1]
    truth = cells[np.argsort(-np.where(km >= 3000, vectors @ query[0], -np.inf), kind="stable")[:10]]
    _, alone = vector_index.reranked_search(near, query, 10, vectors_of, expand=True, keep=keep)
    assert (alone[0] == -1).all()
    sample = vector_index.Sample(cells[::64], vectors[::64])
    _, found = vector_index.reranked_search(near, query, 10, vectors_of, expand=True, keep=keep, sample=sample)
    assert found[0].tolist() == truth.tolist()


def test_a_vector_query_climbs_from_the_sample_where_the_index_proposes_only_a_lower_hill() -> None:
    """A vector query (no place of its own) whose index proposes only cells far from its best
    (PQ codes tie the near-equal hills a mean of two places faces): the best of the sample
    seed climbs to the exact best; a query with a cell of its own does not need them."""
    from catalog.interpolation import haversine_km

    cells = shard_cells(Shard(3)).astype(np.int64)
    lat, lon = cells_to_latlng(cells.astype(np.uint64))
    # a plain with two hills in the query's direction, the higher near (45, 10), a lower one
    # 5,000 km away: a climb from the lower one stops on its top
    near, away = haversine_km(lat, lon, 45.0, 10.0), haversine_km(lat, lon, 10.0, 60.0)
    height = 2.0 * np.exp(-(near / 800) ** 2) + 1.8 * np.exp(-(away / 800) ** 2)
    rng = np.random.default_rng(2)
    vectors = normalize(np.eye(32)[[0]] + height[:, None] * np.eye(32)[[1]]
                        + 0.01 * rng.normal(size=(len(cells), 32))).astype(np.float32)
    vectors_of = _vectors_of(cells, vectors)
    target = int(np.argmin(near))
    far = near >= 3000
    elsewhere = faiss.IndexIDMap2(faiss.IndexFlatIP(32))  # proposes only cells 3,000 km away or more
    elsewhere.add_with_ids(vectors[far], cells[far])
    query = normalize(np.eye(32)[[1]] + 0.3 * np.eye(32)[[0]]).astype(np.float32)  # no cell's embedding
    truth = cells[np.argsort(-(vectors @ query[0]), kind="stable")[:10]]
    sample = vector_index.Sample(cells[::16], vectors[::16])
    _, alone = vector_index.reranked_search(elsewhere, query, 10, vectors_of, expand=True)
    assert not np.isin(truth, alone[0]).any()
    _, found = vector_index.reranked_search(elsewhere, query, 10, vectors_of, expand=True, sample=sample)
    assert found[0].tolist() == truth.tolist()
    sampled = []
    counting = vector_index.Sample(sample.cells, sample.vectors)
    object.__setattr__(counting, "best", lambda *a: sampled.append(a) or sample.best(*a))
    own = [np.array([cells[target]], np.int64)]
    _, placed = vector_index.reranked_search(elsewhere, query, 10, vectors_of, expand=True, seeds=own, sample=counting)
    assert placed[0].tolist() == truth.tolist() and not sampled  # its own cell climbs there


@pytest.mark.parametrize("bounded", [False, True], ids=["as-it-comes", "every-block-bounded"])
def test_top_k_leaves_out_the_cells_a_filtered_query_excludes(bounded, monkeypatch) -> None:
    from catalog.cells import cells_to_latlng
    from catalog.interpolation import haversine_km

    if bounded:  # never score every block at once: each block only where its ball says it may win
        monkeypatch.setattr(ivfpq, "DENSE", 1.0)
    cells = shard_cells(Shard(2))
    vectors = _smooth(cells.astype(np.int64), 8)
    probes = Probes(vectors[:3].copy(), np.array(["uniform", "exclude_1000km", "exclude_1000km"]), cells[:3],
                    np.array([0.0, 1000.0, 3000.0]))
    top = TopK(probes.vectors, 10, probes.exclusions())
    for start in range(0, len(cells), 1000):
        top.update(vectors[start:start + 1000], cells[start:start + 1000])
    lat, lon = cells_to_latlng(cells)
    for i, km in enumerate(probes.exclude_km):
        scores = vectors @ probes.vectors[i]
        olat, olon = cells_to_latlng(cells[i:i + 1])
        scores[haversine_km(lat, lon, olat[0], olon[0]) < km] = -np.inf
        np.testing.assert_allclose(top.scores()[i], np.sort(scores)[-10], rtol=1e-6)
    assert top.scores()[0] > top.scores()[1] > top.scores()[2]  # the query's own hill left out, then more


def test_merged_shard_lists_are_the_index_faiss_would_write(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(index, "REMAP_LISTS", 3)  # the shards' files mapped afresh during the merge
    rng = np.random.default_rng(4)
    dim, nlist = 16, 8
    vectors = normalize(rng.normal(size=(6000, dim))).astype(np.float32)
    ids = np.arange(6000, dtype=np.int64) * 5 + 11
    trained = faiss.index_factory(dim, f"IVF{nlist},PQ4x4", faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(trained).pq.cp.min_points_per_centroid = 1
    trained.train(vectors)
    store = open_store(tmp_path)
    with store.staged(index.train_relpath(1)) as tmp:
        faiss.write_index(trained, str(tmp))
    with store.staged(index.queries_relpath(1)) as tmp:
        tmp.write_bytes(Probes(vectors[:5], np.full(5, "noisy"), np.zeros(5, np.uint64), np.zeros(5)).to_bytes())
    sha = file_record(tmp_path, index.train_relpath(1))["sha256"]
    lists = []
    for key, (a, b) in enumerate([(0, 2500), (2500, 2600), (2600, 6000)]):
        saved = index.add_shard(store, TrainedIndex(1, sha), str(key), ids[a:b].astype(np.uint64),
                                vectors[a:b], None)
        lists.append(ShardLists(tmp_path / saved["path"]))
    assert index.merge(tmp_path / "merged.faiss", trained, lists) == 6000
    whole = faiss.clone_index(trained)
    whole.add_with_ids(vectors, ids)
    assert (tmp_path / "merged.faiss").read_bytes() == faiss.serialize_index(whole).tobytes()
    mapped = faiss.read_index(str(tmp_path / "merged.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    assert "OnDisk" in type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped).invlists)).__name__
    np.testing.assert_allclose(lists[0].top[:, -1], 1.0, rtol=1e-6)  # each query is its own best match
    path = Path(lists[1].codes.filename)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AtlasCorruptError, match="holds 100 bytes"):
        ShardLists(path)
    path.write_bytes(b"HXLISTS1")
    with pytest.raises(AtlasCorruptError, match="not a shard's inverted lists"):
        ShardLists(path)


def test_ivf_lists_grow_with_the_square_root() -> None:
    assert ivf_lists(100) == 16
    assert ivf_lists(2_000_000) == 256
    assert ivf_lists(100_000_000) == 2048


def test_large_resolutions_get_a_product_quantised_index_with_measured_recall(tmp_path, monkeypatch) -> None:
    ids = shard_cells(Shard(3)).astype(np.int64)  # 41,162 cells: the sample is drawn by place
    vectors = _smooth(ids, 64)
    opened, read_index = [], faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda *a: (opened.append(a), read_index(*a))[1])
    params, record = _write_index(tmp_path, _source(tmp_path, vectors, ids), 3, len(ids), 64, monkeypatch)
    # tuning maps the index afresh every few searches, so that the pages of lists probed go
    # (RssFile of a 45 MB index: 75 MB once every list was probed, 29 MB reopened): two
    # passes over the 500 queries at least
    assert len(opened) >= 2 * 500 / index.REOPEN_SEARCHES
    assert not params["exact"] and params["type"] == f"IVF{ivf_lists(len(ids))},PQ{pq_subquantizers(64, 128)}"
    assert params["recall_at_10"] >= 0.95 and params["recall_queries"] == 500 and params["cells"] == len(ids)
    recall = params["recall"]  # a global atlas has no parts' islands or edges to draw
    assert {kind: m["queries"] for kind, m in recall.items()} == {"uniform": 200, "mean_of_two": 100, "noisy": 100,
                                                                "exclude_1000km": 100}
    assert all(recall[kind]["at_10_lower_bound"] >= 0.95 for kind in ("uniform", "mean_of_two", "noisy"))
    assert params["recall_lower_bound"] == min(recall[k]["at_10_lower_bound"] for k in ("uniform", "mean_of_two", "noisy"))
    assert params["rerank"] in index.RERANKS and params["bytes"] == record["bytes"]
    m = pq_subquantizers(64, 128)  # 4: codes and ids within a tenth of 64 float16s, beside the centroids
    assert 0 < params["bytes"] - len(ids) * (m + 8) < 100_000
    mapped = vector_index.read_index(tmp_path / params["path"], params, 64, len(ids))
    assert mapped.ntotal == len(ids) and faiss.extract_index_ivf(mapped).nprobe == params["nprobe"]
    assert params["nprobe_placed"] in index.PLACED_NPROBES + (params["nprobe"],)
    assert params["nprobe_placed"] <= params["nprobe"]
    assert not (tmp_path / "_build" / "index" / "res=3").exists()  # trained index and shard lists removed


def test_an_index_missing_cells_is_refused(tmp_path, monkeypatch) -> None:
    ids = shard_cells(Shard(3)).astype(np.int64)
    source = _source(tmp_path, _smooth(ids, 16), ids)

    def claim_one_more():  # the parts' records claim a cell their rows do not hold
        source.records[0]["rows"] += 1

    with pytest.raises(AtlasCorruptError, match=f"hold {len(ids):,} cells in their index lists, expected"):
        _write_index(tmp_path, source, 3, len(ids), 16, monkeypatch, claim_one_more)


def test_shards_without_lists_are_encoded_from_their_parts_into_the_same_index(tmp_path, monkeypatch) -> None:
    import builder.grid

    few_recall_queries(monkeypatch)
    approximate_above(monkeypatch, 1000, 256)
    monkeypatch.setattr(builder.grid, "SINGLE_SHARD_MAX_RES", 2)
    monkeypatch.setattr(builder.grid, "SHARD_CELLS", 8000)  # res 3 in 6 shards
    monkeypatch.setattr(index, "pq_subquantizers", lambda dim, stored: 8)  # trains 4x faster than 32
    monkeypatch.setattr(index, "RECALL_TARGET", 0.0)  # the first setting: the index's bytes are the point here
    ckpt = make_checkpoint(tmp_path / "satclip-l10.ckpt", legendre_polys=10)

    def build_into(name):
        build("satclip-vit16-l10", checkpoint=str(ckpt), resolutions="3", output=tmp_path / name, device="cpu",
              progress=False)
        return tmp_path / name / "satclip-vit16-l10"

    streamed = build_into("streamed")
    # as after shards written by an earlier run, before the index was trained
    monkeypatch.setattr(write, "add_to_index", lambda job, shard, cells, stored, record: record)
    replayed = build_into("replayed")
    a, b = (read_manifest(d)["resolutions"]["3"] for d in (streamed, replayed))
    assert not a["index"]["exact"] and len(a["parts"]) == 6
    assert (streamed / "index/res=3.faiss").read_bytes() == (replayed / "index/res=3.faiss").read_bytes()
    assert a["index"]["recall_at_10"] == b["index"]["recall_at_10"] and a["index"]["recall"] == b["index"]["recall"]


def test_the_sample_holds_the_first_cell_under_every_ancestor_that_fits_islands_included() -> None:
    import h3

    from builder.finish import sample_cells

    # two "continents" (every res-4 cell under two res-1 cells) and a one-cell "island" far away
    lands = [h3.latlng_to_cell(48, 2, 1), h3.latlng_to_cell(10, 20, 1)]
    island = h3.str_to_int(h3.latlng_to_cell(-50, 100, 4))
    cells = np.sort(np.array([h3.str_to_int(c) for p in lands for c in h3.cell_to_children(p, 4)] + [island],
                             np.uint64))
    parts = np.array_split(cells, 5)  # parts share ancestors where they are cut

    def firsts(p: int) -> np.ndarray:
        return cells[np.unique(cells_to_parent(cells, p), return_index=True)[1]]

    for p, budget in ((3, 100), (2, 50), (1, 3)):  # the finest resolution whose ancestors fit
        assert len(firsts(p)) <= budget < len(firsts(p + 1))
        got = sample_cells(iter(parts), 4, budget)
        np.testing.assert_array_equal(got, firsts(p))
        assert island in got.tolist()
    np.testing.assert_array_equal(sample_cells(iter(parts), 4, 2), firsts(0)[:2])  # none fits: resolution 0's, cut
    assert not len(sample_cells(iter([cells[:0]]), 4, 10))


def test_a_built_approximate_index_serves_similar(tmp_path, monkeypatch) -> None:
    approximate_above(monkeypatch, 1000, 256)
    monkeypatch.setattr(index, "pq_subquantizers", lambda dim, stored: 8)  # trains 4x faster than 32
    monkeypatch.setattr(finish, "ZARR_BLOCK_CELLS", 2 * finish.ZARR_CHUNK_CELLS)  # several blocks at res 2
    monkeypatch.setenv("HEXATLAS_CACHE", str(tmp_path / "cache"))
    ckpt = make_checkpoint(tmp_path / "satclip-l10.ckpt", legendre_polys=10)
    build("satclip-vit16-l10", checkpoint=str(ckpt), resolutions="1-2", output=tmp_path / "atlas", device="cpu",
          progress=False, formats="zarr")
    info = read_manifest(tmp_path / "atlas" / "satclip-vit16-l10")["resolutions"]
    assert info["1"]["index"]["exact"] and not info["2"]["index"]["exact"]
    assert info["2"]["index"]["recall_at_10"] >= 0.95
    # written while the shards were encoded: the Zarr store holds exactly the Parquet rows
    dataset = tmp_path / "atlas" / "satclip-vit16-l10"
    table = pq.read_table(dataset / "data" / "res=2")
    ds = xr.open_zarr(dataset / "zarr" / "res=2.zarr")
    np.testing.assert_array_equal(ds.cell_ids.values, table.column("cell").to_numpy())
    np.testing.assert_array_equal(ds.lat.values, cell_centers(table.column("cell").to_numpy())[0])
    np.testing.assert_array_equal(ds.embedding.values, embedding_matrix(table.column("embedding")))
    result = open_atlas(tmp_path / "atlas").similar(lat=48.85, lon=2.35, res=2, k=10)
    scores = result.column("score").to_numpy()
    assert len(result) == 10 and (np.diff(scores) <= 0).all() and scores[0] > 0.999
    # the sample filtered and vector searches seed from: the first cell under each of the 842
    # cells of resolution 1 (all fit in its budget), with its unit vector
    sample = vector_index.Sample.parse((dataset / info["2"]["index"]["sample"]).read_bytes(), 256, "sample")
    cells = table.column("cell").to_numpy()
    firsts = cells[np.unique(cells_to_parent(cells, 1), return_index=True)[1]]
    assert len(firsts) == 842
    np.testing.assert_array_equal(sample.cells, firsts.astype(np.int64))
    rows = np.searchsorted(cells, firsts)
    stored = normalize(np.asarray(embedding_matrix(table.column("embedding")), np.float32)[rows])
    np.testing.assert_allclose(sample.vectors, stored, atol=1e-3)
    far = open_atlas(tmp_path / "atlas").similar(lat=48.85, lon=2.35, res=2, k=10, exclude_within_km=3000)
    assert len(far) == 10
    # a sample altered after publishing: filtered searches say so, unfiltered ones never read it
    path = dataset / info["2"]["index"]["sample"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    atlas = open_atlas(tmp_path / "atlas")
    assert len(atlas.similar(lat=48.85, lon=2.35, res=2, k=10)) == 10
    with pytest.raises(AtlasCorruptError, match="sample does not match the sha256"):
        atlas.similar(lat=48.85, lon=2.35, res=2, k=10, exclude_within_km=3000)


def test_the_exact_limit_is_a_scans_work_so_a_low_dimensional_resolution_trains_nothing(tmp_path,
                                                                                          monkeypatch) -> None:
    assert vector_index.exact_fits(1 << 18, 256) and not vector_index.exact_fits((1 << 18) + 1, 256)
    assert vector_index.exact_fits(1 << 17, 512) and not vector_index.exact_fits((1 << 17) + 1, 512)

    def no_training(*args, **kwargs):
        raise AssertionError("an IVF-PQ index was trained for a resolution an exact scan serves")

    monkeypatch.setattr(index, "train", no_training)
    build(TOY, resolutions="4", output=tmp_path, device="cpu", progress=False)  # 288,122 cells of 4-d: > 2^18
    info = read_manifest(tmp_path / "toy")["resolutions"]["4"]["index"]
    assert info["exact"] and info["recall_at_10"] == 1.0


def test_an_index_that_misses_the_recall_target_stays_exact(tmp_path, monkeypatch, caplog) -> None:
    # the toy's embeddings span a plane: thousands of cells share nearly one direction; one list
    # probed, its codes' order unchecked, misses most of the true top 10
    few_recall_queries(monkeypatch)
    approximate_above(monkeypatch, 1000, 4)
    monkeypatch.setattr(index, "NPROBES", (1,))
    monkeypatch.setattr(index, "RERANKS", (1,))
    monkeypatch.setattr(index, "RECALL_TARGET", 0.999)  # out of reach of 20 queries' lower bound
    build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False)
    info = read_manifest(tmp_path / "toy")["resolutions"]["2"]["index"]
    assert info["exact"] and info["recall_at_10"] == 1.0
    assert "keeping an exact index" in caplog.text


def test_an_index_that_misses_the_target_and_cannot_be_exact_keeps_its_best_setting(tmp_path, monkeypatch,
                                                                                      caplog) -> None:
    few_recall_queries(monkeypatch)
    approximate_above(monkeypatch, 1000, 4)
    monkeypatch.setattr(index, "NPROBES", (1,))
    monkeypatch.setattr(index, "RERANKS", (1,))
    monkeypatch.setattr(index, "RECALL_TARGET", 0.999)  # out of reach of 20 queries' lower bound
    monkeypatch.setattr(index, "FLAT_MAX_BYTES", 0)  # as at resolution 7, where a flat index would not fit
    build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False)
    info = read_manifest(tmp_path / "toy")["resolutions"]["2"]["index"]
    assert not info["exact"] and 0 < info["recall"]["uniform"]["at_10_lower_bound"] < 0.999 and "met" not in info
    assert "an exact index would not fit, keeping the best setting" in caplog.text
    assert len(open_atlas(tmp_path).similar(lat=10.0, lon=20.0, k=5)) == 5  # still searchable


def test_a_search_climbs_the_grid_from_wherever_the_index_lands() -> None:
    """An index that only ever proposes one far cell still yields the exact top 10 of a smooth
    field: the neighbour expansion walks the grid up to the best cells."""
    cells = shard_cells(Shard(3)).astype(np.int64)
    vectors = _smooth(cells, 32, seed=3)
    vectors_of = _vectors_of(cells, vectors)

    target = int(np.flatnonzero(cells == h3i.latlng_to_cell(45.0, 10.0, 3))[0])
    seed = h3i.latlng_to_cell(40.0, 20.0, 3)  # ~1,000 km away, several dozen steps
    lost = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    lost.add_with_ids(vectors[cells == seed], np.array([seed], np.int64))
    query = vectors[target:target + 1]
    truth = cells[np.argsort(-(vectors @ query[0]), kind="stable")[:10]]
    _, plain = vector_index.reranked_search(lost, query, 10, vectors_of)
    assert plain[0, 0] == seed and (plain[0, 1:] == -1).all()
    scores, found = vector_index.reranked_search(lost, query, 10, vectors_of, expand=True)
    assert found[0].tolist() == truth.tolist() and scores[0, 0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(AtlasCorruptError, match="names cells"):  # a cell the atlas lacks is named
        vector_index.reranked_search(lost, query, 10, lambda ids: vectors_of(ids[:0]))


@pytest.mark.parametrize("bounded", [False, True], ids=["as-it-comes", "every-block-bounded"])
@pytest.mark.parametrize(("dim", "m", "field"), [(4, 4, "smooth"), (16, 4, "smooth"), (16, 8, "rough")])
def test_shard_rows_encode_into_the_lists_faiss_adds_them_to(dim, m, field, bounded, monkeypatch) -> None:
    """The builder's own add (coarse assignment bounded block by block, 1-d sub-quantisers by
    bisection) puts every row in FAISS's list with FAISS's code, but for float ties."""
    if bounded:
        monkeypatch.setattr(ivfpq, "DENSE", 1.0)
    cells = shard_cells(Shard(3))  # in cell order, as a shard's rows come
    rng = np.random.default_rng(dim + m)
    vectors = _smooth(cells.astype(np.int64), dim) if field == "smooth" else \
        normalize(rng.normal(size=(len(cells), dim))).astype(np.float32)
    trained = faiss.index_factory(dim, f"IVF64,PQ{m}", faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(trained).do_polysemous_training = False  # as the builder trains (30x faster here)
    trained.train(vectors[rng.permutation(len(cells))[:64 * 40]])
    book = ivfpq.Codebook.of(trained)
    lists, codes = ivfpq.encode(book, vectors)
    whole = faiss.clone_index(trained)
    whole.add_with_ids(vectors, np.arange(len(cells), dtype=np.int64))
    sizes, theirs, ids = index._lists_of(faiss.extract_index_ivf(whole).invlists)
    their_list = np.repeat(np.arange(book.nlist), sizes)[np.argsort(ids)]
    scores = vectors @ book.centroids.T
    rows = np.arange(len(cells))
    moved = lists != their_list
    np.testing.assert_allclose(scores[rows, lists], scores.max(axis=1), atol=1e-6)  # every row at its best list
    np.testing.assert_allclose(scores[moved, lists[moved]], scores[moved, their_list[moved]], atol=1e-6)
    assert moved.mean() < 1e-3
    same = ~moved
    assert (theirs[np.argsort(ids)][same] == codes[same]).all(axis=1).mean() > 0.999
    assert np.bincount(lists, minlength=book.nlist).sum() == len(cells)


def test_a_floor_above_a_querys_kth_best_is_caught_and_its_top_found_exactly() -> None:
    """Shards keep only scores above each query's floor (a bound from the training sample);
    a floor that proves too high leaves the merged top short, and that query is found again
    in one exact pass: never a truth with holes."""
    import pyarrow as pa

    cells = shard_cells(Shard(2))
    vectors = _smooth(cells.astype(np.int64), 8)
    queries = vectors[[5, 900, 3000]].copy()
    exact = np.sort(queries @ vectors.T, axis=1)[:, -index.TOP_K:]
    floor = np.array([-np.inf, exact[1, 0] - 0.01, 2.0], np.float32)  # none, a true one, one above every score
    probes = Probes(queries, np.full(3, "uniform"), cells[[5, 900, 3000]], np.zeros(3), floor)
    shard_tops = []
    for start in range(0, len(cells), 1500):
        top = TopK(queries, index.TOP_K, floor=probes.floor)
        top.update(vectors[start:start + 1500], cells[start:start + 1500])
        shard_tops.append(top.best)
    merged = index.merged_top(shard_tops)
    np.testing.assert_allclose(merged[:2], exact[:2], rtol=1e-6)
    assert np.isneginf(merged[2]).all()
    passes = []

    def tables():
        passes.append(1)
        return [pa.table({"cell": cells[a:a + 2000], "row": np.arange(a, min(a + 2000, len(cells)))})
                for a in range(0, len(cells), 2000)]

    done = index.complete_top(merged, probes, tables, lambda t: vectors[t.column("row").to_numpy()])
    np.testing.assert_allclose(done, exact, rtol=1e-6)
    assert passes == [1]
    assert index.complete_top(done, probes, tables, lambda t: vectors[t.column("row").to_numpy()]) is done
    assert passes == [1]  # nothing short: no pass over the parts
