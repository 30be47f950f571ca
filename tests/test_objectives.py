"""Objective terms, parameterisations and transforms of the dream engine (tiny backbone)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamjax.config import ConfigError
from dreamjax.engine import dream, objectives, transforms
from dreamjax.engine import params as parameterisations
from dreamjax.engine.dream import CellParams, DreamConfig, OctavePlan
from dreamjax.engine.objectives import Terms
from dreamjax.engine.transforms import Transforms

TAPS = ("conv2", "conv3")
CHANNELS = {"conv1": 8, "conv2": 16, "conv3": 16, "conv4": 32}


def _images(bb, n, h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    return np.asarray(bb.preprocess(rng.integers(0, 256, (n, h, w, 3)).astype(np.float32)))


@pytest.mark.parametrize("border", [0, 2])
def test_channel_terms_with_equal_weights_are_the_layer_term(tiny_backbone, border):
    """sum_c (1/C) mean_yx act_c**2 over every channel of a tap = the layer term, gradient to 1e-6."""
    f = tiny_backbone.feature_fn(TAPS)
    x = jnp.asarray(_images(tiny_backbone, 2))
    layer = dream.make_grad_fn(f, DreamConfig(taps=TAPS, border=border))
    cfg = DreamConfig(taps=TAPS, border=border, terms=Terms(channel_taps=("conv3",)))
    channel = dream.make_grad_fn(f, cfg)
    w = jnp.asarray([[0.0, 1.0], [0.0, 2.5]])
    values = cfg.terms.zeros(2, CHANNELS, 10)
    values["channel:conv3"][:] = np.asarray(w[:, 1:]) / CHANNELS["conv3"]
    cols_l, g_l = layer(tiny_backbone.variables, x, w)
    cols_c, g_c = channel(tiny_backbone.variables, x, jnp.zeros_like(w), values)
    scale = float(jnp.max(jnp.abs(g_l)))
    assert scale > 0
    np.testing.assert_allclose(np.asarray(g_c) / scale, np.asarray(g_l) / scale, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(cols_c[:, 2]), np.asarray(cols_l[:, 1] * w[:, 1]), rtol=1e-6)
    assert cfg.columns == ("conv2", "conv3", "channel:conv3")


@pytest.mark.parametrize("reduction", ["mean_square", "mean"])
def test_one_hot_spatial_map_is_the_neuron(tiny_backbone, reduction):
    f = tiny_backbone.feature_fn(TAPS)
    x = jnp.asarray(_images(tiny_backbone, 1))
    h = w = 64 // 8  # conv3 has stride 8
    terms = Terms(channel_taps=("conv3",), reduction=reduction, mask_shape=(h, w))
    cfg = DreamConfig(taps=TAPS, border=0, terms=terms)
    act = np.asarray(f(tiny_backbone.variables, x)["conv3"])
    y, xx0, c = np.unravel_index(np.argmax(act[0, 1:-1, 1:-1]), act[0, 1:-1, 1:-1].shape)  # a live neuron
    y, xx0 = y + 1, xx0 + 1
    values = terms.zeros(1, CHANNELS, 10)
    values["channel:conv3"][0, c] = 1.0
    values["mask:conv3"][:] = 0.0
    values["mask:conv3"][0, y, xx0] = 1.0
    _, g = dream.make_grad_fn(f, cfg)(tiny_backbone.variables, x, jnp.zeros((1, 2)), values)

    def neuron(xx):
        a = f(tiny_backbone.variables, xx)["conv3"][0, y, xx0, c]
        return jnp.square(a) if reduction == "mean_square" else a

    g_ref = jax.grad(neuron)(x)
    assert float(jnp.max(jnp.abs(g_ref))) > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-6 * float(jnp.max(jnp.abs(g_ref))))


def test_direction_is_the_mean_channel_term_of_its_vector(tiny_backbone):
    f = tiny_backbone.feature_fn(TAPS)
    x = jnp.asarray(_images(tiny_backbone, 1))
    v = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
    d = Terms(direction_taps=("conv2",))
    c = Terms(channel_taps=("conv2",), reduction="mean")
    vd = d.zeros(1, CHANNELS, 10)
    vd["direction:conv2"][:] = v
    vc = c.zeros(1, CHANNELS, 10)
    vc["channel:conv2"][:] = v
    z = jnp.zeros((1, 2))
    cols_d, g_d = dream.make_grad_fn(f, DreamConfig(taps=TAPS, border=1, terms=d))(tiny_backbone.variables, x, z, vd)
    cols_c, g_c = dream.make_grad_fn(f, DreamConfig(taps=TAPS, border=1, terms=c))(tiny_backbone.variables, x, z, vc)
    np.testing.assert_allclose(np.asarray(cols_d[:, 2]), np.asarray(cols_c[:, 2]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_d), np.asarray(g_c), atol=1e-6 * float(jnp.max(jnp.abs(g_c))))


def test_guide_term_pulls_toward_the_best_matching_guide_feature():
    act = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 2, 3)), jnp.float32)
    guide = jnp.asarray([[[1.0, 0, 0], [0, 1.0, 0]]])  # two guide features
    value, grad = jax.value_and_grad(lambda a: objectives.guide_term(a, guide)[0])(act)
    a = np.asarray(act).reshape(4, 3)
    best = np.argmax(a @ np.asarray(guide[0]).T, axis=1)
    np.testing.assert_allclose(np.asarray(grad).reshape(4, 3), np.asarray(guide[0])[best] / 4, rtol=1e-6)
    np.testing.assert_allclose(float(value), np.mean(np.max(a[:, :2], axis=1)), rtol=1e-6)


@pytest.mark.parametrize("param", parameterisations.PARAMS)
def test_parameterisations_invert(param):
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 24, 31, 3)), jnp.float32)
    p = parameterisations.from_image(param, x)
    assert p.shape == parameterisations.param_shape(param, x.shape)
    np.testing.assert_allclose(np.asarray(parameterisations.to_image(param, p, x.shape)), np.asarray(x), atol=2e-5)


def test_fourier_steps_move_low_frequencies_more():
    """A unit step on every spectrum coefficient puts more energy at low frequencies (1/f)."""
    shape = (1, 32, 32, 3)
    p = jnp.ones(parameterisations.param_shape("fourier", shape))
    img = np.asarray(parameterisations.to_image("fourier", p, shape))[0, :, :, 0]
    spec = np.abs(np.fft.rfft2(img))
    assert spec[0, 1] > 4 * spec[8, 8]


def test_lap_pyramid_merges_back_and_normalises_each_band():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 37, 50, 3)), jnp.float32)
    bands = transforms.lap_split(x, 4)
    assert len(bands) == 5
    np.testing.assert_allclose(np.asarray(transforms.lap_merge(bands)), np.asarray(x), atol=1e-5)
    y = transforms.lap_normalize(x * 1e-3, 4)
    # Scale-free: the normalised gradient of a scaled input is the same.
    np.testing.assert_allclose(np.asarray(y), np.asarray(transforms.lap_normalize(x, 4)), rtol=1e-4, atol=1e-4)


def test_transforms_identity_and_integer_shift():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    assert not Transforms().active
    shifted = transforms._affine(x[0], jnp.asarray([2.0, -3.0]), 1.0, 1.0, 0.0)
    np.testing.assert_allclose(np.asarray(shifted[2:, :13]), np.asarray(x[0, :14, 3:]), atol=1e-6)
    tf = Transforms(pad=4, jitter=2, scale=(0.9, 1.1), rotate=10)
    out = transforms.apply(tf, x, keys)
    assert out.shape == (2, 24, 24, 3)
    again = transforms.apply(tf, x, keys)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    # Each cell draws from its own key: cell 1 alone sees what it saw in the batch.
    alone = transforms.apply(tf, x[1:], keys[1:])
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(out[1]), atol=1e-6)


PLAN = OctavePlan.keras(2, 1.4, detail="none")


def _mixed_batch(bb):
    """Eight cells mixing layer, channel, class, guide and regulariser weights and start images."""
    rng = np.random.default_rng(3)
    terms = Terms(channel_taps=("conv3",), mask_shape=(4, 4), class_logits=True, guide_tap="conv2",
                  guide_size=16, regularisers=("tv", "l2"), blur_every=2)
    b = 8
    values = terms.zeros(b, CHANNELS, 10)
    values["channel:conv3"][[1, 4], [3, 7]] = 1.0
    values["mask:conv3"][4, :2, :2] = 0.0  # a region
    values["class"][[2, 5, 7], [1, 4, 9]] = [1.0, 2.0, 0.5]
    guide = bb.features(jnp.asarray(_images(bb, 1, 32, 32, seed=9)), ("conv2",))["conv2"]  # 8x8 -> 64 locations
    values["guide_features"][:] = np.asarray(guide).reshape(1, 64, 16)[:, ::4]  # 16 of them
    values["guide"][[3, 7]] = [1.0, 0.3]
    values["tv"][[0, 6]] = [5.0, 1.0]
    values["l2"][[5, 6]] = [0.5, 2.0]
    values["blur"][[1, 6]] = [0.5, 1.0]
    layer = np.zeros((b, 2), np.float32)
    layer[[0, 3, 6], [0, 1, 0]] = [1.0, 0.5, 2.0]
    params = CellParams.make(layer, step_size=[5, 3, 8, 2, 4, 6, 1, 2], jitter=[0, 3, 0, 2, 0, 1, 4, 0],
                             iterations=[4, 2, 4, 3, 4, 1, 4, 2], seed=list(range(b)), terms=values)
    starts = np.array(_images(bb, b, 48, 48))
    starts[2] = 0.0  # grey
    starts[5] = rng.uniform(-0.2, 0.2, starts[5].shape)  # noise
    return terms, params, starts


_ROBUST = Transforms(pad=4, jitter=2, scale=(0.9, 1.1), rotate=8)


@pytest.mark.parametrize("param,tf", [("pixels", Transforms()),
                                      pytest.param("fourier_decorrelated", _ROBUST, marks=pytest.mark.slow)])
def test_batch_invariance_of_mixed_objectives(tiny_backbone, param, tf):
    terms, params, starts = _mixed_batch(tiny_backbone)
    cfg = DreamConfig(taps=TAPS, norm="l2", border=1, clip=True, terms=terms, param=param, transforms=tf,
                      lapnorm=2 if param == "pixels" else 0)
    run = dream.dream(tiny_backbone, starts, params, cfg, PLAN, steps_capacity=4)
    assert run.octave_losses[-1].shape[-1] == len(cfg.columns) == 2 + 5
    finals = run.final
    assert np.isfinite(finals).all()
    for b in (0, 5, 7):
        alone = dream.dream(tiny_backbone, starts[b:b + 1], params.take(slice(b, b + 1)), cfg, PLAN, steps_capacity=4)
        np.testing.assert_allclose(alone.final[0], finals[b], atol=1e-5, rtol=0,
                                   err_msg=f"cell {b} differs alone vs in the batch of 8")
        np.testing.assert_allclose(alone.octave_losses[-1][:, 0], run.octave_losses[-1][:, b], rtol=1e-4, atol=1e-5)
    # The weights did something: the class cells raised their class logits.
    logits = np.asarray(tiny_backbone.logits(jnp.asarray(finals)))
    start_logits = np.asarray(tiny_backbone.logits(jnp.asarray(starts)))
    assert logits[2, 1] - start_logits[2, 1] > 0.03  # cell 2: the class term alone, from grey


def test_bad_term_values_fail_before_compute(tiny_backbone):
    terms = Terms(channel_taps=("conv3",))
    cfg = DreamConfig(taps=TAPS, terms=terms)
    values = terms.zeros(1, CHANNELS, 10)
    values["channel:conv3"] = np.zeros((1, 20), np.float32)
    params = CellParams.make(np.zeros((1, 2)), 1.0, iterations=1, terms=values)
    with pytest.raises(ConfigError, match=r"expected \(16,\) \(16 channels of conv3\)"):
        dream.DreamRun(dream.Dreamer(tiny_backbone, cfg, PLAN, 1), _images(tiny_backbone, 1), params)
    with pytest.raises(ConfigError, match="not among the dream's taps"):
        DreamConfig(taps=TAPS, terms=Terms(channel_taps=("conv4",)))
    from dreamjax import load_backbone

    headless = load_backbone("tiny")
    with pytest.raises(ConfigError, match="needs the classifier top"):
        dream.Dreamer(headless, DreamConfig(taps=TAPS, terms=Terms(class_logits=True)), PLAN, 1)


def test_reruns_are_byte_identical(tiny_backbone):
    terms, params, starts = _mixed_batch(tiny_backbone)
    cfg = DreamConfig(taps=TAPS, border=1, terms=terms, param="fourier", transforms=Transforms(jitter=2, rotate=5))
    a = dream.dream(tiny_backbone, starts[:2], params.take(slice(0, 2)), cfg, PLAN, steps_capacity=4).final
    b = dream.dream(tiny_backbone, starts[:2], params.take(slice(0, 2)), cfg, PLAN, steps_capacity=4).final
    assert a.tobytes() == b.tobytes()
    assert dataclasses.replace(cfg).columns == cfg.columns
