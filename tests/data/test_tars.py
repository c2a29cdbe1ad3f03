"""TarShardSource: WebDataset-style shards read by index; duplicates, missing members and bad
shards handled as documented."""

import gzip
import io
import json
import pickle
import tarfile

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from jdit.data.sources import BadExample, TarShardSource  # noqa: E402 (after the importorskip)


def png(value: int, size=(3, 4)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def shard(path, members: list[tuple[str, bytes | None]]):
    """A tar file of ``(name, data)`` members, in that order (data None: a directory)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def reason(source, index: int) -> tuple[str, str, str]:
    with pytest.raises(BadExample) as e:
        source[index]
    return e.value.reason, e.value.example_id, str(e.value)


def test_text_shards_round_trip(tmp_path):
    first = shard(tmp_path / "shard-000000.tar", [
        ("0001.png", png(10)),
        ("0001.txt", b"one\n"),
        ("./0002.txt", b"two"),             # caption before image, "./" prefix
        ("0003.png", png(30, (5, 2))),
        ("./0002.png", png(20)),
        ("0003.json", json.dumps({"caption": "three", "extra": 1}).encode()),
        ("sub", None),                      # a directory member
        ("sub/0004.png", png(40)),
        ("sub/0004.txt", b"four"),
        ("._0004.png", b"macOS resource fork"),  # hidden: skipped
        ("README", b"no extension: skipped"),
    ])
    second = shard(tmp_path / "shard-000001.tar", [("0001.png", png(50)),
                                                   ("0001.txt", b"five")])
    src = TarShardSource([first, second])
    assert src.kind == "text" and len(src) == 5
    ids = [src.example_id(i) for i in range(5)]
    assert ids == ["shard-000000.tar/0001", "shard-000000.tar/0002", "shard-000000.tar/0003",
                   "shard-000000.tar/sub/0004", "shard-000001.tar/0001"]
    captions = {2: "three", 0: "one", 4: "five", 1: "two", 3: "four"}
    for i, caption in captions.items():  # any order
        ex = src[i]
        assert set(ex) == {"image", "caption", "id"}
        assert (ex["caption"], ex["id"]) == (caption, ids[i])
    np.testing.assert_array_equal(src[2]["image"], np.full((5, 2, 3), 30))
    np.testing.assert_array_equal(src[4]["image"], np.full((3, 4, 3), 50))
    copy = pickle.loads(pickle.dumps(src))  # as grain's worker processes receive it
    assert copy[1]["caption"] == "two"


def test_label_shards(tmp_path):
    path = shard(tmp_path / "s.tar", [("a.png", png(1)), ("a.cls", b"3\n"),
                                      ("b.png", png(2)), ("b.json", b'{"label": 9}'),
                                      ("c.png", png(3)), ("c.cls", b"three")])
    src = TarShardSource(path, label=True)
    assert src.kind == "class"
    assert [int(src[i]["label"]) for i in range(2)] == [3, 9]
    assert src[0]["label"].dtype == np.int32
    assert reason(src, 2)[:2] == ("bad_label", "s.tar/c")


def test_duplicate_keys_are_separate_indices_with_the_same_id(tmp_path):
    path = shard(tmp_path / "s.tar", [("k.png", png(1)), ("k.txt", b"first"),
                                      ("k.png", png(2)), ("k.txt", b"second")])
    src = TarShardSource(path)
    assert len(src) == 2 and src.example_id(0) == src.example_id(1) == "s.tar/k"
    assert [src[i]["caption"] for i in range(2)] == ["first", "second"]
    assert [int(src[i]["image"][0, 0, 0]) for i in range(2)] == [1, 2]


def test_bad_members_are_bad_examples(tmp_path):
    path = shard(tmp_path / "s.tar", [
        ("a.png", png(1)),                          # no caption
        ("b.txt", b"no image"),
        ("c.png", png(3)), ("c.txt", b" \n"),
        ("d.png", png(4)), ("d.txt", b"\xff\xfe"),
        ("e.png", b"not a png"), ("e.txt", b"broken image"),
        ("f.png", png(6)), ("f.json", b'{"caption": '),
    ])
    src = TarShardSource(path)
    got = [reason(src, i)[:2] for i in range(len(src))]
    assert got == [("missing_caption", "s.tar/a"), ("missing_image", "s.tar/b"),
                   ("empty_caption", "s.tar/c"), ("caption_not_utf8", "s.tar/d"),
                   ("unreadable_image", "s.tar/e"), ("bad_sidecar", "s.tar/f")]
    assert "s.tar:e.png: cannot read image" in reason(src, 4)[2]


def test_bad_shards_are_constructor_errors(tmp_path):
    good = shard(tmp_path / "good.tar", [("a.png", png(1)), ("a.txt", b"a")])
    with pytest.raises(FileNotFoundError, match=r"missing\.tar"):
        TarShardSource([good, tmp_path / "missing.tar"])
    (tmp_path / "packed.tar").write_bytes(gzip.compress(good.read_bytes()))
    with pytest.raises(ValueError, match=r"packed\.tar: not a readable uncompressed tar"):
        TarShardSource(tmp_path / "packed.tar")
    data = shard(tmp_path / "big.tar", [("a.png", png(1, (64, 64))), ("a.txt", b"a"),
                                        ("b.png", png(2)), ("b.txt", b"b")]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:700])  # inside the first member's data
    with pytest.raises(ValueError, match=r"cut\.tar: not a readable"):
        TarShardSource(tmp_path / "cut.tar")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "good.tar").write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match=r"distinct file names.*good\.tar"):
        TarShardSource([good, other / "good.tar"])
