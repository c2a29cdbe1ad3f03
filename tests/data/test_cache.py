"""The feature cache: round trip, order, shards, atomic writes, resume, corruption."""

import json
import os
import pickle

import ml_dtypes
import numpy as np
import pytest

from jdit.data.cache import INDEX, FeatureCache, FeatureCacheWriter, write_cache


def _example(i: int, rng: np.random.Generator) -> dict:
    h, w = [(4, 4), (2, 6), (6, 2)][i % 3]
    return {
        "latent": rng.standard_normal((h, w, 4)).astype(np.float16),
        "text": rng.standard_normal((5, 8)).astype(np.float32),
        "text_mask": (np.arange(5) < 1 + i % 5).astype(np.int32),
        "caption": f"caption {i} ✓",
    }


def _write(directory, n=7, **kw):
    rng = np.random.default_rng(0)
    examples = [_example(i, rng) for i in range(n)]
    ids = [f"img-{(i * 5) % n:03d}" for i in range(n)]  # not sorted: order is insertion order
    with FeatureCacheWriter(directory, **kw) as w:
        for k, ex in zip(ids, examples, strict=False):
            w.add(k, **ex)
    return ids, examples


def _check(cache, ids, examples):
    assert len(cache) == len(ids) and cache.ids == ids
    for i, (k, ex) in enumerate(zip(ids, examples, strict=False)):
        got = cache[i]
        assert got["id"] == k and cache.index_of(k) == i
        assert set(got) == {"id", *ex}
        for f, v in ex.items():
            if isinstance(v, str):
                assert got[f] == v
            else:
                assert got[f].dtype == v.dtype and got[f].shape == v.shape
                np.testing.assert_array_equal(got[f], v)


def test_round_trip_order_and_lookup(tmp_path):
    ids, examples = _write(tmp_path, examples_per_shard=3)
    cache = FeatureCache(tmp_path)
    _check(cache, ids, examples)
    _check(FeatureCache(tmp_path), ids, examples)  # a second reader: same answers
    got = cache.get("img-005")
    np.testing.assert_array_equal(got["latent"], examples[ids.index("img-005")]["latent"])
    assert "img-005" in cache and "nope" not in cache
    with pytest.raises(KeyError, match="no example with id 'nope'"):
        cache.get("nope")
    with pytest.raises(IndexError, match="out of range"):
        cache[7]
    np.testing.assert_array_equal(cache.sizes(), [ex["latent"].shape[:2] for ex in examples])
    assert cache.shape(1, "text") == (5, 8)
    assert cache.fields["latent"] == {"kind": "array", "dtype": "float16"}
    assert cache.fields["caption"] == {"kind": "str"}
    assert [ex["id"] for ex in cache] == ids
    cache.verify()
    clone = pickle.loads(pickle.dumps(cache))  # for grain worker processes
    _check(clone, ids, examples)


def test_shard_boundaries(tmp_path):
    _, examples = _write(tmp_path, examples_per_shard=3)
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["complete"] is True
    assert [s["num_examples"] for s in index["shards"]] == [3, 3, 1]
    assert index["shard"] == [0, 0, 0, 1, 1, 1, 2] and index["offset"] == [0, 1, 2, 0, 1, 2, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        INDEX, "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    # A byte budget cuts shards too: an example holds 276 or 308 bytes of arrays.
    _write(tmp_path / "b", examples_per_shard=100, max_shard_bytes=500)
    index = json.loads((tmp_path / "b" / INDEX).read_text())
    assert [s["num_examples"] for s in index["shards"]] == [2, 2, 2, 1]
    # A small open-shard budget still reads everything right, in any order.
    cache = FeatureCache(tmp_path, max_open_shards=1)
    for i in [6, 0, 3, 1, 6, 2]:
        np.testing.assert_array_equal(cache[i]["latent"], examples[i]["latent"])


def test_dtypes_round_trip(tmp_path):
    z = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    with FeatureCacheWriter(tmp_path) as w:
        w.add("a", latent=z.astype(ml_dtypes.bfloat16), ids=np.arange(3, dtype=np.int64),
              flag=np.array(True))
    got = FeatureCache(tmp_path)[0]
    assert got["latent"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["latent"], z.astype(ml_dtypes.bfloat16))
    assert got["ids"].dtype == np.int64 and got["flag"].shape == () and bool(got["flag"])


def test_writer_rejects_bad_input(tmp_path):
    with FeatureCacheWriter(tmp_path) as w:
        w.add("a", latent=np.zeros((2, 2, 4), np.float16), caption="x")
        with pytest.raises(ValueError, match="duplicate example id 'a'"):
            w.add("a", latent=np.zeros((2, 2, 4), np.float16), caption="x")
        with pytest.raises(ValueError, match="differ from the cache's fields"):
            w.add("b", latent=np.zeros((2, 2, 4), np.float32), caption="x")
        with pytest.raises(ValueError, match="differ from the cache's fields"):
            w.add("b", latent=np.zeros((2, 2, 4), np.float16))
        with pytest.raises(ValueError, match="cannot store"):
            w.add("c", latent=np.zeros(2, np.complex64), caption="x")
        with pytest.raises(ValueError, match="non-empty str"):
            w.add(3, latent=np.zeros((2, 2, 4), np.float16), caption="x")
        w.add("b", latent=np.zeros((3, 1, 4), np.float16), caption="y")  # shapes may differ
    with pytest.raises(FileExistsError, match="overwrite=True or resume=True"):
        FeatureCacheWriter(tmp_path)
    with pytest.raises(FileExistsError, match="complete; nothing to resume"):
        FeatureCacheWriter(tmp_path, resume=True)
    ids, examples = _write(tmp_path, n=2, overwrite=True)
    _check(FeatureCache(tmp_path), ids, examples)
    with pytest.raises(ValueError, match="closed"):
        w.add("z", latent=np.zeros((2, 2, 4), np.float16), caption="x")


def test_atomic_writes_and_resume(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    examples = [_example(i, rng) for i in range(7)]
    w = FeatureCacheWriter(tmp_path, examples_per_shard=2)
    for i in range(3):
        w.add(f"e{i}", **examples[i])
    # Shard 0 is written and indexed; the cache is visible only as incomplete.
    with pytest.raises(ValueError, match="incomplete"):
        FeatureCache(tmp_path)
    assert len(FeatureCache(tmp_path, allow_incomplete=True)) == 2

    import jdit.weights.safetensors_io as st

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(st.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        w.add("e3", **examples[3])  # the writer dies while writing shard 1
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["shard-00000.json", "shard-00000.safetensors"]  # no partial shard or temp file
    partial = FeatureCache(tmp_path, allow_incomplete=True)
    assert partial.ids == ["e0", "e1"] and not partial.complete

    with pytest.raises(FileExistsError, match="holds an incomplete feature cache"):
        FeatureCacheWriter(tmp_path)
    w = FeatureCacheWriter(tmp_path, resume=True, examples_per_shard=2)
    assert "e1" in w and "e2" not in w and len(w) == 2
    for i in range(7):
        if f"e{i}" not in w:
            w.add(f"e{i}", **examples[i])
    w.close()
    _check(FeatureCache(tmp_path), [f"e{i}" for i in range(7)], examples)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        INDEX, *(f"shard-0000{i}.safetensors" for i in range(4))]


def test_exception_inside_with_keeps_added_examples(tmp_path):
    rng = np.random.default_rng(2)
    with pytest.raises(RuntimeError), FeatureCacheWriter(tmp_path, examples_per_shard=10) as w:
        w.add("a", **_example(0, rng))
        raise RuntimeError("encoder crashed")
    cache = FeatureCache(tmp_path, allow_incomplete=True)
    assert cache.ids == ["a"] and not cache.complete


def test_corrupt_or_missing_shards_give_clear_errors(tmp_path):
    _, examples = _write(tmp_path, examples_per_shard=3)
    shard1 = tmp_path / "shard-00001.safetensors"
    data = shard1.read_bytes()

    shard1.write_bytes(data[:-10])  # truncated
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors: shard 1 .* truncated"):
        FeatureCache(tmp_path)[3]
    np.testing.assert_array_equal(FeatureCache(tmp_path)[0]["latent"], examples[0]["latent"])

    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # same size, one data byte changed
    shard1.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors: shard 1 .* corrupt \(sha256"):
        FeatureCache(tmp_path).verify()

    shard1.write_bytes(b"\xff" * len(data))  # garbage header
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors: shard 1 of the feature cache is corrupt"):
        FeatureCache(tmp_path)[4]

    os.unlink(shard1)
    with pytest.raises(FileNotFoundError, match=r"shard-00001\.safetensors: shard 1 .* missing"):
        FeatureCache(tmp_path)[5]
    with pytest.raises(FileNotFoundError, match="missing"):
        FeatureCache(tmp_path).verify()

    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt feature-cache index"):
        FeatureCache(tmp_path)
    os.unlink(tmp_path / INDEX)
    with pytest.raises(FileNotFoundError, match="not a feature cache"):
        FeatureCache(tmp_path)


def test_cache_feeds_the_loaders(tmp_path):
    pytest.importorskip("grain")
    from jdit.data.buckets import BucketBatchSampler
    from jdit.data.loader import make_bucketed_dataset, make_dataset

    rng = np.random.default_rng(3)
    examples = [{"id": f"x{i}", **_example(i, rng)} for i in range(12)]
    cache = write_cache(tmp_path, iter(examples), examples_per_shard=5)
    sampler = BucketBatchSampler(cache.sizes(), 2, table=None, seed=0)
    assert sorted(sampler.buckets) == [(2, 6), (4, 4), (6, 2)]
    it = iter(make_bucketed_dataset(cache, sampler))
    for _ in range(6):
        b = next(it)
        h, w = b["bucket"]
        assert b["latent"].shape == (2, h, w, 4) and b["latent"].dtype == np.float16
        assert b["text"].shape == (2, 5, 8) and b["text_mask"].shape == (2, 5)
        for k, lat in zip(b["id"], b["latent"], strict=False):
            np.testing.assert_array_equal(lat, examples[int(k[1:])]["latent"])
    # Same-shape fields only: make_dataset over the text features, resumable.
    text_only = [{"text": cache[i]["text"], "id": cache[i]["id"]} for i in range(len(cache))]
    ds = make_dataset(text_only, 4, seed=1, shard_index=0, shard_count=1)
    it = iter(ds)
    next(it)
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    it2 = iter(ds)
    it2.set_state(state)
    for a, b in zip(after, [next(it2) for _ in range(3)], strict=False):
        np.testing.assert_array_equal(a["text"], b["text"])
        assert list(a["id"]) == list(b["id"])


def test_metadata_is_kept_and_a_resume_with_other_metadata_is_refused(tmp_path):
    meta = {"autoencoder": {"kind": "identity"}, "buckets": {"table": 256}}
    with pytest.raises(RuntimeError):
        with FeatureCacheWriter(tmp_path, metadata=meta, examples_per_shard=1) as w:
            w.add("a", latent=np.zeros((2, 2, 3), np.float32))
            raise RuntimeError("killed")
    with pytest.raises(ValueError, match="started with other metadata"):
        FeatureCacheWriter(tmp_path, resume=True, metadata={**meta, "buckets": {"table": 512}})
    with FeatureCacheWriter(tmp_path, resume=True, metadata=meta) as w:
        assert "a" in w
        w.add("b", latent=np.ones((2, 2, 3), np.float32))
    assert FeatureCache(tmp_path).metadata == meta


def test_parts_merge_into_one_cache_in_the_given_order(tmp_path):
    from jdit.data.cache import merge_parts

    meta = {"kind": "test"}
    for p, ids in (("part-0", ["x1", "x3"]), ("part-1", ["x0", "x2", "x4"])):
        with FeatureCacheWriter(tmp_path / p, metadata=meta, examples_per_shard=2) as w:
            for i in ids:
                w.add(i, latent=np.full((1, int(i[1]) + 1, 2), int(i[1]), np.float16), caption=i)
    with FeatureCacheWriter(tmp_path / "part-2", metadata=meta):
        pass  # a process whose examples were all skipped
    cache = merge_parts(tmp_path, ["part-0", "part-1", "part-2"], meta,
                        order=[f"x{i}" for i in range(5)])
    assert cache.ids == ["x0", "x1", "x2", "x3", "x4"] and cache.metadata == meta
    for i in range(5):
        ex = cache[i]
        assert ex["caption"] == f"x{i}" and ex["latent"].shape == (1, i + 1, 2)
        assert (ex["latent"] == i).all()
    cache.verify()
    with pytest.raises(FileExistsError):
        merge_parts(tmp_path, ["part-0"])
    (tmp_path / "index.json").unlink()
    with FeatureCacheWriter(tmp_path / "part-3", metadata=meta) as w:
        w.add("x1", latent=np.zeros((1, 1, 2), np.float16), caption="again")
    with pytest.raises(ValueError, match="'x1' is in two parts"):
        merge_parts(tmp_path, ["part-0", "part-3"])
    with FeatureCacheWriter(tmp_path / "part-4", metadata={"kind": "other"}):
        pass
    with pytest.raises(ValueError, match="metadata differ"):
        merge_parts(tmp_path, ["part-0", "part-4"])
