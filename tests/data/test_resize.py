"""The bucket resize and centre crop against the official pipelines' torchvision transforms."""

import importlib
import sys
import types

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")


def _torchvision_transforms():
    """torchvision's transforms. Its PyPI wheel ships operators built against CUDA torch, which
    cannot load beside the CPU torch of the test extra: registering their fake kernels fails at
    import. The transforms used here are pure Python over Pillow and need none of them, so that
    one registration module is stubbed when the import fails."""
    try:
        return importlib.import_module("torchvision.transforms")
    except ImportError:
        pytest.skip("torchvision is not installed")
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
        return importlib.import_module("torchvision.transforms")


T = _torchvision_transforms()

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
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    theirs = T.Compose([T.ToTensor(), T.Normalize([.5], [.5])])(Image.fromarray(x)).numpy()
    np.testing.assert_allclose(to_unit_range(x).transpose(2, 0, 1), theirs, atol=1e-6)
