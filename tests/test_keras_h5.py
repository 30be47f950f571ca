"""The Keras HDF5 converter: every layout Keras writes, and one clear line for every bad file."""
import shutil

import h5py
import numpy as np
import pytest

from dreamjax.models.inception_v3 import ARCH
from dreamjax.weights.keras_h5 import WeightsError, convert, read_keras_h5
from dreamjax.weights.keras_h5 import load_keras_h5 as _load
from tests.keras_fixtures import LAYOUTS, keras_setup, other_architecture_file


def load_keras_h5(path, include_top=False):
    return _load(path, ARCH, include_top)


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    st = keras_setup(tmp_path_factory)
    ref = {top: load_keras_h5(st["files"][("official", top)], top) for top in (True, False)}
    return st, ref


def _assert_same(a, b, path=()):
    assert isinstance(a, dict) == isinstance(b, dict), path
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for k in a:
            _assert_same(a[k], b[k], path + (k,))
    else:
        assert a.dtype == np.float32 and np.array_equal(a, b), path


@pytest.mark.parametrize("file_top,include_top", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_keras_layout_gives_the_same_variables(keras_files, layout, file_top, include_top):
    """The official layout is checked numerically against Keras in test_inception_v3."""
    st, ref = keras_files
    _assert_same(load_keras_h5(st["files"][(layout, file_top)], include_top), ref[include_top])


def test_official_layout_facts(keras_files):
    st, _ = keras_files
    layout, layers = read_keras_h5(st["files"][("official", True)], ARCH, True)
    assert layout == "keras-legacy-weights" and len(layers) == 189
    assert [n for n, _ in layers[:3]] == ["conv2d_1", "batch_normalization_1", "conv2d_2"]
    assert layers[-1][0] == "predictions"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_notop_file_when_top_is_asked(keras_files, layout):
    st, _ = keras_files
    with pytest.raises(WeightsError, match=r"has no classifier top .*include_top=True was asked"):
        load_keras_h5(st["files"][(layout, False)], include_top=True)


def test_other_architecture_names_first_misfit(keras_files):
    path = other_architecture_file(keras_files[0]["dir"])
    with pytest.raises(WeightsError) as e:
        load_keras_h5(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert "layer #0 'conv2d" in msg and "[(3, 3, 3, 8)]" in msg and "stem/conv1/conv needs [(3, 3, 3, 32)]" in msg


def test_not_hdf5(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(WeightsError, match=r"weights\.h5: not an HDF5 file; expected Keras"):
        load_keras_h5(path)
    path.write_bytes(b"PK\x03\x04 zipped")
    with pytest.raises(WeightsError, match=r"not an HDF5 file \(a zip archive: a Keras \.keras file\?"):
        load_keras_h5(path)
    with pytest.raises(WeightsError, match=r"nope\.h5: no such weights file"):
        load_keras_h5(tmp_path / "nope.h5")


def test_truncated_file(keras_files, tmp_path):
    src = keras_files[0]["files"][("official", False)]
    path = tmp_path / "cut.h5"
    with open(src, "rb") as f:
        path.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(WeightsError, match=r"cut\.h5: truncated or corrupt HDF5 file \(") as e:
        load_keras_h5(path)
    assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


def test_corrupt_dataset(keras_files, tmp_path):
    src = keras_files[0]["files"][("official", False)]
    path = tmp_path / "flipped.h5"
    shutil.copy(src, path)
    with h5py.File(path, "r") as f:  # find where the first kernel's bytes live, then overwrite the header before it
        offset = f["conv2d_1/conv2d_1/kernel:0"].id.get_offset()
    with open(path, "r+b") as f:
        f.seek(offset - 4096)
        f.write(b"\xff" * 4096)
    with pytest.raises(WeightsError, match=r"flipped\.h5: truncated or corrupt HDF5 file"):
        load_keras_h5(path)


def test_hdf5_without_keras_weights(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(WeightsError, match=r"data\.h5: HDF5 file without Keras weights"):
        load_keras_h5(path)


def _zeros_layers(include_top):
    return [(e.unit.replace("/", "_"), [np.zeros(s, np.float32) for _, s in e.leaves])
            for e in ARCH.expected(include_top)]


def test_convert_lists_missing_and_extra_sorted():
    layers = _zeros_layers(False)
    with pytest.raises(WeightsError, match=r"src: not InceptionV3 weights: 183 weighted layers in the file, 188 in "
                                           r"the model; missing 5: \[mixed10/branch1x1/bn, .*/conv\]; extra 0: \[\]"):
        convert(layers[:-5], ARCH, False, source="src")
    extra = [("zz_head", [np.zeros(3)]), ("aa_head", [np.zeros(3)])]
    with pytest.raises(WeightsError, match=r"missing 0: \[\]; extra 2: \[aa_head, zz_head\]"):
        convert(layers + extra, ARCH, False, source="src")


def test_convert_is_pure_and_maps_leaves():
    layers = _zeros_layers(True)
    layers[1] = (layers[1][0], [np.full(32, 1.0), np.full(32, 2.0), np.full(32, 3.0)])  # stem conv1 BN
    v = convert(layers, ARCH, True)
    bn = v["params"]["stem"]["conv1"]["bn"], v["batch_stats"]["stem"]["conv1"]["bn"]
    assert (bn[0]["bias"] == 1).all() and (bn[1]["mean"] == 2).all() and (bn[1]["var"] == 3).all()
    assert v["params"]["predictions"]["kernel"].shape == (2048, 1000)
