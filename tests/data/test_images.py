"""decode_image / image_size: every pixel format to uint8 RGB, and bad files refused by reason."""

import io
import pickle

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")
ImageFile = pytest.importorskip("PIL.ImageFile")
ImageOps = pytest.importorskip("PIL.ImageOps")

from jdit.data import images  # noqa: E402 (after the importorskips)
from jdit.data.images import decode_image, image_size  # noqa: E402
from jdit.data.sources import BadExample  # noqa: E402


def encode(im, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_bad_example_carries_reason_and_id_and_pickles():
    e = BadExample("empty_caption", "a.txt: caption is empty", "a.png")
    assert isinstance(e, ValueError) and str(e) == "a.txt: caption is empty"
    back = pickle.loads(pickle.dumps(e))
    assert (back.reason, back.message, back.example_id) == ("empty_caption", str(e), "a.png")
    with pytest.raises(ValueError, match="snake_case"):
        BadExample("Not A Code", "x")


def test_rgb_and_grey_are_exact(tmp_path):
    rgb = noise(5, 7)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    out = decode_image(path)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(grey), "PNG")),
                                  np.repeat(grey[..., None], 3, -1))
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1")
    np.testing.assert_array_equal(decode_image(encode(bits, "PNG"))[..., 1],
                                  [[0, 255], [255, 0]])


def test_alpha_is_composited_on_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[..., 3] = [[255, 0, 51], [255, 0, 51]]  # opaque, transparent, 20 %
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[0], [[200, 100, 0], [255, 255, 255], [244, 224, 204]])
    la = np.stack([np.full((2, 2), 40, np.uint8), np.array([[255, 0], [0, 255]], np.uint8)], -1)
    out = decode_image(encode(Image.fromarray(la, "LA"), "PNG"))
    np.testing.assert_array_equal(out[..., 0], [[40, 255], [255, 40]])


def test_palette_with_and_without_transparency():
    index = np.array([[0, 1], [2, 1]], np.uint8)
    palette = [10, 20, 30, 200, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    im = Image.fromarray(index, "P")
    im.putpalette(palette)
    expected = np.array([[[10, 20, 30], [200, 0, 0]], [[0, 0, 255], [200, 0, 0]]], np.uint8)
    np.testing.assert_array_equal(decode_image(encode(im, "PNG")), expected)
    expected[0, 1] = expected[1, 1] = 255  # index 1 is transparent: white
    np.testing.assert_array_equal(decode_image(encode(im, "PNG", transparency=1)), expected)
    np.testing.assert_array_equal(decode_image(encode(im, "GIF", transparency=1)), expected)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32768, 65535]], np.uint16)
    scaled = [[0, 1, 4, 128, 255]]  # round(v * 255 / 65535)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # a real 16-bit PNG
    np.testing.assert_array_equal(decode_image(path)[..., 2], scaled)
    big_endian = Image.fromarray(values.astype(">u2"))
    assert big_endian.mode == "I;16B"
    np.testing.assert_array_equal(decode_image(encode(big_endian, "TIFF"))[..., 0], scaled)
    wide = Image.fromarray(values.astype(np.int32))
    assert wide.mode == "I"
    np.testing.assert_array_equal(decode_image(encode(wide, "TIFF"))[..., 0], scaled)
    negative = Image.fromarray(np.array([[-5, 3]], np.int32))
    with pytest.raises(BadExample, match=r"x\.tif: I image with values outside the 16-bit"):
        decode_image(encode(negative, "TIFF"), name="x.tif")
    floats = Image.fromarray(np.zeros((2, 2), np.float32))
    with pytest.raises(BadExample, match="mode F") as e:
        decode_image(encode(floats, "TIFF"))
    assert e.value.reason == "unreadable_image"


def test_cmyk_jpeg_becomes_rgb():
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    data = encode(im, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data).astype(int)
    assert out.shape == (16, 16, 3)
    assert np.abs(out - [255, 0, 0]).max() <= 8


def test_every_exif_orientation_matches_pillow(tmp_path):
    pixels = noise(3, 5)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"  # lossless: pixels can be compared exactly
        Image.fromarray(pixels).save(path, exif=exif)
        expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        np.testing.assert_array_equal(decode_image(path), expected, err_msg=str(orientation))
        assert image_size(path) == expected.shape[:2]


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    left_black = np.zeros((16, 32, 3), np.uint8)
    left_black[:, 16:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the left edge goes to the top
    path = tmp_path / "photo.jpg"
    Image.fromarray(left_black).save(path, exif=exif, quality=95)
    out = decode_image(path)
    assert out.shape == (32, 16, 3) and image_size(path) == (32, 16)
    assert out[:14].max() < 20 and out[18:].min() > 235


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused_never_returned_grey(tmp_path, fmt):
    data = encode(Image.fromarray(noise(24, 20)), fmt)
    whole = decode_image(data)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadExample, match=rf"cut\.{fmt.lower()}: cannot read image") as e:
        decode_image(path)
    assert e.value.reason == "unreadable_image"
    for cut in range(1, len(data), 5):  # wherever the file ends: an error or every pixel
        try:
            out = decode_image(data[:cut])
        except BadExample as e:
            assert e.reason == "unreadable_image"
            continue
        np.testing.assert_array_equal(out, whole, err_msg=f"cut at {cut} of {len(data)}")


def test_non_images_and_missing_files(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("notes.png", "empty.jpg"):
        with pytest.raises(BadExample, match=rf"{name}: cannot read image \(not an image") as e:
            decode_image(tmp_path / name)
        assert e.value.reason == "unreadable_image" and e.value.example_id is None
        with pytest.raises(BadExample, match=name):
            image_size(tmp_path / name)
    with pytest.raises(BadExample, match="gone.png: image file does not exist") as e:
        decode_image(tmp_path / "gone.png")
    assert e.value.reason == "missing_image"
    with pytest.raises(BadExample, match="<image bytes>"):
        decode_image(b"\x89PNG garbage")


def test_decompression_bombs_are_refused(monkeypatch):
    data = encode(Image.fromarray(noise(10, 10)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    with pytest.raises(BadExample, match="bomb.png: cannot read image.*DecompressionBomb"):
        decode_image(data, name="bomb.png")


def test_pillow_set_to_pad_truncated_images_is_warned_about(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(images, "_TRUNCATION_WARNED", False)
    data = encode(Image.fromarray(noise(4, 4)), "PNG")
    with pytest.warns(RuntimeWarning, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(data)
