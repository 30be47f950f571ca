"""Objectives on the real EfficientNet-Lite0 weights (slow: python -m pytest -m slow tests/test_objectives_real.py)."""
import numpy as np
import pytest

from dreamjax import load_backbone
from dreamjax.engine import dream
from dreamjax.engine.dream import CellParams, DreamConfig, OctavePlan
from dreamjax.engine.objectives import Terms
from dreamjax.engine.transforms import Transforms

TAP = "block9"  # a middle tap: 112 channels, stride 16


@pytest.mark.slow
def test_channel_atlas_from_noise_makes_each_target_the_most_active():
    """32 channels of block9 chosen with a fixed seed, dreamed from noise (Fourier + decorrelated
    colour, transforms) at 128 px in one batch: each target channel ends as the tap's most active
    channel (mean activation) in >= 28 of 32 cells, at >= 3x its mean on the starting noise.
    ~2 min on 2 CPU cores."""
    import jax.numpy as jnp

    bb = load_backbone("efficientnet_lite0")
    n, size = 32, 128
    channels = bb.tap_shapes(size, size, [TAP])[TAP][-1]
    targets = np.sort(np.random.default_rng(0).choice(channels, n, replace=False))
    terms = Terms(channel_taps=(TAP,), reduction="mean")
    values = terms.zeros(n, {TAP: channels}, 1000)
    values[f"channel:{TAP}"][np.arange(n), targets] = 1.0
    rng = np.random.default_rng(1)
    noise = np.asarray(bb.preprocess(127.5 + rng.uniform(-16, 16, (n, size, size, 3)).astype(np.float32)))
    params = CellParams.make(np.zeros((n, 1)), 0.05, iterations=24, seed=list(range(n)), terms=values)
    cfg = DreamConfig(taps=(TAP,), norm="mean_abs", optimizer="adam", border=0, clip=True,
                      value_range=bb.value_range, terms=terms, param="fourier_decorrelated",
                      transforms=Transforms(pad=4, jitter=4, scale=(0.95, 1.05), rotate=5))
    run = dream.dream(bb, noise, params, cfg, OctavePlan((0,), 1.4, "none"))
    before = np.asarray(bb.features(jnp.asarray(noise), (TAP,))[TAP]).mean(axis=(1, 2))
    after = np.asarray(bb.features(jnp.asarray(run.final), (TAP,))[TAP]).mean(axis=(1, 2))
    cells = np.arange(n)
    top = after.argmax(axis=1) == targets
    # ">= 3x its mean on the noise": the start mean can be negative (block outputs are linear),
    # so the bar is 3x its magnitude, and the end mean must be positive.
    gain = after[cells, targets] >= 3 * np.abs(before[cells, targets])
    print(f"most active in {top.sum()}/{n}, >= 3x in {gain.sum()}/{n}, both {(top & gain).sum()}/{n}; "
          f"end/start ratio min {np.min(after[cells, targets] / np.abs(before[cells, targets])):.1f}")
    assert (top & gain).sum() >= 28, f"only {(top & gain).sum()} of {n} cells (top {top.sum()}, gain {gain.sum()})"


def _paintings(bb, size=224):
    from dreamjax.outputs import images
    from tests.conftest import PAINTINGS

    paths = sorted(PAINTINGS.glob("*.jpg"))
    px = np.stack([images.resize_uint8(images.load_painting(p).pixels, (size, size)) for p in paths])
    return [p.stem for p in paths], np.asarray(bb.preprocess(px))


def _lite_cfg(bb, taps, terms, **kw):
    return DreamConfig(taps=taps, norm="mean_abs", border=0, clip=True, value_range=bb.value_range,
                       straight_through=True, terms=terms, **kw)


@pytest.mark.slow
def test_class_direction_makes_the_target_top1():
    """The 12 bundled paintings at 224 px, each toward its own class (fixed seed): the target is the
    Lite0 classifier's top-1 in >= 11 of 12. ~6 min on 2 CPU cores."""
    import jax.numpy as jnp

    bb = load_backbone("efficientnet_lite0", include_top=True)
    names, x = _paintings(bb)
    n = len(names)
    targets = np.random.default_rng(0).choice(1000, n, replace=False)
    terms = Terms(class_logits=True)
    values = terms.zeros(n, {}, 1000)
    values["class"][np.arange(n), targets] = 1.0
    params = CellParams.make(np.zeros((n, 1)), 0.015, jitter=16, iterations=20, seed=list(range(n)), terms=values)
    cfg = _lite_cfg(bb, ("block9",), terms, transforms=Transforms(scale=(0.95, 1.05), rotate=5), micro_batch=1)
    run = dream.dream(bb, x, params, cfg, OctavePlan.keras(2, 1.4, "dlwp"))
    top1 = np.asarray(jnp.argmax(bb.logits(jnp.asarray(run.final)), axis=1))
    hits = int((top1 == targets).sum())
    # Is it an invisible adversarial change? Ask an independently trained network (Lite2, its own
    # input size): how often is the target in its top-5? Reported, not asserted.
    from dreamjax.outputs import images

    lite2 = load_backbone("efficientnet_lite2", include_top=True)
    px = images.to_uint8(np.asarray(bb.deprocess(run.final)))
    s2 = lite2.min_size if lite2.min_size > 224 else 260
    x2 = lite2.preprocess(np.stack([images.resize_uint8(p, (s2, s2)) for p in px]))
    top5 = np.argsort(-np.asarray(lite2.logits(x2)), axis=1)[:, :5]
    second = int(sum(t in row for t, row in zip(targets, top5)))
    print(f"class direction: target top-1 of Lite0 in {hits}/{n}; in Lite2's top-5 in {second}/{n}")
    assert hits >= 11


@pytest.mark.slow
def test_guide_pulls_the_dream_toward_the_guide_features():
    """Each painting dreamed at block9, guided by the next painting vs unguided (the layer term):
    at the guide tap the guided dream's mean feature is closer (cosine) to the guide's in >= 10 of 12.
    ~6 min on 2 CPU cores."""
    import jax.numpy as jnp

    bb = load_backbone("efficientnet_lite0")
    names, x = _paintings(bb, 160)
    n, tap = len(names), "block9"
    guides = np.roll(x, -1, axis=0)
    gfeat = np.asarray(bb.features(jnp.asarray(guides), (tap,))[tap])  # [n, 10, 10, 112]
    terms = Terms(guide_tap=tap, guide_size=gfeat.shape[1] * gfeat.shape[2])
    values = terms.zeros(2 * n, {tap: gfeat.shape[-1]}, 1000)
    values["guide"][:n] = 1.0
    values["guide_features"][:n] = gfeat.reshape(n, -1, gfeat.shape[-1])
    layer = np.zeros((2 * n, 1), np.float32)
    layer[n:] = 1.0  # the unguided half: the layer term at the same tap
    params = CellParams.make(layer, 0.015, jitter=16, iterations=20, seed=list(range(n)) * 2, terms=values)
    run = dream.dream(bb, np.concatenate([x, x]), params, _lite_cfg(bb, (tap,), terms, micro_batch=1),
                      OctavePlan.keras(2, 1.4, "dlwp"))
    f = np.asarray(bb.features(jnp.asarray(run.final), (tap,))[tap]).mean(axis=(1, 2))
    g = gfeat.mean(axis=(1, 2))
    cos = lambda a, b: np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))  # noqa: E731
    closer = int((cos(f[:n], g) > cos(f[n:], g)).sum())
    print(f"guide: guided closer to the guide in {closer}/{n}")
    assert closer >= 10
