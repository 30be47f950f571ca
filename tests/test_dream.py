"""The dream engine on the tiny backbone (fast) and the real offline backbone."""
import numpy as np
import pytest

from dreamjax.engine import dream
from dreamjax.engine.dream import (
    CellParams,
    ConfigError,
    DreamConfig,
    OctavePlan,
)

TAPS = ("conv2", "conv3")
PLAN = OctavePlan.keras(2, 1.4)


def _images(bb, n, h=96, w=112, seed=0):
    rng = np.random.default_rng(seed)
    return np.asarray(bb.preprocess(rng.integers(0, 256, (n, h, w, 3)).astype(np.float32)))


@pytest.fixture(scope="module")
def batch8(tiny_backbone):
    """Eight cells with different weights, steps, max losses, jitters and iteration counts."""
    rng = np.random.default_rng(1)
    params = CellParams.make(
        rng.uniform(0.1, 3.0, (8, 2)), step_size=[20, 5, 1, 20, 10, 2, 20, 15],
        max_loss=[np.inf, 15, 0.5, np.inf, 3, np.inf, 1e-3, 8], jitter=[0, 0, 4, 8, 0, 2, 0, 6],
        iterations=[12, 3, 12, 7, 12, 1, 12, 9], seed=list(range(8)))
    cfg = DreamConfig(taps=TAPS, norm="l2", frame_every=4)
    images = _images(tiny_backbone, 8)
    run = dream.dream(tiny_backbone, images, params, cfg, PLAN)
    return images, params, cfg, run


def test_batch_invariance(tiny_backbone, batch8):
    images, params, cfg, run = batch8
    for b in (0, 2, 5, 6):
        alone = dream.dream(tiny_backbone, images[b:b + 1], params.take(slice(b, b + 1)), cfg, PLAN,
                            steps_capacity=12)
        np.testing.assert_allclose(alone.final[0], run.final[b], atol=1e-5, rtol=0,
                                   err_msg=f"cell {b} differs alone vs in the batch of 8")
        for o in range(len(PLAN.exponents)):
            np.testing.assert_allclose(alone.octave_losses[o][:, 0], run.octave_losses[o][:, b], rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("micro_batch", [1, 3])  # 3: passes of 2 (the largest divisor of 8 not above 3)
def test_micro_batches_are_the_same_dream(tiny_backbone, batch8, micro_batch):
    """Gradients in passes of a few cells (one program, lax.map) = the whole batch in one pass."""
    import dataclasses

    images, params, cfg, run = batch8
    assert cfg.micro_batch == 0
    passes = dream.dream(tiny_backbone, images, params, dataclasses.replace(cfg, micro_batch=micro_batch), PLAN)
    np.testing.assert_allclose(passes.final, run.final, atol=1e-5, rtol=0)
    np.testing.assert_allclose(passes.octave_losses[-1], run.octave_losses[-1], rtol=1e-5, atol=1e-6)


def test_iterations_and_max_loss_freeze_cells(batch8):
    _, params, cfg, run = batch8
    losses = run.octave_losses[0]  # [S, B, T]
    ran = ~np.isnan(losses[:, :, 0])
    iters = np.asarray(params.iterations)
    weights = np.asarray(params.layer_weights)
    for b in range(8):
        total = (losses[:, b] * weights[b]).sum(axis=1)
        n = ran[:, b].sum()
        # DLwP: the step is applied, then the loop stops once the loss passed max_loss.
        passed = np.nonzero(total[:n] > params.max_loss[b])[0]
        expected = min(iters[b], passed[0] + 1) if len(passed) else iters[b]
        assert n == expected, f"cell {b}: ran {n} steps, expected {expected}"
    assert ran[:, 6].sum() == 1  # max_loss 1e-3: stops after its first step


def test_frames_hold_final_image_after_a_cell_stops(batch8):
    _, params, cfg, run = batch8
    frames = run.octave_frames[0]  # [F, B, h, w, 3], frame j = after step 4(j+1)
    assert frames.shape[0] == 12 // 4
    # Cell 5 runs one step only: every frame holds its image after that step, not the start image.
    start = np.asarray(dream._resize(batch8[0][5:6], run.shapes[0]))[0]
    assert np.abs(frames[:, 5] - frames[-1, 5]).max() == 0
    assert np.abs(frames[-1, 5] - start).max() > 0
    # Cell 0 runs all 12 steps: its frames keep changing.
    assert all(np.abs(frames[j + 1, 0] - frames[j, 0]).max() > 0 for j in range(frames.shape[0] - 1))


def test_determinism_byte_identical(tiny_backbone):
    from dreamjax.outputs.images import to_uint8

    params = CellParams.make(np.ones((2, 2)), [10.0, 3.0], jitter=[8, 4], iterations=5, seed=[3, 4])
    cfg = DreamConfig(taps=TAPS, norm="mean_abs")
    images = _images(tiny_backbone, 2)
    outs = [to_uint8(np.asarray(tiny_backbone.deprocess(dream.dream(tiny_backbone, images, params, cfg, PLAN).final)))
            for _ in range(2)]
    assert outs[0].tobytes() == outs[1].tobytes()


def test_per_cell_normalisation_is_per_cell():
    # Two cells whose gradients differ by 1000x get updates of the same size.
    g = np.stack([np.ones((4, 4, 3)), 1000 * np.ones((4, 4, 3))]).astype(np.float32)
    for mode in dream.NORMS[:2]:
        tx = dream.normalize_per_cell(mode)
        u, _ = tx.update(g, tx.init(g))
        np.testing.assert_allclose(np.asarray(u[0]), np.asarray(u[1]), rtol=1e-6)
    rule = dream.make_update_rule(DreamConfig(taps=TAPS), np.array([1.0, 2.0], np.float32))
    u, _ = rule.update(g, rule.init(g))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(u).reshape(2, -1), axis=1), [1.0, 2.0], rtol=1e-5)


def test_adam_is_a_config_switch(tiny_backbone):
    params = CellParams.make(np.ones((1, 2)), 0.05, iterations=4)
    run = dream.dream(tiny_backbone, _images(tiny_backbone, 1), params, DreamConfig(taps=TAPS, optimizer="adam",
                                                                                     norm="mean_abs"), PLAN)
    l = run.octave_losses[-1][:, 0] @ np.ones(2)
    assert np.all(np.isfinite(l)) and l[-1] > l[0]


def _tf_resize_bilinear(img, oh, ow):
    """NumPy reference of tf.image.resize(bilinear, antialias=False): half-pixel centres, clamped."""
    h, w = img.shape[:2]

    def coords(o, i):
        x = (np.arange(o) + 0.5) * (i / o) - 0.5
        x0 = np.floor(x).astype(int)
        frac = x - x0
        return np.clip(x0, 0, i - 1), np.clip(x0 + 1, 0, i - 1), frac

    y0, y1, fy = coords(oh, h)
    x0, x1, fx = coords(ow, w)
    top = img[y0][:, x0] * (1 - fx)[None, :, None] + img[y0][:, x1] * fx[None, :, None]
    bot = img[y1][:, x0] * (1 - fx)[None, :, None] + img[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bot * fy[:, None, None]


@pytest.mark.parametrize("shape", [(23, 31), (71, 50), (140, 181)])
def test_resize_matches_tf_image_resize(shape):
    img = np.random.default_rng(0).normal(size=(50, 64, 3)).astype(np.float32)
    ours = np.asarray(dream._resize(img[None], shape))[0]
    np.testing.assert_allclose(ours, _tf_resize_bilinear(img, *shape), atol=2e-5)


@pytest.mark.parametrize("detail", ["dlwp", "google"])
def test_a_dream_compiles_its_octave_programs_and_nothing_else(tiny_backbone, detail, caplog):
    """Resizes, lost-detail sums and the transfers between octaves run on the host: a 3-octave
    dream compiles one octave program per octave shape (and one small init per shape), where each
    new shape of a device-side resize or sum used to be another compilation (25 in a one-painting
    InceptionV3 run, 10 now)."""
    import logging

    import jax

    plan = OctavePlan.keras(3, 1.4, detail)
    params = CellParams.make(np.ones((1, 2)), 10.0, iterations=2, seed=[0])
    cfg = DreamConfig(taps=TAPS)
    dream.dream(tiny_backbone, _images(tiny_backbone, 1, 80, 88), params, cfg, plan)  # scalars, first use
    images = _images(tiny_backbone, 1, 90, 100)  # shapes no other test dreams at
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax._src.interpreters.pxla"):
        run = dream.dream(tiny_backbone, images, params, cfg, plan)
    # (this thread's compilations; the later octaves' programs compile in the prefetch thread)
    compiled = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("Compiling ")]
    assert len(set(run.shapes)) == 3
    assert set(compiled) <= {"jit(_run_steps)", "jit(_init_state)"}, compiled
    assert compiled.count("jit(_init_state)") == 3
    assert run.dreamer.programs() == 3


def test_prefetched_octave_programs_dream_the_same(tiny_backbone, monkeypatch):
    """Later octaves compiled ahead in a background thread are the programs the in-line path
    compiles: the same dream, bit for bit."""
    plan = OctavePlan.keras(3, 1.4)
    params = CellParams.make(np.ones((2, 2)), 10.0, iterations=3, jitter=4, seed=[0, 1])
    images = _images(tiny_backbone, 2, 84, 92)
    ahead = dream.dream(tiny_backbone, images, params, DreamConfig(taps=TAPS), plan)
    assert ahead.dreamer.programs() == 3 and len(ahead.dreamer._ahead) == 2  # octaves 2 and 3 ahead
    monkeypatch.setenv("DREAMJAX_PREFETCH", "0")
    inline = dream.dream(tiny_backbone, images, params, DreamConfig(taps=TAPS), plan)
    assert inline.dreamer.programs() == 3 and not inline.dreamer._ahead
    np.testing.assert_array_equal(ahead.final, inline.final)
    for a, b in zip(ahead.octave_losses, inline.octave_losses):
        np.testing.assert_array_equal(a, b)


def test_octave_shapes_follow_the_sources():
    assert OctavePlan.keras(3, 1.4).shapes(299, 400) == [(152, 204), (213, 285), (299, 400)]  # int(d / 1.4**i)
    assert OctavePlan((-2, -1, 0, 1, 2), 1.3, "none").shapes(100, 100)[-1] == (169, 169)  # int(d * 1.3**2)
    assert OctavePlan.keras(4, 1.4, "google").shapes(100, 100)[0] == (36, 36)  # successive round(d / 1.4)


def test_tiled_equals_untiled_when_the_image_fits(tiny_backbone):
    params = CellParams.make(np.ones((2, 2)), 10.0, iterations=3, seed=[0, 1])
    images = _images(tiny_backbone, 2, 64, 64)
    a = dream.dream(tiny_backbone, images, params, DreamConfig(taps=TAPS), PLAN).final
    b = dream.dream(tiny_backbone, images, params, DreamConfig(taps=TAPS, tile_size=64), PLAN).final
    assert np.abs(a - b).max() == 0


def test_tiled_gradient_sums_tile_gradients(tiny_backbone):
    """Four 32px tiles of a 64px image: the tiled gradient is the sum of each tile's own gradient."""
    import jax.numpy as jnp

    cfg = DreamConfig(taps=TAPS, tile_size=32)
    f = tiny_backbone.feature_fn(TAPS)
    untiled = dream.make_grad_fn(f, DreamConfig(taps=TAPS))
    tiled = dream.make_grad_fn(f, cfg)
    x = jnp.asarray(_images(tiny_backbone, 1, 64, 64))
    w = jnp.ones((1, 2))
    _, g = tiled(tiny_backbone.variables, x, w)
    for y0 in (0, 32):
        for x0 in (0, 32):
            _, gt = untiled(tiny_backbone.variables, x[:, y0:y0 + 32, x0:x0 + 32], w)
            np.testing.assert_allclose(np.asarray(g[:, y0:y0 + 32, x0:x0 + 32]), np.asarray(gt), atol=1e-6)


def test_tiled_dream_of_an_image_four_times_the_tile(tiny_backbone):
    params = CellParams.make(np.ones((1, 2)), 10.0, jitter=16, iterations=2)
    run = dream.dream(tiny_backbone, _images(tiny_backbone, 1, 128, 128), params,
                      DreamConfig(taps=TAPS, tile_size=32, norm="std"), OctavePlan((0,), 1.4, "none"))
    assert run.final.shape == (1, 128, 128, 3) and np.isfinite(run.final).all()


@pytest.mark.parametrize("make, match", [
    (lambda bb: dream.Dreamer(bb, DreamConfig(taps=("conv9",)), PLAN, 3), r"unknown tap.*conv9.*allowed: conv1"),
    (lambda bb: dream.DreamRun(dream.Dreamer(bb, DreamConfig(taps=TAPS), PLAN, 3), _images(bb, 1),
                               CellParams.make(np.ones((1, 3)), 1.0, iterations=3)),
     r"layers.weights has 3 values per cell but layers.taps has 2"),
    (lambda bb: dream.DreamRun(dream.Dreamer(bb, DreamConfig(taps=TAPS), PLAN, 3), _images(bb, 1),
                               CellParams.make(np.ones((1, 2)), 0.0, iterations=3)), r"dream.step_size must be > 0"),
    (lambda bb: OctavePlan.keras(3, 1.0), r"dream.octave_scale must be > 1"),
    (lambda bb: dream.DreamRun(dream.Dreamer(bb, DreamConfig(taps=TAPS), OctavePlan.keras(6, 1.6), 3),
                               _images(bb, 1), CellParams.make(np.ones((1, 2)), 1.0, iterations=3)),
     r"octave 0 .* is 9x10 for a 96x112 image, below tiny's minimum input size 16"),
    (lambda bb: DreamConfig(taps=TAPS, norm="l3"), r"dream.norm='l3' is not allowed; choose one of: l2, mean_abs, std"),
])
def test_bad_settings_fail_before_compute(tiny_backbone, make, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        make(tiny_backbone)


def test_resume_in_chunks_equals_one_go(tiny_backbone):
    """Chunked advance (what checkpointing does) gives bit-identical results."""
    params = CellParams.make(np.ones((2, 2)), [10.0, 5.0], jitter=4, iterations=[7, 5], seed=[0, 1])
    cfg = DreamConfig(taps=TAPS, frame_every=2)
    images = _images(tiny_backbone, 2)
    d = dream.Dreamer(tiny_backbone, cfg, PLAN, 7)
    a = dream.DreamRun(d, images, params).run()
    b = dream.DreamRun(d, images, params).run(chunk=3)
    assert np.array_equal(a.final, b.final)
    for fa, fb in zip(a.octave_frames, b.octave_frames):
        assert np.array_equal(fa, fb)
    assert d.programs() == len(PLAN.exponents)  # one program per octave shape, whatever the chunking


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_compute_dtype_close_to_float32(tiny_backbone, dtype):
    params = CellParams.make(np.ones((1, 2)), 0.01, iterations=3)
    images = _images(tiny_backbone, 1)
    a = dream.dream(tiny_backbone, images, params, DreamConfig(taps=TAPS, norm="mean_abs"), PLAN).final
    b = dream.dream(tiny_backbone, images, params, DreamConfig(taps=TAPS, norm="mean_abs", compute_dtype=dtype),
                    PLAN).final
    # The image stays float32; only activations are bf16. Measured on this setup (tiny backbone,
    # 2 octaves x 3 steps of 0.01 * g / mean|g|): max |a - b| 0.114, mean 8.2e-4 while the dream
    # moved pixels by 0.039 on average, correlation of the two updates 0.9990. Bounds at about
    # twice (max) and five times (mean) the measured values: a real bf16 regression breaks them.
    assert b.dtype == np.float32
    d = np.abs(a - b)
    assert d.max() <= 0.25, d.max()
    assert d.mean() <= 0.1 * np.abs(a - images).mean(), (d.mean(), np.abs(a - images).mean())
    assert np.corrcoef((a - images).ravel(), (b - images).ravel())[0, 1] > 0.995


@pytest.fixture(scope="module")
def lite():
    from dreamjax import load_backbone

    return load_backbone("efficientnet_lite0")


def test_loss_rises_over_an_octave_on_real_weights(lite, paintings_dir):
    from dreamjax.outputs import images as im

    names = ["van_gogh_starry_night", "vermeer_girl_with_a_pearl_earring"]
    px = np.stack([im.resize_uint8(im.load_painting(paintings_dir / f"{n}.jpg").pixels, (128, 128)) for n in names])
    taps = ("block7", "block9", "block10_dwpre", "block12")
    w = np.array([[0.5 / 40, 1 / 31, 1 / 3, 0.5 / 28], [0.1, 0.3, 4.0, 5.0]]) * np.array([1, 1, 1, 1])
    params = CellParams.make(w, 0.015, jitter=16, iterations=8, seed=[0, 1])
    cfg = DreamConfig(taps=taps, norm="mean_abs", border=0, clip=True, value_range=lite.value_range,
                      straight_through=True)
    run = dream.dream(lite, np.asarray(lite.preprocess(px)), params, cfg, OctavePlan((0,), 1.4, "none"))
    total = np.einsum("sbt,bt->sb", run.octave_losses[0], w)
    assert np.all(total[-1] > 1.2 * total[0]), total


def test_auto_tile_follows_xla_memory(tiny_backbone):
    from dreamjax.sweep.executor import auto_tile_size, gradient_bytes_per_pixel

    per_px = gradient_bytes_per_pixel(tiny_backbone, ("conv2", "conv3"))
    assert per_px > 12  # at least the float32 input and its gradient
    assert auto_tile_size(tiny_backbone, ("conv2", "conv3"), (256, 256), budget_gb=1.0) == 0
    budget = 300 * 300 * per_px / 2**30  # fits a 300x300 tile, not 4096x4096
    t = auto_tile_size(tiny_backbone, ("conv2", "conv3"), (4096, 4096), budget_gb=budget)
    assert t % 64 == 0 and 256 <= t <= 300
    assert auto_tile_size(tiny_backbone, ("conv2", "conv3"), (4096, 4096), budget_gb=budget, batch=4) < t


def test_constant_weights_is_the_same_dream(tiny_backbone):
    params = CellParams.make(np.ones((2, 2)), [0.01, 0.02], jitter=4, iterations=4, seed=[0, 1])
    images = _images(tiny_backbone, 2)
    a = dream.dream(tiny_backbone, images, params, DreamConfig(taps=TAPS, norm="mean_abs"), PLAN).final
    b = dream.dream(tiny_backbone, images, params, DreamConfig(taps=TAPS, norm="mean_abs", constant_weights=True),
                    PLAN).final
    assert np.abs(a - images).max() > 0.01  # the dream moved
    np.testing.assert_allclose(a, b, atol=1e-5)  # same math; XLA folds it with other rounding


@pytest.mark.parametrize("objective", ["mean_square", "keras_io", "mean"])
def test_objectives_are_what_their_sources_compute(objective):
    """DLwP: mean of the cropped squares; keras.io: sum of the cropped squares over the uncropped
    size; TF tutorial: the plain mean of the activations, no crop."""
    rng = np.random.default_rng(0)
    acts = {"a": rng.normal(size=(3, 9, 11, 4)).astype(np.float32),
            "b": rng.normal(size=(3, 6, 5, 2)).astype(np.float32)}
    cfg = DreamConfig(taps=("a", "b"), objective=objective, border=2)
    got = np.asarray(dream.tap_losses(acts, ("a", "b"), cfg))
    want = np.zeros((3, 2))
    for j, t in enumerate(("a", "b")):
        a = acts[t].astype(np.float64)
        inner = a[:, 2:-2, 2:-2, :]
        for i in range(3):
            if objective == "mean_square":
                want[i, j] = np.mean(inner[i] ** 2)
            elif objective == "keras_io":
                want[i, j] = np.sum(inner[i] ** 2) / a[i].size
            else:
                want[i, j] = np.mean(a[i])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
