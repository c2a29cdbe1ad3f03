"""The built-in word encoder: deterministic, T5-like interface."""

from __future__ import annotations

import numpy as np
import pytest

from jdit.text import WordEncoder


def test_encode_is_deterministic_and_masks_padding():
    enc = WordEncoder.from_texts(["a red circle in the top left", "a blue square"], dim=16,
                                 max_length=10)
    f1, m1 = enc.encode(["a red circle", ""])
    f2, _ = WordEncoder.from_texts(["a blue square", "a red circle in the top left"], dim=16,
                                   max_length=10).encode(["a red circle", ""])
    np.testing.assert_array_equal(f1, f2)  # vocabulary order does not depend on input order
    assert f1.shape == (2, 10, 16) and f1.dtype == np.float32
    np.testing.assert_array_equal(m1, [[1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [1] + [0] * 9])
    assert np.all(f1[0, 4:] == 0) and np.any(f1[1, 0] != 0)  # the null caption is <eos>
    # same word, different position: same word half, different position half
    g, _ = enc.encode(["red red"])
    np.testing.assert_array_equal(g[0, 0, :8], g[0, 1, :8])
    assert not np.array_equal(g[0, 0, 8:], g[0, 1, 8:])


def test_unknown_words_and_errors():
    enc = WordEncoder.from_texts(["a red circle"], dim=8, max_length=4)
    # an unknown word is named, not quietly turned into <unk>
    with pytest.raises(ValueError, match=r"'a purple circle': 'purple' not in this model's "
                                         r"vocabulary of 3 words \(a, circle, red\)"):
        enc.encode(["a purple circle"])
    with pytest.raises(ValueError, match="'eos', 'unk' not in"):
        enc.encode(["unk eos"])
    with pytest.raises(ValueError, match="max_length 4 allows 3"):
        enc.encode(["a red circle again"])
    with pytest.raises(TypeError):
        enc.encode("a red circle")
    with pytest.raises(ValueError, match="even"):
        WordEncoder(("a",), dim=7)
