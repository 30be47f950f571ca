"""The ``kerasio``, ``tf_tutorial`` and ``google`` presets against the code they cite.

Beside the DLwP parity test (tests/test_parity_dlwp.py): each source's loop is re-implemented
below, plainly, from the public code (keras-io examples/generative/deep_dream.py; tensorflow/docs
site/en/tutorials/generative/deepdream.ipynb, ``run_deep_dream_with_octaves`` with
``TiledGradients``; google/deepdream dream.ipynb, ``deepdream`` with ``make_step``), with its own
constants, octave sizes, resizes (``tf.image.resize`` in NumPy, ``scipy.ndimage.zoom`` itself),
objective, normalisation, jitter and tiles. The network is the tiny random backbone, and both
sides run in float64 (a subprocess with JAX_ENABLE_X64), where two correct loops agree to
rounding. The random rolls come from the cell's key stream (the one thing a re-implementation
cannot take from a notebook), drawn in each source's range: TF's ``tf.random.uniform(minval=-m,
maxval=m)`` is [-m, m), Google's ``randint(-j, j + 1)`` is [-j, j].

The fast tests check the pieces without x64: octave sizes as each source computes them (TF in
float32, Google as scipy's zoom rounds), the corner-aligned linear zoom against scipy, TF's tiles.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage as nd

from dreamjax.engine import dream
from dreamjax.engine.dream import OctavePlan
from tests.helpers import dlwp_octaves
from tests.test_dream import _tf_resize_bilinear

# The painting's bucket per preset: non-square, every octave >= the tiny backbone's 16 px (and,
# with keras.io's 2-pixel border crop, its deepest tap larger than the crop).
SHAPES = {"kerasio": (96, 120), "tf_tutorial": (64, 80), "google": (64, 80)}
TF_TILE = 32  # the tutorial's 512 (asserted below) would be one tile here: a smaller one exercises the tiling


# ----------------------------------------------------------------------------------------------
# The sources, re-implemented (float64, one image [H, W, 3] in the backbone's input range)
# ----------------------------------------------------------------------------------------------
def _resize(img, shape):
    return _tf_resize_bilinear(img, int(shape[0]), int(shape[1]))


def keras_io(feats, img):
    """keras.io "Deep Dream" (fchollet, 2020/05/02)."""
    import jax
    import jax.numpy as jnp

    layer_settings = {"conv2": 1.0, "conv3": 1.0}  # the tiny layer set's taps and weights
    step, num_octave, octave_scale, iterations, max_loss = 0.01, 3, 1.4, 20, 15.0

    def compute_loss(x):
        f = feats(x[None])
        return sum(c * jnp.sum(jnp.square(f[n][:, 2:-2, 2:-2, :])) / np.prod(f[n].shape)
                   for n, c in layer_settings.items())

    step_fn = jax.jit(jax.value_and_grad(compute_loss))

    def ascend(x):
        for _ in range(iterations):
            loss, g = step_fn(x)
            g = np.asarray(g) / max(float(np.mean(np.abs(g))), 1e-6)
            x = x + step * g
            if float(loss) > max_loss:
                break
        return x

    return dlwp_octaves(img, img.shape[:2], _resize, ascend, num_octave, octave_scale)


def tf_tutorial(feats, img, key, tile_size):
    """TF tutorial: run_deep_dream_with_octaves(steps_per_octave=100, step_size=0.01,
    octaves=range(-2, 3), octave_scale=1.3) with TiledGradients(tile_size)."""
    import jax
    import jax.numpy as jnp

    def calc_loss(x):  # the sum over layers of each layer's mean activation
        return sum(jnp.mean(a) for a in feats(x[None]).values())

    tile_grad = jax.jit(jax.grad(calc_loss))

    def tiled_gradients(x, octave, step):
        k = dream._step_key(key, octave, step)
        shift = [int(s) for s in jax.random.randint(k, (2,), -tile_size, tile_size)]  # maxval excluded
        rolled = np.roll(x, shift, axis=(0, 1))
        grads = np.zeros_like(rolled)
        xs = list(range(0, x.shape[1], tile_size))[:-1] or [0]  # skip the last tile unless alone
        ys = list(range(0, x.shape[0], tile_size))[:-1] or [0]
        for x0 in xs:
            for y0 in ys:
                tile = rolled[y0:y0 + tile_size, x0:x0 + tile_size]
                grads[y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]] += np.asarray(tile_grad(tile))
        grads = np.roll(grads, [-s for s in shift], axis=(0, 1))
        return grads / (np.std(grads) + 1e-8)

    base_shape = np.asarray(img.shape[:2])
    x = _resize(img, base_shape)
    for i, octave in enumerate(range(-2, 3)):
        new_size = (base_shape.astype(np.float32) * np.float32(1.3 ** octave)).astype(np.int32)  # TF float32
        x = _resize(x, new_size)
        for step in range(100):
            x = np.clip(x + tiled_gradients(x, i, step) * 0.01, -1, 1)
    return x


def _zoom(x, factors):
    """The notebook's ``nd.zoom(x, factors, order=1)``. With SciPy >= 1.6 the default
    mode='constant' sets an output sample that lands one ulp past the last input pixel (85 *
    (60/85) = 60.00000000000001) to cval=0, which the notebook's SciPy interpolated: a black
    column where the 2015 code has the edge pixel. mode='nearest' only changes samples past the
    edge, so it gives the notebook's values (dreamjax clamps likewise)."""
    return nd.zoom(x, factors, order=1, mode="nearest")


def google(feats, img, key):
    """Google's notebook: deepdream(iter_n=10, octave_n=4, octave_scale=1.4) with make_step
    (step_size=1.5, jitter=32, clip=True, objective_L2) on an image in [-1, 1]."""
    import jax
    import jax.numpy as jnp

    step_size = 1.5 / 127.5  # 1.5 pixel levels; one level is 2/255 of the [-1, 1] range
    jitter, iter_n, octave_n, octave_scale = 32, 10, 4, 1.4

    def objective(x):  # objective_L2: dst.diff = dst.data, the gradient of sum(act^2) / 2
        return sum(0.5 * jnp.sum(jnp.square(a)) for a in feats(x[None]).values())

    grad = jax.jit(jax.grad(objective))
    octaves = [img]
    for _ in range(octave_n - 1):
        octaves.append(_zoom(octaves[-1], (1.0 / octave_scale, 1.0 / octave_scale, 1)))
    detail = np.zeros_like(octaves[-1])
    for octave, base in enumerate(octaves[::-1]):
        h, w = base.shape[:2]
        if octave > 0:
            h1, w1 = detail.shape[:2]
            detail = _zoom(detail, (1.0 * h / h1, 1.0 * w / w1, 1))
        src = base + detail
        for i in range(iter_n):
            oy, ox = (int(s) for s in jax.random.randint(dream._step_key(key, octave, i), (2,), -jitter, jitter + 1))
            src = np.roll(np.roll(src, ox, 1), oy, 0)  # apply jitter shift
            g = np.asarray(grad(src))
            src = src + step_size / np.abs(g).mean() * g
            src = np.roll(np.roll(src, -ox, 1), -oy, 0)  # unshift
            src = np.clip(src, -1.0, 1.0)  # [-mean, 255 - mean] in the notebook's pixels
        detail = src - base
    return src


# ----------------------------------------------------------------------------------------------
# Both sides (run in a float64 subprocess)
# ----------------------------------------------------------------------------------------------
def _compose(preset, extra=(), size=120):
    from hydra import compose, initialize_config_dir

    import dreamjax

    with initialize_config_dir(dreamjax.config_dir(), version_base="1.3"):
        return compose("config", overrides=["model=tiny", "layers=tiny_default", f"dream={preset}",
                                            f"data.image_size={size}", "dream.compute_dtype=float64",
                                            *extra])


def _parity_run(painting: str) -> dict:
    import jax

    from dreamjax import load_backbone
    from dreamjax.outputs import images
    from dreamjax.sweep import grid
    from dreamjax.sweep.executor import dream_settings

    assert jax.config.jax_enable_x64
    bb = load_backbone("tiny", weights="random")
    pixels = images.load_painting(painting).pixels
    f64 = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
    feats = jax.jit(lambda v, im: bb.feature_fn(("conv2", "conv3"), straight_through=False, dtype="float64")(v, im))
    variables = f64(bb.variables)
    ref_feats = lambda im: feats(variables, im)  # noqa: E731

    out = {}
    for preset, extra in (("kerasio", ()), ("tf_tutorial", (f"dream.tile_size={TF_TILE}", f"dream.jitter={TF_TILE}")),
                          ("google", ())):
        shape = SHAPES[preset]
        x = np.asarray(bb.preprocess(images.resize_uint8(pixels, shape)[None]), np.float64)
        x = x + np.random.default_rng(0).normal(0, 1e-3, x.shape)  # no exact ties in flat regions
        cfg = _compose(preset, extra, size=max(shape))
        (cell,) = grid.cells_from_config(cfg, ["painting.jpg"])
        dcfg, plan = dream_settings(cell, bb, shape)
        params = dream.CellParams.make([cell.layer_weights], cell.step_size, cell.max_loss, cell.jitter,
                                       cell.iterations, seed=cell.key_seed(), dtype=np.float64)
        d = dream.Dreamer(bb, dcfg, plan, cell.iterations, variables=f64(bb.dream_variables))
        ours = dream.DreamRun(d, x, params).run().final[0]
        key = np.asarray(params.key)[0]
        if preset == "kerasio":
            ref = keras_io(ref_feats, x[0])
        elif preset == "tf_tutorial":
            ref = tf_tutorial(ref_feats, x[0], key, TF_TILE)
        else:
            ref = google(ref_feats, x[0], key)
        out[preset] = {"shape_ours": list(ours.shape), "shape_ref": list(ref.shape),
                       "err": float(np.abs(ours - ref).max()) if ours.shape == ref.shape else None,
                       "moved": float(np.abs(ref - _resize(x[0], ref.shape[:2])).max())}
    return out


@pytest.fixture(scope="module")
def parity(paintings_dir):
    code = ("import json, sys; from tests.test_parity_presets import _parity_run; "
            "print('RESULT', json.dumps(_parity_run(sys.argv[1])))")
    env = dict(os.environ, JAX_ENABLE_X64="1")
    p = subprocess.run([sys.executable, "-c", code, str(paintings_dir / "van_gogh_starry_night.jpg")],
                       capture_output=True, text=True, env=env, timeout=900, cwd=str(paintings_dir.parents[2]))
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT")]
    assert p.returncode == 0 and lines, p.stderr[-4000:]
    return json.loads(lines[0].split(" ", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["kerasio", "tf_tutorial", "google"])
def test_preset_equals_its_source_in_float64(parity, preset):
    r = parity[preset]
    assert r["shape_ours"] == r["shape_ref"], r
    assert r["moved"] > 1e-2, r  # the dream really changed the image (the comparison means something)
    assert r["err"] <= 1e-7, f"{preset} preset vs its source (float64): max|diff| = {r['err']:.2e}"


# ----------------------------------------------------------------------------------------------
# The pieces (fast, float32)
# ----------------------------------------------------------------------------------------------
def test_preset_constants_are_the_sources():
    tf = _compose("tf_tutorial").dream
    assert (tf.tile_size, tf.jitter, tf.tiles, tf.step_size, tf.iterations, list(tf.octaves), tf.octave_scale) == \
        (512, 512, "tf", 0.01, 100, [-2, -1, 0, 1, 2], 1.3)
    g = _compose("google").dream
    assert (g.objective, g.border, g.norm, g.jitter, g.iterations, g.num_octaves, g.octave_scale, g.clip) == \
        ("l2", 0, "mean_abs", 32, 10, 4, 1.4, True)
    assert g.step_size == pytest.approx(1.5 / 127.5, rel=1e-15)
    k = _compose("kerasio").dream
    assert (k.objective, k.border, k.norm, k.step_size, k.iterations, k.num_octaves, k.max_loss) == \
        ("keras_io", 2, "mean_abs", 0.01, 20, 3, 15.0)


def test_tf_octave_sizes_are_float32_products():
    plan = OctavePlan((-2, -1, 0, 1, 2), 1.3, "none")
    for h in range(16, 400):
        want = [int(np.float32(h) * np.float32(1.3 ** n)) for n in range(-2, 3)]
        assert [s[0] for s in plan.shapes(h, h)] == want, h
    # where float32 and float64 part: 169 / 1.3**2 = 99.99999 in float64 but 100 in float32;
    # 90 * 1.3 = 117.00000001 in float64 but 116.99999 in float32
    assert plan.shapes(169, 90)[0] == (100, 53) and plan.shapes(169, 90)[3] == (219, 116)


def test_google_octave_sizes_are_scipy_zoom_sizes():
    plan = OctavePlan.keras(4, 1.4, "google")
    for h in range(16, 300, 7):
        base = np.zeros((h, h + 13, 1))
        want = [base.shape[:2]]
        for _ in range(3):
            base = _zoom(base, (1 / 1.4, 1 / 1.4, 1))
            want.append(base.shape[:2])
        assert plan.shapes(h, h + 13) == want[::-1], h


@pytest.mark.parametrize("src,dst", [((50, 64), (36, 46)), ((36, 46), (50, 64)), ((23, 31), (71, 50)),
                                     ((49, 61), (69, 86))])  # 85 * (60/85) > 60: the edge case of _zoom
def test_google_zoom_is_scipy_linear_zoom(src, dst):
    img = np.random.default_rng(0).normal(size=(*src, 3))
    ref = _zoom(img, (dst[0] / src[0], dst[1] / src[1], 1))
    assert ref.shape[:2] == dst
    ours = np.asarray(dream._zoom_linear(img[None].astype(np.float32), dst))[0]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_tf_tiles_skip_the_last_start():
    assert dream._tf_tile_starts(37, 32) == [0]  # one start: the tile is the image's first 32 rows
    assert dream._tf_tile_starts(64, 32) == [0]  # range(0, 64, 32)[:-1]
    assert dream._tf_tile_starts(108, 32) == [0, 32, 64]
    assert dream._tf_tile_starts(20, 32) == [0]
