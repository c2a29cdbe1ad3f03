"""ImageFolderSource: caption sidecars (.txt / .json), labels (.cls / .json / class folders), and
each bad sidecar raised as a BadExample with its reason."""

import json

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from jdit.data.sources import BadExample, ImageFolderSource  # noqa: E402 (after the importorskip)


def image(path, value: int = 0, size=(4, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def reason(source, index: int) -> tuple[str, str, str]:
    with pytest.raises(BadExample) as e:
        source[index]
    return e.value.reason, e.value.example_id, str(e.value)


def test_txt_and_json_captions(tmp_path):
    image(tmp_path / "a.png", 10)
    (tmp_path / "a.txt").write_text("\ufeff  a from txt \n", encoding="utf-8")  # BOM: still text
    (tmp_path / "a.json").write_text(json.dumps({"caption": "ignored: the .txt wins"}))
    image(tmp_path / "sub" / "b.jpg", 200)
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"caption": " b from json ", "x": 1}))
    src = ImageFolderSource(tmp_path)
    assert src.kind == "text" and len(src) == 2
    assert [src.example_id(i) for i in range(2)] == ["a.png", "sub/b.jpg"]
    a, b = src[0], src[1]
    assert (a["caption"], a["id"]) == ("a from txt", "a.png")
    assert (b["caption"], b["id"]) == ("b from json", "sub/b.jpg")
    np.testing.assert_array_equal(a["image"], np.full((4, 6, 3), 10))
    with pytest.raises(IndexError, match="out of range"):
        src.example_id(2)


def test_missing_caption_is_a_constructor_error_unless_skipped(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("fine")
    image(tmp_path / "b.png")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\).*b\.txt.*missing_sidecar='skip'"):
        ImageFolderSource(tmp_path)
    src = ImageFolderSource(tmp_path, missing_sidecar="skip")
    assert src[0]["caption"] == "fine"
    code, example_id, message = reason(src, 1)
    assert (code, example_id) == ("missing_caption", "b.png") and "b.png" in message
    with pytest.raises(ValueError, match="missing_sidecar must be"):
        ImageFolderSource(tmp_path, missing_sidecar="ignore")


@pytest.mark.parametrize(("sidecar", "content", "code"), [
    ("txt", b"", "empty_caption"),
    ("txt", b" \n\t \n", "empty_caption"),
    ("txt", b"caf\xe9 latin-1", "caption_not_utf8"),
    ("json", b'{"caption": "   "}', "empty_caption"),
    ("json", b'{"caption": 42}', "bad_caption"),
    ("json", b'{"text": "a caption under another name"}', "missing_caption"),
    ("json", b'{"caption": "cut short', "bad_sidecar"),
    ("json", b'["caption"]', "bad_sidecar"),
])
def test_bad_captions_are_bad_examples(tmp_path, sidecar, content, code):
    image(tmp_path / "x.png")
    (tmp_path / f"x.{sidecar}").write_bytes(content)
    got, example_id, message = reason(ImageFolderSource(tmp_path), 0)
    assert (got, example_id) == (code, "x.png")
    assert f"x.{sidecar}" in message


def test_unreadable_image_names_file_and_example(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "broken.txt").write_text("a caption")
    code, example_id, message = reason(ImageFolderSource(tmp_path), 0)
    assert (code, example_id) == ("unreadable_image", "broken.png")
    assert "broken.png: cannot read image" in message


def test_labels_from_cls_and_json_sidecars(tmp_path):
    for name, value in (("a", 3), ("b", 0), ("c", 7)):
        image(tmp_path / f"{name}.png", value)
    (tmp_path / "a.cls").write_text("3\n")
    (tmp_path / "b.json").write_text('{"label": 0, "caption": "unused"}')
    (tmp_path / "c.cls").write_text("7")
    (tmp_path / "c.json").write_text('{"label": 1}')  # the .cls wins
    src = ImageFolderSource(tmp_path, label=True)
    assert src.kind == "class" and not src.class_folders
    for i, want in enumerate((3, 0, 7)):
        ex = src[i]
        assert set(ex) == {"image", "label", "id"}
        assert ex["label"].dtype == np.int32 and int(ex["label"]) == want


@pytest.mark.parametrize(("sidecar", "content", "code"), [
    ("cls", b"cat", "bad_label"),
    ("cls", b"-1", "bad_label"),
    ("cls", b"", "bad_label"),
    ("json", b'{"label": 2.5}', "bad_label"),
    ("json", b'{"label": true}', "bad_label"),
    ("json", b'{"label": 4294967296}', "bad_label"),
    ("json", b'{"caption": "no label"}', "missing_label"),
])
def test_bad_labels_are_bad_examples(tmp_path, sidecar, content, code):
    image(tmp_path / "x.png")
    (tmp_path / f"x.{sidecar}").write_bytes(content)
    assert reason(ImageFolderSource(tmp_path, label=True), 0)[:2] == (code, "x.png")


def test_missing_label_sidecar(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.cls").write_text("1")
    image(tmp_path / "b.png")
    with pytest.raises(FileNotFoundError, match=r"no label file.*b\.cls"):
        ImageFolderSource(tmp_path, label=True)
    src = ImageFolderSource(tmp_path, label=True, missing_sidecar="skip")
    assert reason(src, 1)[:2] == ("missing_label", "b.png")


def test_class_folders_are_indexed_in_sorted_order(tmp_path):
    image(tmp_path / "zebra" / "1.png", 1)
    image(tmp_path / "ant" / "2.png", 2)
    image(tmp_path / "ant" / "3.png", 3)
    (tmp_path / "notes").mkdir()  # a folder without images is no class
    src = ImageFolderSource(tmp_path, label=True)
    assert src.class_folders and src.classes == ["ant", "zebra"]
    assert [(src[i]["id"], int(src[i]["label"])) for i in range(3)] == [
        ("ant/2.png", 0), ("ant/3.png", 0), ("zebra/1.png", 1)]
    image(tmp_path / "stray.png")  # one image outside the class folders
    assert not ImageFolderSource(tmp_path, label=True, missing_sidecar="skip").class_folders
    with pytest.raises(FileNotFoundError, match=r"not in a class folder.*stray\.png"):
        ImageFolderSource(tmp_path, label=True, class_folders=True)
    src = ImageFolderSource(tmp_path, label=True, class_folders=True, missing_sidecar="skip")
    assert src.paths[2] == "stray.png" and int(src[3]["label"]) == 1
    assert reason(src, 2)[:2] == ("missing_label", "stray.png")
    with pytest.raises(ValueError, match="class_folders=True needs label=True"):
        ImageFolderSource(tmp_path, class_folders=True)
