"""PixArt aspect-ratio tables, closest_bucket against diffusers, the bucketed batch sampler."""

import ast
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from jdit.data.buckets import (
    ASPECT_RATIO_256,
    ASPECT_RATIO_512,
    ASPECT_RATIO_1024,
    ASPECT_RATIO_2048,
    ASPECT_RATIO_4096,
    TABLES,
    BucketBatchSampler,
    assign_buckets,
    closest_bucket,
    table_for,
)


def _diffusers_tables() -> dict[str, dict]:
    """The ASPECT_RATIO_*_BIN literals of the installed diffusers, read without importing the
    pipelines (they import transformers)."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None:
        pytest.skip("diffusers is not installed")
    folder = Path(spec.submodule_search_locations[0]) / "pipelines"
    tables = {}
    for name in ("pixart_alpha/pipeline_pixart_alpha.py", "pixart_alpha/pipeline_pixart_sigma.py",
                 "sana/pipeline_sana.py"):
        for node in ast.parse((folder / name).read_text()).body:
            if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id.startswith("ASPECT_RATIO_")):
                tables[node.targets[0].id] = ast.literal_eval(node.value)
    return tables


OURS = {"ASPECT_RATIO_256_BIN": ASPECT_RATIO_256, "ASPECT_RATIO_512_BIN": ASPECT_RATIO_512,
        "ASPECT_RATIO_1024_BIN": ASPECT_RATIO_1024, "ASPECT_RATIO_2048_BIN": ASPECT_RATIO_2048,
        "ASPECT_RATIO_4096_BIN": ASPECT_RATIO_4096}  # the last from SANA's pipeline


def test_tables_equal_diffusers():
    theirs = _diffusers_tables()
    for name, ours in OURS.items():
        assert list(ours) == list(theirs[name]), name  # same keys, same order (ties!)
        assert {k: tuple(map(float, v)) for k, v in ours.items()} == \
               {k: tuple(v) for k, v in theirs[name].items()}, name
    assert TABLES[1024] is ASPECT_RATIO_1024 and table_for(512) is ASPECT_RATIO_512
    for res, table in TABLES.items():
        assert table["1.0"] == (res, res)
        assert all(h % (res // 16) == 0 and w % (res // 16) == 0 for h, w in table.values())


def test_closest_bucket_matches_diffusers_classify_height_width_bin():
    processor = pytest.importorskip("diffusers.image_processor").PixArtImageProcessor
    rng = np.random.default_rng(0)
    sizes = [tuple(s) for s in rng.integers(1, 5000, size=(400, 2))]
    sizes += [tuple(s) for s in np.exp(rng.uniform(-2.5, 2.5, size=(400, 2))).round() * 64 + 1]
    sizes += [(1, 1), (1, 5000), (5000, 1), (512, 2048), (2048, 512), (1000, 1035), (1035, 1000)]
    # Half-way between two keys (up to float rounding): the same key as diffusers must win.
    sizes += [(53, 200), (13, 40), (3, 10), (97, 100), (207, 200), (409, 200), (7, 2)]
    theirs = _diffusers_tables()
    for name, ours in OURS.items():
        for h, w in sizes:
            h, w = int(h), int(w)
            assert closest_bucket(h, w, ours) == processor.classify_height_width_bin(
                h, w, ratios=theirs[name]), (name, h, w)
            # diffusers' own float tables are accepted too
            assert closest_bucket(h, w, theirs[name]) == closest_bucket(h, w, ours)


def test_closest_bucket_values_and_errors():
    assert closest_bucket(1024, 1024) == (1024, 1024)
    assert closest_bucket(100, 200, 512) == (352, 704)
    assert closest_bucket(720, 1280, 256) == (192, 336)  # 0.5625 -> "0.57"
    with pytest.raises(ValueError, match="positive"):
        closest_bucket(0, 10)
    with pytest.raises(ValueError, match="no aspect-ratio table for resolution 768"):
        closest_bucket(10, 10, 768)
    with pytest.raises(ValueError, match="non-empty mapping"):
        closest_bucket(10, 10, {})
    np.testing.assert_array_equal(assign_buckets([(100, 200), (9, 9)], 256),
                                  [(176, 352), (256, 256)])
    np.testing.assert_array_equal(assign_buckets([(3, 4)], None), [(3, 4)])
    with pytest.raises(ValueError, match="positive integers"):
        assign_buckets([(3.5, 4)], None)


def _sizes(n=203, seed=0):
    rng = np.random.default_rng(seed)
    shapes = np.array([(256, 256), (192, 336), (336, 192), (128, 512), (240, 256)])
    return shapes[rng.choice(len(shapes), size=n, p=[0.4, 0.25, 0.2, 0.01, 0.14])]


def test_sampler_batches_come_from_one_bucket_and_cover_each_epoch_once():
    sizes = _sizes()
    s = BucketBatchSampler(sizes, 8, table=256, seed=1)
    buckets = assign_buckets(sizes, 256)
    counts = {b: int((buckets == b).all(1).sum()) for b in s.buckets}
    assert s.batches_per_bucket == {b: c // 8 for b, c in counts.items()}
    assert len(s) == sum(c // 8 for c in counts.values())
    assert s.batches_per_bucket[(128, 512)] == 0  # too few examples: never used with drop_last
    for epoch in range(3):
        seen = []
        for step in range(epoch * len(s), (epoch + 1) * len(s)):
            b = s.batch(step)
            assert len(b.indices) == 8
            assert (buckets[b.indices] == b.bucket).all()
            seen.extend(b.indices.tolist())
        assert len(seen) == len(set(seen)) == len(s) * 8 == s.examples_per_epoch
    assert not np.array_equal(s.batch(0).indices, s.batch(len(s)).indices) or \
        s.batch(0).bucket != s.batch(len(s)).bucket  # epochs are reshuffled


def test_sampler_without_drop_last_covers_everything():
    sizes = _sizes(50)
    s = BucketBatchSampler(sizes, 8, table=256, seed=2, drop_last=False)
    seen = np.concatenate([s.batch(i).indices for i in range(len(s))])
    assert sorted(seen.tolist()) == list(range(50)) == list(range(s.examples_per_epoch))
    plain = BucketBatchSampler(sizes, 8, table=256, shuffle=False, drop_last=False)
    first = plain.batch(0)
    assert first.bucket == plain.buckets[0] and (np.diff(first.indices) > 0).all()


def test_sampler_is_deterministic_and_seeded():
    sizes = _sizes()
    a = [BucketBatchSampler(sizes, 4, table=256, seed=7).batch(i) for i in range(30)]
    b = [BucketBatchSampler(sizes, 4, table=256, seed=7).batch(i) for i in range(30)]
    c = [BucketBatchSampler(sizes, 4, table=256, seed=8).batch(i) for i in range(30)]
    assert all(x.bucket == y.bucket and np.array_equal(x.indices, y.indices) for x, y in zip(a, b, strict=False))
    assert any(not np.array_equal(x.indices, y.indices) for x, y in zip(a, c, strict=False))


def test_sampler_shards_share_the_bucket_and_split_the_global_batch():
    sizes = _sizes()
    shards = [BucketBatchSampler(sizes, 3, table=256, seed=4, shard_index=k, shard_count=4)
              for k in range(4)]
    whole = BucketBatchSampler(sizes, 12, table=256, seed=4)
    assert len(shards[0]) == len(whole)
    for step in range(2 * len(whole)):
        parts = [s.batch(step) for s in shards]
        assert len({p.bucket for p in parts}) == 1
        joined = np.concatenate([p.indices for p in parts])
        assert len(set(joined.tolist())) == 12
        np.testing.assert_array_equal(joined, whole.batch(step).indices)
    with pytest.raises(ValueError, match="drop_last=False needs shard_count == 1"):
        BucketBatchSampler(sizes, 3, drop_last=False, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index"):
        BucketBatchSampler(sizes, 3, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="both shard_index and shard_count"):
        BucketBatchSampler(sizes, 3, shard_count=2)
    default = BucketBatchSampler(sizes, 3)  # this JAX process: 0 of 1
    assert (default.shard_index, default.shard_count) == (0, 1)


def test_sampler_resumes_from_its_state():
    s = BucketBatchSampler(_sizes(), 4, table=256, seed=3)
    it = iter(s)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(s.get_state()))
    assert state == {"position": 5}
    expected = [next(it) for _ in range(40)]  # crosses epoch boundaries
    fresh = pickle.loads(pickle.dumps(BucketBatchSampler(_sizes(), 4, table=256, seed=3)))
    fresh.set_state(state)
    got = [b for b, _ in zip(fresh, range(40), strict=False)]
    assert all(x.bucket == y.bucket and np.array_equal(x.indices, y.indices)
               for x, y in zip(expected, got, strict=False))
    with pytest.raises(ValueError, match="position"):
        fresh.set_state({"step": 3})


def test_sampler_errors():
    with pytest.raises(ValueError, match="no bucket holds a full global batch of 64"):
        BucketBatchSampler(_sizes(20), 16, table=256, shard_index=0, shard_count=4)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(_sizes(20), 0)
    with pytest.raises(ValueError, match="sizes must be"):
        BucketBatchSampler(np.zeros((0, 2), int), 1)


def test_bucketed_loader_over_an_image_folder(tmp_path):
    pytest.importorskip("grain")
    image = pytest.importorskip("PIL.Image")
    from jdit.data.loader import make_bucketed_dataset
    from jdit.data.sources import ImageFolderSource

    rng = np.random.default_rng(0)
    shapes = [(20, 20), (10, 18), (18, 10), (21, 19), (9, 17), (17, 9), (10, 19), (19, 10)]
    for i, (h, w) in enumerate(shapes):
        image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    src = ImageFolderSource(tmp_path)
    table = {"0.5": (16, 32), "1.0": (24, 24), "2.0": (32, 16)}
    sampler = BucketBatchSampler(src.sizes(), 2, table=table, seed=0)
    assert sampler.batches_per_bucket == {(16, 32): 1, (24, 24): 1, (32, 16): 1}
    ds = make_bucketed_dataset(src, sampler, num_threads=2)
    it = iter(ds)
    batches = [next(it) for _ in range(7)]
    for b in batches:
        h, w = b["bucket"]
        assert b["image"].shape == (2, h, w, 3) and b["image"].dtype == np.float32
        assert b["caption"].shape == (2,) and b["original_size"].shape == (2, 2)
    assert {tuple(b["bucket"]) for b in batches[:3]} == set(table.values())
    state = it.get_state()
    following = [next(it) for _ in range(4)]
    resumed = iter(ds)
    resumed.set_state(state)
    for a, b in zip(following, [next(resumed) for _ in range(4)], strict=False):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    finite = list(make_bucketed_dataset(src, sampler, num_epochs=2))
    assert len(finite) == 6
    with pytest.raises(ValueError, match="built for 8 examples"):
        make_bucketed_dataset(list(range(5)), sampler)
