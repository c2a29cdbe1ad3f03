"""The bucket resize and centre crop against the official pipelines' torchvision transforms."""

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")


class T:
    """torchvision.transforms' Resize and CenterCrop on PIL images, as torchvision 0.28 does
    them (``Image.resize((w, h), filter)``; crop offsets ``int(round((size - crop) / 2))``, a
    short side zero-padded first). torchvision itself cannot be in the test extra: its PyPI
    wheel carries CUDA-built operators that fail to load beside the CPU torch, and transformers
    then fails to import. This reference was checked equal to torchvision 0.28.0 on the cases
    below (2026-12-06, issue 18's notes)."""

    class InterpolationMode:
        BICUBIC, LANCZOS = Image.Resampling.BICUBIC, Image.Resampling.LANCZOS

    class Resize:
        def __init__(self, size, interpolation):
            self.size, self.interpolation = size, interpolation

        def __call__(self, im):
            return im.resize((self.size[1], self.size[0]), self.interpolation)

    class CenterCrop:
        def __init__(self, size):
            self.size = size

        def __call__(self, im):
            th, tw = self.size
            w, h = im.size
            if tw > w or th > h:
                padded = Image.new(im.mode, (max(w, tw), max(h, th)))
                padded.paste(im, ((max(tw - w, 0)) // 2, (max(th - h, 0)) // 2))
                im, (w, h) = padded, padded.size
            top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
            return im.crop((left, top, left + tw, top + th))

    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, im):
            for step in self.steps:
                im = step(im)
            return im


from jdit.data.buckets import closest_bucket  # noqa: E402 (after the importorskips)
from jdit.data.loader import resize_center_crop, to_unit_range  # noqa: E402


def _official(image: np.ndarray, bucket: tuple[int, int], interpolation) -> np.ndarray:
    """PixArt's InternalDataMS transform: resize the side with the larger scale to the bucket
    and the other to int(side * scale), then CenterCrop(bucket) (torchvision, on a PIL image)."""
    ori_h, ori_w = image.shape[:2]
    if bucket[0] / ori_h > bucket[1] / ori_w:
        size = bucket[0], int(ori_w * bucket[0] / ori_h)
    else:
        size = int(ori_h * bucket[1] / ori_w), bucket[1]
    pipeline = T.Compose([T.Resize(size, interpolation=interpolation), T.CenterCrop(bucket)])
    return np.asarray(pipeline(Image.fromarray(image)))


@pytest.mark.parametrize("resample", ["bicubic", "lanczos"])
def test_resize_center_crop_equals_the_official_transform(resample):
    interpolation = {"bicubic": T.InterpolationMode.BICUBIC,
                     "lanczos": T.InterpolationMode.LANCZOS}[resample]
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in s) for s in rng.integers(9, 300, size=(40, 2))]
    sizes += [(256, 256), (255, 256), (100, 301), (301, 100), (97, 33), (64, 256)]
    targets = [(64, 64), (48, 80), (80, 48), (17, 23)]
    checked = 0
    for (h, w) in sizes:
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        for bucket in targets + [closest_bucket(h, w, 256)]:
            ours = resize_center_crop(image, *bucket, resample=resample)
            np.testing.assert_array_equal(ours, _official(image, bucket, interpolation),
                                          err_msg=f"{(h, w)} -> {bucket}")
            checked += 1
    assert checked == len(sizes) * (len(targets) + 1)


def test_scaling_matches_to_tensor_and_normalize():
    """ToTensor (x / 255) then Normalize(0.5, 0.5) ((v - 0.5) / 0.5), in float32 as torch does."""
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    theirs = (x.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_allclose(to_unit_range(x), theirs, atol=1e-6)
