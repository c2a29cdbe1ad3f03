"""The torch-free checkpoint readers against torch and safetensors themselves."""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import numpy as np
import pytest
import safetensors.torch
import torch

from jdit.weights import (
    extract_state_dict,
    load_torch_checkpoint,
    read_safetensors,
    read_safetensors_folder,
    write_safetensors,
)


def test_torch_reader_matches_torch_load(tmp_path):
    base = torch.randn(6, 5)
    sd = collections.OrderedDict(
        f32=torch.randn(3, 4), f16=torch.randn(7).half(), bf16=torch.randn(2, 3).bfloat16(),
        f64=torch.randn(2).double(), i64=torch.arange(5), i8=torch.arange(-3, 3, dtype=torch.int8),
        b=torch.tensor([True, False]), transposed=base.t(), row_view=base[2], strided=base[::2, 1::2],
        scalar=torch.tensor(3.5), empty=torch.zeros(0, 4),
        param=torch.nn.Parameter(torch.randn(2, 2)),
    )
    path = tmp_path / "ck.pth"
    torch.save({"state_dict": sd, "epoch": 3, "note": "hi"}, path)
    obj = load_torch_checkpoint(path)
    assert obj["epoch"] == 3 and obj["note"] == "hi"
    ours = extract_state_dict(obj)
    ref = torch.load(path, weights_only=True)["state_dict"]
    assert set(ours) == set(ref)
    for k, v in ref.items():
        want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        got = ours[k].astype(np.float32) if v.dtype == torch.bfloat16 else ours[k]
        assert got.shape == tuple(v.shape), k
        np.testing.assert_array_equal(got, want, err_msg=k)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/jdit_pwned",))


def test_pickled_code_is_never_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _Evil()}, path)
    if os.path.exists("/tmp/jdit_pwned"):
        os.unlink("/tmp/jdit_pwned")
    obj = load_torch_checkpoint(path)
    assert not os.path.exists("/tmp/jdit_pwned")
    assert "opaque posix.system" in repr(obj["payload"]) or "opaque os.system" in repr(obj["payload"])
    np.testing.assert_array_equal(extract_state_dict(obj)["w"], np.ones(2, np.float32))


class _Storage:
    pass


class _View:
    def __init__(self, size):
        self.size = size

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (_Storage(), 0, self.size, (1,), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    numel = 4  # what the storage declares

    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", self.numel) if isinstance(obj, _Storage) else None


def _write_archive(path, obj, storage: bytes, numel=4, compression=zipfile.ZIP_STORED):
    import io

    buf = io.BytesIO()
    pickler = _Pickler(buf, protocol=2)
    pickler.numel = numel
    pickler.dump(obj)
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", storage)


def test_out_of_bounds_tensor_view_is_rejected(tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes()
    _write_archive(tmp_path / "ok.pth", {"w": _View((4,))}, data)
    np.testing.assert_array_equal(load_torch_checkpoint(tmp_path / "ok.pth")["w"], np.arange(4.0))
    _write_archive(tmp_path / "bad.pth", {"w": _View((1000,))}, data)  # 1000 floats of a 4-float storage
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad.pth'}: tensor view .* exceeds storage"):
        load_torch_checkpoint(tmp_path / "bad.pth")


def test_declared_sizes_are_checked_against_the_files_bytes_before_reading(tmp_path):
    data = np.arange(4, dtype=np.float32).tobytes()
    # a 16-byte storage declaring 10^12 floats: refused before anything is allocated
    _write_archive(tmp_path / "huge.pth", {"w": _View((4,))}, data, numel=10**12)
    with pytest.raises(ValueError, match=r"storage 0 declares 1000000000000 x 4 bytes but the "
                                         r"file holds 16 bytes"):
        load_torch_checkpoint(tmp_path / "huge.pth")
    _write_archive(tmp_path / "zipped.pth", {"w": _View((4,))}, data,
                   compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match="storage 0 is compressed"):
        load_torch_checkpoint(tmp_path / "zipped.pth")


def test_unsupported_storage_types_name_the_tensor(tmp_path):
    path = tmp_path / "complex.pth"
    torch.save({"ok": torch.ones(2), "phase": torch.zeros(3, dtype=torch.complex64)}, path)
    obj = load_torch_checkpoint(path)
    with pytest.raises(ValueError, match=f"{path}: tensor 'phase' is stored as "
                                         r"torch.ComplexFloatStorage \(storage \d+\), which jdit "
                                         "does not read; supported: BFloat16Storage"):
        extract_state_dict(obj)


def test_legacy_and_non_checkpoint_files_get_a_clear_error(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(b"\x80\x02not a zip")
    with pytest.raises(ValueError, match="not a zip-format torch checkpoint"):
        load_torch_checkpoint(path)
    with pytest.raises(ValueError, match="no tensor state dict"):
        extract_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match="no entry 'ema'"):
        extract_state_dict({"model": {}}, key="ema")


def test_safetensors_round_trip_and_torch_written_files(tmp_path):
    torch_file = tmp_path / "t.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.arange(3)}
    safetensors.torch.save_file(tensors, torch_file)
    got = read_safetensors(torch_file)
    np.testing.assert_array_equal(got["a"], tensors["a"].numpy())
    np.testing.assert_array_equal(got["b"].astype(np.float32), tensors["b"].float().numpy())
    np.testing.assert_array_equal(got["c"], tensors["c"].numpy())
    ours = tmp_path / "o.safetensors"
    write_safetensors(ours, got, metadata={"k": "v"})
    back = safetensors.torch.load_file(ours)
    assert set(back) == {"a", "b", "c"} and back["b"].dtype == torch.bfloat16
    assert torch.equal(back["b"], tensors["b"]) and torch.equal(back["a"], tensors["a"])


def test_sharded_index_and_corrupt_files(tmp_path):
    safetensors.torch.save_file({"x": torch.ones(2)}, tmp_path / "m-1.safetensors")
    safetensors.torch.save_file({"y": torch.zeros(3)}, tmp_path / "m-2.safetensors")
    (tmp_path / "m.safetensors.index.json").write_text(
        '{"weight_map": {"x": "m-1.safetensors", "y": "m-2.safetensors"}}')
    got = read_safetensors_folder(tmp_path, "m")
    assert got["x"].shape == (2,) and got["y"].shape == (3,)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        read_safetensors(bad)
    for header, message in [(b"[1, 2]", "a JSON object mapping tensor names to entries was "
                                        "expected, got a list"),
                            (b'{"w": {"dtype": "F32", "data_offsets": [0, 4]}}',
                             "tensor 'w' has a malformed header entry"),
                            (b'{"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}',
                             "tensor 'w' has a malformed header entry"),
                            (b'{"w": 3}', "tensor 'w' has a malformed header entry")]:
        bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
        with pytest.raises(ValueError, match=f"{bad}: .*{message}"):
            read_safetensors(bad)
    with pytest.raises(FileNotFoundError):
        read_safetensors_folder(tmp_path, "absent")
