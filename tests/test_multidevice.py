"""The batch axis sharded over every local device (CPU with forced host devices, in a subprocess).

Fast: the engine in one process with 2 host devices: a sharded batch (run.shard_batch, donated
buffers, the jitted while-loop) equals the same batch on one device to 1e-5; the batch stays
sharded across octaves; a checkpoint restored under sharding continues bit-identically.
Slow: the real CLI on 2 devices vs 1 device (PNG pixels within 1 level, losses to 1e-5), and a
2-device run killed and resumed gives the 2-device uninterrupted bytes.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from tests.helpers import cli, outputs  # noqa: F401

ENV2 = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}

SCRIPT = textwrap.dedent("""
    import os, sys, numpy as np, jax
    jax.config.update("jax_compilation_cache_dir", os.environ["TEST_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from jax.sharding import NamedSharding
    from dreamjax import load_backbone
    from dreamjax.sweep import checkpoint
    from dreamjax.engine import dream
    from dreamjax.engine.dream import CellParams, DreamConfig, OctavePlan
    from dreamjax.sweep.executor import shard_batch
    assert jax.local_device_count() == 2, jax.devices()
    bb = load_backbone("tiny")
    rng = np.random.default_rng(0)
    images = np.asarray(bb.preprocess(rng.integers(0, 256, (4, 96, 112, 3)).astype(np.float32)))
    params = CellParams.make(rng.uniform(0.5, 2, (4, 2)), [10.0, 5.0, 2.0, 8.0], jitter=[0, 4, 2, 3],
                             iterations=[7, 5, 7, 6], seed=[0, 1, 2, 3])
    d = dream.Dreamer(bb, DreamConfig(taps=("conv2", "conv3"), frame_every=2, optimizer="adam"),
                      OctavePlan.keras(2, 1.4), 7)
    one = dream.DreamRun(d, images, params).run(chunk=3)
    run = dream.DreamRun(d, shard_batch(images), shard_batch(params))
    specs = []
    while not run.done:
        run.advance(3)
        if run.state is not None:
            s = run.state.image.sharding
            specs.append(isinstance(s, NamedSharding) and len(s.device_set) == 2 and s.spec[0] == "batch")
    assert all(specs) and len(specs) >= 3, specs
    two = run
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(one.octave_images, two.octave_images))
    ldiff = max(float(np.nanmax(np.abs(np.asarray(a) - np.asarray(b)) / (np.abs(np.asarray(a)) + 1e-6)))
                for a, b in zip(one.octave_losses, two.octave_losses))  # relative
    # checkpoint under sharding: save mid octave 1, restore into a fresh sharded run, continue
    r = dream.DreamRun(d, shard_batch(images), shard_batch(params))
    ck = checkpoint.BatchCheckpointer(sys.argv[1], {"batch_id": "x"})
    for _ in range(4):
        r.advance(3); ck.save(r)
    ck.close()
    r2 = dream.DreamRun(d, shard_batch(images), shard_batch(params))
    assert checkpoint.BatchCheckpointer(sys.argv[1], {"batch_id": "x"}).restore_into(r2)
    s2 = r2.state.image.sharding
    assert isinstance(s2, NamedSharding) and len(s2.device_set) == 2 and s2.spec[0] == "batch", s2
    r2.run(chunk=3)
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(r2.octave_images, two.octave_images))
    print("RESULT", diff, ldiff, same, d.programs())
""")


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_sharded_batch_equals_single_device(tmp_path):
    env = dict(os.environ, **ENV2, TEST_JAX_CACHE=jax.config.jax_compilation_cache_dir or str(tmp_path / "jc"))
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ck")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    diff, ldiff, same, programs = p.stdout.split("RESULT")[-1].split()
    assert float(diff) <= 1e-5, f"images differ by {diff} between 1 and 2 devices"
    assert float(ldiff) <= 1e-5, f"losses differ by {ldiff} (relative)"
    assert same == "True", "a checkpoint restored under sharding did not continue bit-identically"
    # One program per octave shape (2) for each input layout the dreamer met: single-device, sharded,
    # and restored from a checkpoint (orbax returns committed arrays, which jit keys separately;
    # measured: 6; a resumed batch loads its programs from the persistent cache).
    assert int(programs) == 3 * 2, f"{programs} octave programs compiled, expected 2 per input layout"


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


@pytest.mark.slow
def test_cli_on_two_devices_matches_one_and_resumes_exactly(reference, tmp_path):  # noqa: F811
    two = tmp_path / "two"
    cli(two, env=ENV2)
    worst = 0
    a, b = outputs(reference), outputs(two)
    assert sorted(a) == sorted(b)
    for rel in a:
        if rel.endswith(".png"):
            d = int(np.abs(_pixels(reference / rel) - _pixels(two / rel)).max())
            worst = max(worst, d)
        elif rel.endswith("losses.json"):
            la, lb = (json.loads((s / rel).read_text()) for s in (reference, two))
            fa = [v for o in la["octaves"] for st in o["per_tap"] if st for v in st]
            fb = [v for o in lb["octaves"] for st in o["per_tap"] if st for v in st]
            np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-6)
    assert worst <= 1, f"2-device PNGs differ from 1-device ones by {worst} levels"
    # killed and resumed on 2 devices: the 2-device bytes exactly
    killed = tmp_path / "killed"
    p = cli(killed, env=dict(ENV2, DREAMJAX_TEST_KILL_AT="step:4"), check=False)
    assert p.returncode == -signal.SIGKILL
    p = cli(killed, env=ENV2)
    assert "resumed batch" in p.stdout + p.stderr
    c = outputs(killed)
    assert [k for k in b if b[k] != c[k]] == []
