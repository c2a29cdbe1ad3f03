"""open_source: each accepted spec gives its source; anything else is refused, listing the forms."""

import io
import json
import tarfile

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from jdit.data.sources import (  # noqa: E402 (after the importorskip)
    ImageFolderSource,
    ManifestSource,
    TarShardSource,
    TfdsSource,
    open_source,
)
from jdit.data.tars import expand_braces  # noqa: E402


def png(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((2, 3, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def shard(path, key: str, caption: str):
    with tarfile.open(path, "w") as tar:
        for name, data in ((f"{key}.png", png()), (f"{key}.txt", caption.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_folders_manifests_and_tar_files(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(png())
    (photos / "a.txt").write_text("a")
    (photos / "b.png").write_bytes(png())
    src = open_source(photos, missing_sidecar="skip")  # keywords reach the constructor
    assert isinstance(src, ImageFolderSource) and len(src) == 2
    (photos / "a.cls").write_text("2")
    assert int(open_source(str(photos), label=True, missing_sidecar="skip")[0]["label"]) == 2
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "photos/a.png", "caption": "from the manifest"}))
    src = open_source(manifest)
    assert isinstance(src, ManifestSource) and src[0]["caption"] == "from the manifest"
    src = open_source(shard(tmp_path / "one.tar", "k", "from the tar"))
    assert isinstance(src, TarShardSource) and src[0]["caption"] == "from the tar"
    with pytest.raises(TypeError, match="missing_sidecar"):
        open_source(manifest, missing_sidecar="skip")


def test_folder_of_shards_and_patterns(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in (2, 0, 1):
        shard(shards / f"part-{k:03d}.tar", f"{k}", f"caption {k}")
    src = open_source(shards)
    assert isinstance(src, TarShardSource)
    assert [src.example_id(i) for i in range(3)] == [f"part-{k:03d}.tar/{k}" for k in range(3)]
    braces = open_source(str(shards / "part-{001..002}.tar"))
    assert [braces[i]["caption"] for i in range(2)] == ["caption 1", "caption 2"]
    glob = open_source(str(shards / "part-*.tar"))
    assert [glob[i]["caption"] for i in range(3)] == ["caption 0", "caption 1", "caption 2"]
    assert len(open_source(str(shards / "part-00[01].tar"))) == 2
    with pytest.raises(FileNotFoundError, match=r"part-003\.tar"):
        open_source(str(shards / "part-{000..003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"no files match"):
        open_source(str(shards / "other-*.tar"))
    (shards / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not \.tar shards.*notes\.txt"):
        open_source(str(shards / "*"))
    (shards / "stray.png").write_bytes(png())
    with pytest.raises(ValueError, match="both .tar shards and images"):
        open_source(shards)


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar",
                                                   "b/8.tar", "b/9.tar", "b/10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="goes down"):
        expand_braces("{5..1}.tar")
    with pytest.raises(ValueError, match=r"cannot expand \{x\}"):
        expand_braces("{x}.tar")


def test_anything_else_is_refused_listing_the_forms(tmp_path):
    (tmp_path / "table.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match=r"(?s)table\.csv: not a source.*FILE\.jsonl.*tfds:NAME/SPLIT"):
        open_source(tmp_path / "table.csv")
    with pytest.raises(FileNotFoundError, match=r"(?s)nothing: no such file or folder.*FOLDER"):
        open_source(tmp_path / "nothing")
    with pytest.raises(ValueError, match="apply to tfds: sources only"):
        open_source(tmp_path, data_dir=tmp_path)
    with pytest.raises(ValueError, match="expected tfds:NAME/SPLIT"):
        open_source("tfds:mnist")
    with pytest.raises(ValueError, match="needs caption_feature"):
        open_source("tfds:coco_captions/train")
    with pytest.raises(ValueError, match="not both"):
        open_source("tfds:mnist/train", label=True, caption_feature="caption")


def test_tfds_specs():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        src = open_source("tfds:mnist/train", label=True)
        assert isinstance(src, TfdsSource) and src.kind == "class" and len(src) == 3
        assert src.example_id(1) == "train/1" == src[1]["id"]
        assert src[1]["image"].shape == (28, 28, 3) and src[1]["label"].dtype == np.int32
        with pytest.raises(ValueError, match="no 'digit' feature"):
            open_source("tfds:mnist/train", label=True, label_feature="digit")
