"""ManifestSource: a JSONL manifest read back exactly; each bad line is one BadExample."""

import json

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from jdit.data.sources import BadExample, ManifestSource  # noqa: E402 (after the importorskip)


def image(path, value: int, size=(3, 5)) -> np.ndarray:
    pixels = np.full((*size, 3), value, np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def write_lines(path, lines: list) -> None:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode()
                                for x in lines))


def reason(source, index: int) -> tuple[str, str, str]:
    with pytest.raises(BadExample) as e:
        source[index]
    return e.value.reason, e.value.example_id, str(e.value)


def test_text_manifest_round_trip(tmp_path):
    data = tmp_path / "data"
    a = image(data / "images" / "a.png", 10)
    b = image(tmp_path / "elsewhere" / "b.png", 20, (4, 2))
    write_lines(data / "train.jsonl", [
        {"image": "images/a.png", "caption": " a red square "},
        b"",
        b"   ",
        {"image": str(tmp_path / "elsewhere" / "b.png"), "caption": "b", "id": "bee"},
    ])
    src = ManifestSource(data / "train.jsonl")
    assert src.kind == "text" and len(src) == 2  # blank lines take no index
    assert [src.example_id(i) for i in range(2)] == ["images/a.png", "bee"]
    ex = src[0]
    assert set(ex) == {"image", "caption", "id"} and ex["caption"] == "a red square"
    np.testing.assert_array_equal(ex["image"], a)
    np.testing.assert_array_equal(src[1]["image"], b)  # an absolute path, taken as it is


def test_label_manifest(tmp_path):
    image(tmp_path / "x.png", 1)
    write_lines(tmp_path / "m.jsonl", [{"image": "x.png", "label": 4},
                                       {"image": "x.png", "label": "4"},
                                       {"image": "x.png", "caption": "no label"}])
    src = ManifestSource(tmp_path / "m.jsonl", label=True)
    assert src.kind == "class"
    ex = src[0]
    assert set(ex) == {"image", "label", "id"} and ex["label"] == 4
    assert ex["label"].dtype == np.int32
    assert reason(src, 1)[0] == "bad_label"
    assert reason(src, 2)[0] == "missing_label"


def test_bad_lines_are_bad_examples_with_their_line_number(tmp_path):
    image(tmp_path / "ok.png", 5)
    write_lines(tmp_path / "m.jsonl", [
        {"image": "ok.png", "caption": "fine"},   # line 1
        b"{not json",                              # line 2
        b"[1, 2]",                                 # line 3
        {"caption": "no image"},                   # line 4
        b"",                                       # line 5: blank, no index
        {"image": 7, "caption": "image not a path"},          # line 6
        {"image": "ok.png", "caption": "x", "id": 12},        # line 7
        b'{"image": "ok.png", "caption": "caf\xe9"}',         # line 8: latin-1 bytes
        {"image": "ok.png", "caption": "also fine"},          # line 9
    ])
    src = ManifestSource(tmp_path / "m.jsonl")
    assert len(src) == 8
    for index, line in ((1, 2), (2, 3), (3, 4), (4, 6), (5, 7), (6, 8)):
        code, example_id, message = reason(src, index)
        assert code == "bad_manifest_line"
        assert example_id == src.example_id(index) == f"m.jsonl:{line}"
        assert f"m.jsonl: line {line}: " in message
    assert "no \"image\" path" in reason(src, 3)[2] and "not JSON" in reason(src, 1)[2]
    assert src[0]["caption"] == "fine" and src[7]["caption"] == "also fine"


def test_bad_captions_and_images(tmp_path):
    image(tmp_path / "ok.png", 5)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    write_lines(tmp_path / "m.jsonl", [
        {"image": "ok.png"},
        {"image": "ok.png", "caption": "  "},
        {"image": "ok.png", "caption": ["a", "b"]},
        {"image": "gone.png", "caption": "x"},
        {"image": "broken.png", "caption": "x", "id": "broken"},
    ])
    src = ManifestSource(tmp_path / "m.jsonl")
    assert [reason(src, i)[0] for i in range(5)] == [
        "missing_caption", "empty_caption", "bad_caption", "missing_image", "unreadable_image"]
    code, example_id, message = reason(src, 4)
    assert example_id == "broken" and "broken.png: cannot read image" in message
    assert "gone.png" in reason(src, 3)[2]


def test_duplicate_ids_are_separate_indices(tmp_path):
    image(tmp_path / "a.png", 1)
    image(tmp_path / "b.png", 2)
    write_lines(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "first", "id": "k"},
                                       {"image": "b.png", "caption": "second", "id": "k"}])
    src = ManifestSource(tmp_path / "m.jsonl")
    assert [src[i]["id"] for i in range(2)] == ["k", "k"]
    assert [src[i]["caption"] for i in range(2)] == ["first", "second"]


def test_missing_or_empty_manifest_is_a_constructor_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*does not exist"):
        ManifestSource(tmp_path / "nope.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"blank\.jsonl.*lists no examples"):
        ManifestSource(tmp_path / "blank.jsonl")
