"""TFDS and image-folder sources, and the grain pipeline of jdit.data.loader."""

import importlib.util
import io
import json
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")
Image = pytest.importorskip("PIL.Image")

from jdit.data import loader, sources  # noqa: E402 (after the importorskips)
from jdit.data.loader import make_dataset, resize_center_crop, shard_bounds, to_unit_range  # noqa: E402 (after the importorskips)
from jdit.data.sources import ImageFolderSource, tfds_source  # noqa: E402 (after the importorskips)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class JditToyCaptions(tfds.core.GeneratorBasedBuilder):
    """A tiny text-image dataset (PNG bytes given to TFDS: encoding needs no TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(7)}

    def _generate_examples(self, n):
        for i in range(n):
            image = np.full((6 + i, 9, 3), 10 * i, np.uint8)
            yield i, {"image": _png(image), "caption": f"  caption number {i}  "}


def _batches(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# ------------------------------------------------------------------------------------------ TFDS


def test_jdit_data_imports_without_optional_dependencies():
    code = ("import sys; import jdit.data.sources, jdit.data.loader, jdit.data.buckets, "
            "jdit.data.cache; bad = [m for m in ('grain', 'tensorflow_datasets', 'PIL', "
            "'tensorflow') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_extra_names_the_data_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'jdit\[data\]'"):
        tfds_source("mnist", "train")
    monkeypatch.setitem(sys.modules, "grain", None)
    with pytest.raises(ImportError, match=r"'grain'.*pip install 'jdit\[data\]'"):
        make_dataset([{"x": 1}], 1, shard_index=0, shard_count=1)


def test_tfds_labelled_images_imagenet_like():
    with tfds.testing.mock_data(num_examples=6):
        src = tfds_source("imagenet2012", "validation")
        assert len(src) == 6
        ex = src[3]
        assert set(ex) == {"image", "label", "id"}
        assert ex["image"].dtype == np.uint8 and ex["image"].ndim == 3 and ex["image"].shape[-1] == 3
        assert ex["label"].dtype == np.int32 and 0 <= int(ex["label"]) < 1000
        assert ex["id"] == "validation/3"
        _same(src[3], ex)  # random access is deterministic
        with pytest.raises(IndexError, match="out of range"):
            src[6]


def test_tfds_grey_images_become_rgb():
    with tfds.testing.mock_data(num_examples=2):
        ex = tfds_source("mnist", "train")[1]
        assert ex["image"].shape == (28, 28, 3)
        np.testing.assert_array_equal(ex["image"][..., 0], ex["image"][..., 2])
        assert tfds_source("mnist", "train", rgb=False)[1]["image"].shape == (28, 28, 1)


def test_tfds_caption_feature_mocked():
    with tfds.testing.mock_data(num_examples=3):
        src = tfds_source("jdit_toy_captions", "train", caption_feature="caption")
        ex = src[2]
        assert set(ex) == {"image", "caption", "id"}
        assert isinstance(ex["caption"], str)
        with pytest.raises(ValueError, match=r"caption_feature='text'.*features: \['caption', 'image'\]"):
            tfds_source("jdit_toy_captions", "train", caption_feature="text")


def test_tfds_real_array_record_without_tensorflow(tmp_path):
    """Prepare a real ArrayRecord dataset and read it back with tfds.data_source (no mocking)."""
    JditToyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    assert list(tmp_path.rglob("*.array_record*"))
    src = tfds_source("jdit_toy_captions", "train", data_dir=tmp_path, caption_feature="caption")
    assert len(src) == 7
    captions = sorted(src[i]["caption"] for i in range(7))
    assert captions == sorted(f"caption number {i}" for i in range(7))
    for i in range(7):
        ex = src[i]
        k = int(ex["caption"].rsplit(" ", 1)[1])
        assert ex["image"].shape == (6 + k, 9, 3)
        assert (ex["image"] == 10 * k).all()
    # The same files read from their version folder alone, without the builder's code.
    (version,) = tmp_path.glob("jdit_toy_captions/*/dataset_info.json")
    by_folder = tfds_source(version.parent, "train", caption_feature="caption")
    assert by_folder.name == "jdit_toy_captions" and len(by_folder) == 7
    _same(by_folder[4], src[4])
    assert "tensorflow" not in sys.modules
    batch = next(iter(make_dataset(src, 7, image_size=(4, 4), shuffle=False, num_epochs=1,
                                   shard_index=0, shard_count=1)))
    assert batch["image"].shape == (7, 4, 4, 3) and batch["caption"].shape == (7,)


def test_tfds_errors_are_explained(tmp_path):
    with pytest.raises(ValueError, match="must be prepared in the array_record format"):
        tfds_source("mnist", "train", data_dir=tmp_path)
    if importlib.util.find_spec("tensorflow") is None:
        with pytest.raises(ImportError, match="imports TensorFlow.*<data_dir>/<name>/<version>"):
            tfds_source("coco_captions", "train", data_dir=tmp_path, caption_feature="captions")


def test_tfds_through_loader_resumes_exactly():
    with tfds.testing.mock_data(num_examples=10):
        src = tfds_source("imagenet2012", "train")
        ds = make_dataset(src, 3, image_size=(8, 6), seed=5, shard_index=0, shard_count=1)
        it = iter(ds)
        first = _batches(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        rest = _batches(it, 5)
        resumed = iter(ds)
        resumed.set_state(state)
        for a, b in zip(rest, _batches(resumed, 5), strict=False):
            _same(a, b)
        assert first[0]["image"].shape == (3, 8, 6, 3)
        assert first[0]["image"].dtype == np.float32
        assert -1.0 <= first[0]["image"].min() and first[0]["image"].max() <= 1.0
        assert first[0]["original_size"].shape == (3, 2)


# ---------------------------------------------------------------------------------- image folder


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    files = {"b.png": (10, 14), "a.jpg": (12, 8), "sub/c.webp": (9, 9), "sub/A.JPEG": (7, 11)}
    for rel, (h, w) in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        p.with_suffix(".txt").write_text(f"  caption of {rel} ünïcode\n", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / ".hidden" / "x.png")
    (tmp_path / "notes.md").write_text("not an image")
    return files


def test_image_folder_reads_images_and_captions_in_sorted_order(tmp_path):
    files = _folder(tmp_path)
    src = ImageFolderSource(tmp_path)
    assert src.paths == ["a.jpg", "b.png", "sub/A.JPEG", "sub/c.webp"]
    for i, rel in enumerate(src.paths):
        ex = src[i]
        assert ex["id"] == rel
        assert ex["caption"] == f"caption of {rel} ünïcode"
        assert ex["image"].dtype == np.uint8 and ex["image"].shape == (*files[rel], 3)
        assert src.size(i) == files[rel]
    np.testing.assert_array_equal(src.sizes(), [files[p] for p in src.paths])
    png = np.asarray(Image.open(tmp_path / "b.png"))
    np.testing.assert_array_equal(src[1]["image"], png)  # lossless format: exact pixels


def test_image_folder_missing_sidecar_names_the_file(tmp_path):
    _folder(tmp_path)
    (tmp_path / "sub" / "c.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\).*sub/c\.txt"):
        ImageFolderSource(tmp_path)


def test_image_folder_unreadable_files_name_the_file(tmp_path):
    _folder(tmp_path)
    (tmp_path / "b.png").write_bytes(b"this is not a png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe not utf-8")
    src = ImageFolderSource(tmp_path)
    with pytest.raises(ValueError, match=r"b\.png: cannot read image"):
        src[1]
    with pytest.raises(ValueError, match=r"a\.txt: caption file is not UTF-8"):
        src[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderSource(empty)


def test_image_folder_alpha_grey_and_exif_orientation(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :3, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((5, 3), 77, np.uint8), "L").save(tmp_path / "b.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    Image.fromarray(np.zeros((4, 10, 3), np.uint8)).save(tmp_path / "c.jpg", exif=exif)
    for n in "abc":
        (tmp_path / f"{n}.txt").write_text(n)
    src = ImageFolderSource(tmp_path)
    a = src[0]["image"]
    np.testing.assert_array_equal(a[:, :3], np.broadcast_to([200, 0, 0], (4, 3, 3)))
    np.testing.assert_array_equal(a[:, 3:], np.full((4, 3, 3), 255))  # composited on white
    np.testing.assert_array_equal(src[1]["image"], np.full((5, 3, 3), 77))
    assert src.size(2) == (10, 4) and src[2]["image"].shape == (10, 4, 3)


def test_image_folder_through_loader(tmp_path):
    _folder(tmp_path)
    src = ImageFolderSource(tmp_path)
    ds = make_dataset(src, 2, image_size=6, seed=0, num_epochs=1, shard_index=0, shard_count=1)
    batches = list(ds)
    assert len(batches) == 2
    assert sorted(i for b in batches for i in b["id"]) == src.paths
    assert batches[0]["image"].shape == (2, 6, 6, 3)
    with pytest.raises(ValueError, match="different shapes for 'image'"):
        next(iter(make_dataset(src, 2, shard_index=0, shard_count=1)))


# ----------------------------------------------------------------------------------------- loader


def test_resize_center_crop_and_scaling():
    image = np.zeros((4, 8, 3), np.uint8)
    image[:, 2:6] = 255  # a white centre band, black borders
    np.testing.assert_array_equal(resize_center_crop(image, 4, 4), np.full((4, 4, 3), 255))
    flat = np.full((10, 30, 3), 90, np.uint8)
    for h, w in [(5, 5), (20, 7), (10, 30), (64, 16)]:
        out = resize_center_crop(flat, h, w)
        assert out.shape == (h, w, 3) and (out == 90).all()
    assert resize_center_crop(np.zeros((5, 7, 1), np.uint8), 3, 3).shape == (3, 3, 1)
    np.testing.assert_array_equal(to_unit_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])
    with pytest.raises(ValueError, match="uint8 image"):
        resize_center_crop(np.zeros((4, 4, 3), np.float32), 2, 2)


def _ids(ds):
    return [int(x) for b in ds for x in b["x"]]


def test_shards_are_disjoint_and_cover_the_data():
    data = [{"x": np.int64(i)} for i in range(11)]
    seen = []
    for k in range(2):
        ids = _ids(make_dataset(data, 1, seed=3, num_epochs=1, shard_index=k, shard_count=2,
                                even_shards=False))
        assert sorted(ids) == list(range(*shard_bounds(11, k, 2, even=False)))
        seen.append(set(ids))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(11))
    even = [_ids(make_dataset(data, 1, num_epochs=1, shard_index=k, shard_count=3))
            for k in range(3)]
    assert [len(e) for e in even] == [3, 3, 3]
    assert len(set().union(*map(set, even))) == 9
    with pytest.raises(ValueError, match="shard_index"):
        make_dataset(data, 1, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="both shard_index and shard_count"):
        make_dataset(data, 1, shard_index=0)


def test_epochs_are_permutations_and_seeded():
    data = [{"x": np.int64(i)} for i in range(12)]

    def run(seed):
        return _ids(make_dataset(data, 4, seed=seed, num_epochs=3, shard_index=0, shard_count=1))

    a = run(1)
    assert a == run(1) and a != run(2)
    epochs = [a[i * 12:(i + 1) * 12] for i in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1]
    plain = _ids(make_dataset(data, 5, shuffle=False, num_epochs=1, drop_remainder=False,
                              shard_index=0, shard_count=1))
    assert plain == list(range(12))
    # The default shard is this JAX process (0 of 1).
    assert sorted(_ids(make_dataset(data, 3, num_epochs=1))) == list(range(12))


def test_resumed_iterator_matches_uninterrupted_one():
    data = [{"x": np.int64(i), "caption": f"c{i}"} for i in range(7)]
    ds = make_dataset(data, 3, seed=11, shard_index=1, shard_count=2, even_shards=False,
                      num_threads=2)
    uninterrupted = _batches(iter(ds), 12)  # crosses several epochs
    for stop in (1, 4, 9):
        it = iter(ds)
        _batches(it, stop)
        state = json.loads(json.dumps(it.get_state()))
        del it
        resumed = iter(ds)
        resumed.set_state(state)
        for a, b in zip(uninterrupted[stop:], _batches(resumed, 12 - stop), strict=False):
            _same(a, b)


def test_loader_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset([{"x": 1}], 0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="num_epochs"):
        make_dataset([{"x": 1}], 1, num_epochs=0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="is empty"):
        make_dataset([{"x": 1}], 1, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="different keys"):
        loader.stack_examples([{"x": 1}, {"y": 1}])
    assert sources.require("numpy", "test") is np


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume():
    data = [{"x": np.int64(i), "image": np.full((5, 7, 3), i, np.uint8)} for i in range(20)]
    kw = {"image_size": 4, "seed": 0, "shard_index": 0, "shard_count": 1}
    reference = _batches(iter(make_dataset(data, 4, **kw)), 8)
    ds = make_dataset(data, 4, worker_count=2, **kw)
    it = iter(ds)
    for a, b in zip(reference[:3], _batches(it, 3), strict=False):
        _same(a, b)
    state = it.get_state()
    del it
    resumed = iter(ds)
    resumed.set_state(state)
    for a, b in zip(reference[3:], _batches(resumed, 5), strict=False):
        _same(a, b)
    del resumed
