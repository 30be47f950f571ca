"""InceptionV3: golden counts and shapes, the Keras layer order, numeric parity with Keras 3.

Parity uses a Keras model with random weights and random BatchNorm statistics,
written to the official file layout and loaded through the converter, so a
wrong epsilon, pooling or layer pairing shows. ~1 min on 2 CPU cores (the Keras
build and its eager forward passes dominate); the 299x299 gradient is behind ``-m slow``.

    python -m pytest tests/test_inception_v3.py          # ~45 s
    python -m pytest tests/test_inception_v3.py -m slow  # ~20 s more
"""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dreamjax import available_backbones, load_backbone
from dreamjax.models.inception_v3 import (
    ARCH,
    TAP_STRIDES,
    TAPS,
    InceptionV3,
    keras_layer_order,
    source_order,
)
from dreamjax.models.ops import prepare_dream_variables
from dreamjax.weights.keras_h5 import load_keras_h5
from tests.keras_fixtures import keras_setup

# Keras' model.count_params(): trainable + BatchNorm moving statistics.
PARAM_COUNTS = {False: (21_768_352, 21_802_784), True: (23_817_352, 23_851_784)}
TAP_SHAPES_299 = {
    "mixed0": (35, 35, 256), "mixed1": (35, 35, 288), "mixed2": (35, 35, 288),
    "mixed3": (17, 17, 768), "mixed4": (17, 17, 768), "mixed5": (17, 17, 768),
    "mixed6": (17, 17, 768), "mixed7": (17, 17, 768),
    "mixed8": (8, 8, 1280), "mixed9": (8, 8, 2048), "mixed10": (8, 8, 2048),
}
DLWP_WEIGHTS = {"mixed4": 1.0, "mixed5": 1.5, "mixed6": 2.0, "mixed7": 2.5}
PAINTING = Path(__file__).resolve().parents[1] / "dreamjax/data/paintings/van_gogh_starry_night.jpg"
SIZES = [(75, 75), (181, 247), (299, 299)]


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("include_top", [False, True])
def test_param_counts_match_keras(include_top):
    v = jax.eval_shape(InceptionV3(include_top=include_top).init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)))
    trainable, total = PARAM_COUNTS[include_top]
    assert _count(v["params"]) == trainable
    assert _count(v["params"]) + _count(v["batch_stats"]) == total


@pytest.fixture(scope="module")
def random_backbone():
    return load_backbone("inception_v3", weights="random")


def test_registered_with_golden_tap_shapes(random_backbone):
    assert "inception_v3" in available_backbones()
    assert random_backbone.weights_id.startswith("random-")
    assert random_backbone.taps == TAPS
    assert random_backbone.tap_shapes(299, 299) == TAP_SHAPES_299
    for tap, (h, _w, _) in TAP_SHAPES_299.items():  # strides agree with the shapes (VALID convs lose a few px)
        assert 299 // TAP_STRIDES[tap] - 2 <= h <= 299 // TAP_STRIDES[tap]


def test_small_input_is_a_clear_error(random_backbone):
    with pytest.raises(ValueError, match=r"at least 75x75 pixels, got 74x80"):
        random_backbone.tap_shapes(74, 80)


def test_taps_stop_early(random_backbone):
    # Variables for the stem..mixed2 only: touching mixed3 would fail.
    v = {c: {k: x for k, x in random_backbone.variables[c].items() if k in ("stem", "mixed0", "mixed1", "mixed2")}
         for c in ("params", "batch_stats")}
    logits, out = jax.eval_shape(lambda v, x: InceptionV3(include_top=True).apply(v, x, taps=("mixed2", "mixed0")),
                                 v, jnp.zeros((1, 99, 99, 3)))
    assert logits is None and sorted(out) == ["mixed0", "mixed2"]


# --- against Keras --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras_ref(tmp_path_factory):
    st = keras_setup(tmp_path_factory)
    return st, load_keras_h5(st["files"][("official", True)], ARCH, include_top=True)


def _creation_rank(layers, prefix):
    ks = sorted(int(m.group(1) or 0) for l in layers if (m := re.fullmatch(rf"{prefix}(?:_(\d+))?", l.name)))
    return {(f"{prefix}_{k}" if k else prefix): i for i, k in enumerate(ks)}


def test_keras_layer_order_matches_keras(keras_ref):
    """Our order, from the model table, equals Keras' Functional.layers order of weighted layers."""
    model = keras_ref[0]["top"]
    weighted = [l for l in model.layers if l.weights]
    rank = {**_creation_rank(weighted, "conv2d"), **_creation_rank(weighted, "batch_normalization")}
    src = {unit: i for i, unit in enumerate(source_order())}  # Keras auto names count in source order
    ours = [("predictions",) if e[-1] == "dense" else (e[2], src[e[0], e[1]]) for e in keras_layer_order(True)]
    theirs = [("predictions",) if l.name == "predictions" else
              ("conv" if l.name.startswith("conv2d") else "bn", rank[l.name]) for l in weighted]
    assert ours == theirs


def _image(h, w):
    im = Image.open(PAINTING).convert("RGB").resize((w, h))
    return (np.asarray(im, np.float32) / 127.5 - 1.0)[None]


# 75x75 in the default suite; the two larger sizes in the slow one (CI runs both).
@pytest.mark.parametrize("size", [SIZES[0], *(pytest.param(s, marks=pytest.mark.slow) for s in SIZES[1:])],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_parity_with_keras(keras_ref, size):
    import keras

    st, variables = keras_ref
    model = st["top"]
    names = list(TAPS) + ["logits"]
    feat = keras.Model(model.input, [model.get_layer(t).output for t in TAPS] + [model.output])
    x = _image(*size)
    ref = dict(zip(names, (np.asarray(o) for o in feat(x, training=False))))
    logits, out = jax.jit(InceptionV3(include_top=True).apply)(variables, x)
    out = {**out, "logits": logits}
    errors = {n: float(np.abs(np.asarray(out[n]) - ref[n]).max() / np.abs(ref[n]).max()) for n in names}
    print(f"parity {size}: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    bad = [n for n in names if not errors[n] <= 1e-4]
    assert not bad, f"first tap off at {size}: {bad[0]} max|diff|/max|ref| = {errors[bad[0]]:.2e} (> 1e-4)"


def dlwp_loss(acts):
    return sum(w * jnp.mean(acts[t][:, 2:-2, 2:-2, :] ** 2) for t, w in DLWP_WEIGHTS.items())


@pytest.mark.slow
@pytest.mark.parametrize("size", [(181, 247), (299, 299)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dream_gradient_parity_with_keras(keras_ref, size):
    """d(DLwP loss)/d(input) agrees with Keras' own gradient (jax.grad through stateless_call).

    A natural image, not noise: the gradient is piecewise (ReLU, max pool) and on
    some noise inputs a 1e-7 forward difference flips a kink, moving it by ~1e-3.
    """
    import keras

    st, variables = keras_ref
    model = st["notop"]
    feat = keras.Model(model.input, {t: model.get_layer(t).output for t in DLWP_WEIGHTS})
    tv = [v.value for v in feat.trainable_variables]
    ntv = [v.value for v in feat.non_trainable_variables]
    # A trace of noise (1e-3, a tenth of a grey level) breaks the exact ties of flat painting
    # regions; at a tie, which max-pool input or ReLU gets the gradient is decided by rounding.
    x = _image(*size) + np.random.default_rng(0).normal(0, 1e-3, (1, *size, 3)).astype(np.float32)
    g_keras = np.asarray(jax.jit(jax.grad(lambda x: dlwp_loss(feat.stateless_call(tv, ntv, x, training=False)[0])))(x))
    taps = tuple(DLWP_WEIGHTS)
    # Both gradient paths: JAX's own transpose rules (plain variables) and the dream path's
    # precomputed backward kernels (dreamjax.models.ops, what Dreamer runs).
    dream_vars = prepare_dream_variables(InceptionV3(), variables, (1, 75, 75, 3))
    assert len(jax.tree_util.tree_leaves(dream_vars["dream"])) == 94  # every conv2d_bn
    grad = jax.jit(jax.grad(lambda v, x: dlwp_loss(InceptionV3().apply(v, x, taps=taps)[1]), argnums=1))
    for path, v in (("autodiff", variables), ("backward kernels", dream_vars)):
        g_ours = np.asarray(grad(v, x))
        rel = float(np.linalg.norm(g_ours - g_keras) / np.linalg.norm(g_keras))
        print(f"grad parity {size} ({path}): relative L2 error {rel:.1e}")
        assert rel <= 1e-3, path
