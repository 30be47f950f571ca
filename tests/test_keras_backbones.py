"""ResNet50 and VGG16: Keras layer order, numeric parity with Keras 3, converter layouts, bad files.

Keras models with random weights (and random biases, BatchNorm scales and statistics) are written
by Keras itself in the legacy HDF5 layout (the official files' layout) and as ``.weights.h5``,
loaded through the converter, and compared with Keras' own forward pass and gradient: every tap
and the logits within 1e-4 of max |ref| at three sizes, the DLwP loss gradient within 1e-3.

    python -m pytest tests/test_keras_backbones.py           # ~1 min on 2 CPU cores
    python -m pytest tests/test_keras_backbones.py -m slow   # the other sizes, 224 px, VGG16's 138M-param top
"""
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dreamjax import load_backbone
from dreamjax.models import resnet50, vgg16
from dreamjax.models.keras_apps import caffe_deprocess, caffe_preprocess
from dreamjax.models.ops import prepare_dream_variables
from dreamjax.weights.keras_h5 import WeightsError, load_keras_h5
from tests.keras_fixtures import keras_resnet50, keras_vgg16, write_layout
from tests.test_store import _Handler, _Server

PAINTING = Path(__file__).resolve().parents[1] / "dreamjax/data/paintings/van_gogh_starry_night.jpg"
MODELS = {"resnet50": (resnet50.ResNet50, resnet50.ARCH), "vgg16": (vgg16.VGG16, vgg16.ARCH)}
# Three sizes each; one runs by default, the others with -m slow (the default suite has a budget).
SIZES = {"resnet50": [pytest.param((32, 32), marks=pytest.mark.slow), (75, 101),
                      pytest.param((128, 128), marks=pytest.mark.slow)],
         "vgg16": [pytest.param((32, 32), marks=pytest.mark.slow), (48, 40),
                   pytest.param((64, 64), marks=pytest.mark.slow)]}
DLWP = {"resnet50": ({"conv3_block2_out": 1.0, "conv3_block4_out": 1.5, "conv4_block2_out": 2.0,
                      "conv4_block6_out": 2.5}, (96, 128)),
        "vgg16": ({"block3_conv3": 1.0, "block4_conv3": 1.5, "block4_pool": 2.0, "block5_conv3": 2.5}, (96, 128))}
GRAD_CASES = ["resnet50", pytest.param("vgg16", marks=pytest.mark.slow)]  # VGG16's: 20 s, exact anyway
_STATE: dict = {}


def _keras(name):
    """Per session: Keras models and their files, ``{"top", "notop", "files": {(layout, top): path}}``."""
    if name not in _STATE:
        import tempfile

        directory = Path(tempfile.mkdtemp(prefix=f"dreamjax-{name}-"))
        if name == "resnet50":
            top, notop = keras_resnet50()
            files = {(layout, t): write_layout(top if t else notop, layout, directory,
                                               f"{name}_{'top' if t else 'notop'}")
                     for layout in ("official", "keras3-weights") for t in (True, False)}
        else:  # VGG16's top is 224x224 only and 528 MB on disk: the notop model here, the top under slow
            top, notop = None, keras_vgg16(include_top=False)
            files = {(layout, False): write_layout(notop, layout, directory, f"{name}_notop")
                     for layout in ("official", "keras3-weights")}
        _STATE[name] = {"top": top, "notop": notop, "files": files, "dir": directory}
    return _STATE[name]


def _image(h, w):
    im = Image.open(PAINTING).convert("RGB").resize((w, h))
    return np.asarray(caffe_preprocess(jnp.asarray(np.asarray(im, np.float32)[None])))


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _same(a, b, path=()):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for k in a:
            _same(a[k], b[k], path + (k,))
    else:
        assert np.array_equal(a, b), path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_keras_layer_order_matches_keras(name):
    """Our weighted-layer order, from the model's own graph, equals Keras' Functional.layers order."""
    st = _keras(name)
    model = st["top"] or st["notop"]
    theirs = [layer.name for layer in model.layers if layer.weights]
    arch = MODELS[name][1]
    ours = [e.unit.replace("/", "_") for e in arch.expected(st["top"] is not None)]
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_legacy_and_keras3_layouts_give_the_same_variables(name):
    st, arch = _keras(name), MODELS[name][1]
    tops = (True, False) if st["top"] is not None else (False,)
    for top in tops:
        ref = load_keras_h5(st["files"][("official", top)], arch, top)
        _same(load_keras_h5(st["files"][("keras3-weights", top)], arch, top), ref)
    if st["top"] is not None:  # a file with the top serves include_top=False
        _same(load_keras_h5(st["files"][("official", True)], arch, False),
              load_keras_h5(st["files"][("official", False)], arch, False))


def _parity(name, size, top):
    import keras

    st = _keras(name)
    cls, arch = MODELS[name]
    model = st["top"] if top else st["notop"]
    taps = resnet50.TAPS if name == "resnet50" else vgg16.TAPS
    outputs = [model.get_layer(t).output for t in taps] + ([model.output] if top else [])
    feat = keras.Model(model.input, outputs)
    x = _image(*size)
    ref = [np.asarray(o) for o in feat(x, training=False)]
    variables = load_keras_h5(st["files"][("official", top)], arch, top)
    logits, out = jax.jit(cls(include_top=top).apply)(variables, x)
    names = list(taps) + (["logits"] if top else [])
    got = [out[t] for t in taps] + ([logits] if top else [])
    errors = {n: _rel(g, r) for n, g, r in zip(names, got, ref)}
    print(f"{name} parity {size}: max {max(errors.values()):.1e} ({max(errors, key=errors.get)})")
    bad = [n for n in names if not errors[n] <= 1e-4]
    assert not bad, f"first tap off at {size}: {bad[0]} max|diff|/max|ref| = {errors[bad[0]]:.2e} (> 1e-4)"


@pytest.mark.parametrize("size", SIZES["resnet50"], ids=lambda s: f"{s[0]}x{s[1]}")
def test_resnet50_forward_parity_with_keras(size):
    _parity("resnet50", size, top=True)


@pytest.mark.parametrize("size", SIZES["vgg16"], ids=lambda s: f"{s[0]}x{s[1]}")
def test_vgg16_forward_parity_with_keras(size):
    _parity("vgg16", size, top=False)


@pytest.mark.slow
def test_resnet50_forward_parity_224():
    _parity("resnet50", (224, 224), top=True)


@pytest.mark.slow
def test_vgg16_with_top_parity_224(tmp_path):
    """The full VGG16 (Flatten top, 224x224 only): every tap and the logits, both layouts."""
    import keras

    model = keras_vgg16(include_top=True)
    files = {layout: write_layout(model, layout, tmp_path, "vgg16_top") for layout in ("official", "keras3-weights")}
    variables = load_keras_h5(files["official"], vgg16.ARCH, True)
    _same(load_keras_h5(files["keras3-weights"], vgg16.ARCH, True), variables)
    feat = keras.Model(model.input, [model.get_layer(t).output for t in vgg16.TAPS] + [model.output])
    x = _image(224, 224)
    ref = [np.asarray(o) for o in feat(x, training=False)]
    logits, out = jax.jit(vgg16.VGG16(include_top=True).apply)(variables, x)
    errors = {n: _rel(g, r) for n, g, r in zip([*vgg16.TAPS, "logits"], [*(out[t] for t in vgg16.TAPS), logits], ref)}
    print(f"vgg16 top parity 224: max {max(errors.values()):.1e}")
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize("name", GRAD_CASES)
def test_dream_gradient_parity_with_keras(name):
    """d(DLwP loss)/d(input) agrees with Keras' gradient (jax.grad through stateless_call), on both
    gradient paths: JAX's transpose rules and the dream path's precomputed backward kernels."""
    import keras

    st = _keras(name)
    cls, arch = MODELS[name]
    weights, size = DLWP[name]
    model = st["notop"]
    feat = keras.Model(model.input, {t: model.get_layer(t).output for t in weights})
    tv = [v.value for v in feat.trainable_variables]
    ntv = [v.value for v in feat.non_trainable_variables]

    def loss(acts):
        return sum(w * jnp.mean(acts[t][:, 2:-2, 2:-2, :] ** 2) for t, w in weights.items())

    # A trace of noise breaks the exact ties of flat painting regions (see test_inception_v3).
    x = _image(*size) + np.random.default_rng(0).normal(0, 0.1, (1, *size, 3)).astype(np.float32)
    g_keras = np.asarray(jax.jit(jax.grad(lambda x: loss(feat.stateless_call(tv, ntv, x, training=False)[0])))(x))
    variables = load_keras_h5(st["files"][("official", False)], arch, False)
    dream_vars = prepare_dream_variables(cls(), variables, (1, 32, 32, 3))
    taps = tuple(weights)
    grad = jax.jit(jax.grad(lambda v, x: loss(cls().apply(v, x, taps=taps)[1]), argnums=1))
    for path, v in (("autodiff", variables), ("backward kernels", dream_vars)):
        g = np.asarray(grad(v, x))
        rel = float(np.linalg.norm(g - g_keras) / np.linalg.norm(g_keras))
        print(f"{name} grad parity {size} ({path}): relative L2 error {rel:.1e}")
        assert rel <= 1e-3, path


def test_caffe_preprocessing_matches_keras():
    from keras.applications import imagenet_utils

    px = np.random.default_rng(0).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    ref = imagenet_utils.preprocess_input(px.copy(), mode="caffe")
    np.testing.assert_allclose(np.asarray(caffe_preprocess(jnp.asarray(px))), ref, atol=1e-4)
    np.testing.assert_allclose(np.asarray(caffe_deprocess(caffe_preprocess(jnp.asarray(px)))), px, atol=1e-4)


# --- bad input ------------------------------------------------------------------------------------

def test_vgg16_weights_given_to_resnet50_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMJAX_HOME", str(tmp_path))
    path = _keras("vgg16")["files"][("official", False)]
    for include_top in (False, True):
        with pytest.raises(WeightsError) as e:
            load_backbone("resnet50", weights=str(path), include_top=include_top)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg
        assert "holds VGG16 weights (no top" in msg and "not ResNet50 weights" in msg and "model=vgg16" in msg
    path = _keras("resnet50")["files"][("keras3-weights", True)]
    with pytest.raises(WeightsError, match=r"holds ResNet50 weights \(with top.*not VGG16 weights; use model=resnet50"):
        load_backbone("vgg16", weights=str(path))


@pytest.mark.parametrize("layout", ["official", "keras3-weights"])
def test_notop_file_when_top_is_asked_names_the_file(monkeypatch, tmp_path, layout):
    monkeypatch.setenv("DREAMJAX_HOME", str(tmp_path))
    path = _keras("resnet50")["files"][(layout, False)]
    with pytest.raises(WeightsError, match=r"has no classifier top .*include_top=True was asked; use the full "
                                           r"weights file resnet50_weights_tf_dim_ordering_tf_kernels\.h5"):
        load_backbone("resnet50", weights=str(path), include_top=True)
    path = _keras("vgg16")["files"][(layout, False)]
    with pytest.raises(WeightsError, match=r"use the full weights file vgg16_weights_tf_dim_ordering_tf_kernels\.h5"):
        load_backbone("vgg16", weights=str(path), include_top=True)


def test_vgg16_top_needs_224():
    module = vgg16.VGG16(include_top=True)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    out = jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 48, 64, 3)), taps=["block5_pool"])[1], shapes)
    assert out["block5_pool"].shape == (1, 1, 2, 512)  # taps: any size
    with pytest.raises(ValueError, match=r"top .* needs 224x224 inputs"):
        jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 96, 96, 3))), shapes)


# --- download and cache -----------------------------------------------------------------------------

@pytest.fixture
def server(monkeypatch, tmp_path):
    """A local HTTP server standing in for Keras' storage bucket (test_store's handler)."""
    from dreamjax.weights import store

    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests = {}, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("DREAMJAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(store.URL_ENV, f"http://127.0.0.1:{srv.server_address[1]}/w/")
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("name", ["inception_v3", "resnet50", "vgg16"])
def test_official_urls_and_hashes_are_keras_own(name):
    """Every file name, URL and md5 is the one in the installed Keras' own application source."""
    import importlib
    import inspect

    from dreamjax.models.keras_apps import KERAS_ARCHS
    from dreamjax.weights import store

    arch = KERAS_ARCHS[name]
    module = {"resnet50": "resnet"}.get(name, name)
    source = inspect.getsource(importlib.import_module(f"keras.src.applications.{module}"))
    for top in (True, False):
        fname, md5 = arch.files[top]
        assert md5.startswith("md5:") and md5[4:] in source, (name, top)
        url = store.weights_url(arch, top)
        assert url.startswith("https://storage.googleapis.com/tensorflow/keras-applications/") and url.endswith(fname)
        joined = source.replace('"\n    "', "")  # Keras splits long URL literals over lines
        assert (fname in source or "{weights_name}" in source) and arch.base_url.rstrip("/") in joined


def test_resnet50_auto_downloads_checks_md5_converts_once(server, monkeypatch):
    """weights='auto': the real download code against a local server (the Keras URL is unreachable
    here), md5-checked, converted once, then served from the converted cache."""
    import hashlib

    from dreamjax.weights import store

    path = _keras("resnet50")["files"][("official", False)]
    body = path.read_bytes()
    name = resnet50.ARCH.files[False][0]
    server.files[f"/w/{name}"] = body
    monkeypatch.setitem(resnet50.ARCH.files, False, (name, f"md5:{hashlib.md5(body).hexdigest()}"))
    bb = load_backbone("resnet50", weights="auto")
    assert bb.weights_id == store.sha256_file(path) and server.requests == [f"/w/{name}"]
    assert store.converted_path(resnet50.ARCH, bb.weights_id, False).is_file()

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(store, "load_keras_h5", boom)
    again = load_backbone("resnet50", weights="auto")
    assert again.weights_id == bb.weights_id and len(server.requests) == 1
    np.testing.assert_array_equal(again.variables["params"]["conv5_block3"]["3_conv"]["conv"]["kernel"],
                                  bb.variables["params"]["conv5_block3"]["3_conv"]["conv"]["kernel"])


def test_cli_fetch_convert_info(server, monkeypatch, capsys, tmp_path):
    import hashlib

    from dreamjax import weights_cli

    path = _keras("vgg16")["files"][("keras3-weights", False)]
    name = vgg16.ARCH.files[False][0]
    server.files[f"/w/{name}"] = path.read_bytes()
    monkeypatch.setitem(vgg16.ARCH.files, False, (name, f"md5:{hashlib.md5(path.read_bytes()).hexdigest()}"))
    assert weights_cli.main(["fetch", "--model", "vgg16"]) == 0
    assert capsys.readouterr().out.strip().endswith(name)
    out_file = tmp_path / "vgg16.msgpack"
    assert weights_cli.main(["convert", str(path), "--model", "vgg16", "-o", str(out_file)]) == 0
    assert "params=14,714,688" in capsys.readouterr().out and out_file.is_file()
    assert weights_cli.main(["info", str(path), "--model", "vgg16", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "keras3-weights (13 weighted layers)" in out and "block5_pool   2x2x512        stride 32" in out
    assert weights_cli.main(["info", "--model", "resnet50", "--size", "181x247"]) == 0
    out = capsys.readouterr().out
    assert "23,587,712" in out and "conv4_block6_out  12x16x1024     stride 16" in out
    assert weights_cli.main(["convert", str(path), "--model", "resnet50"]) == 1
    assert "holds VGG16 weights" in capsys.readouterr().err
    assert weights_cli.main(["fetch", "--model", "efficientnet_lite0"]) == 1
    assert "has no Keras weight files" in capsys.readouterr().err
    assert weights_cli.main(["info", "--model", "resnet5"]) == 1
    err = capsys.readouterr().err
    assert "unknown backbone 'resnet5'" in err and "resnet50" in err and "vgg16" in err
