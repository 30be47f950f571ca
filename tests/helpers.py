"""Helpers shared by the test modules (one place; fixtures live in conftest.py, session-scoped, so
the slow reference sweep runs once per session however many modules use it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAINTINGS = REPO / "dreamjax" / "data" / "paintings"

# ----------------------------------------------------------------------------------------------
# The real CLI on small sweeps
# ----------------------------------------------------------------------------------------------
THREE = [PAINTINGS / f"{n}.jpg" for n in ("kandinsky_composition_vii", "monet_water_lilies_1919", "turner_shipwreck")]
SMALL = ["model=tiny", "dream=dlwp", "dream.num_octaves=2", "dream.iterations=4", "data.image_size=192",
         "outputs.gif_max_side=96", "dream.frame_every=2"]


def dreamjax(*args, cwd, check=True, env=None):
    e = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "dreamjax.cli", *args], cwd=cwd, capture_output=True, text=True,
                       env=e, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"dreamjax {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}")
    return p


TWO = [PAINTINGS / f"{n}.jpg" for n in ("kandinsky_composition_vii", "turner_shipwreck")]
SWEEP = ["-m", "model=tiny", "layers=tiny_set1,tiny_set2", "data.paths=" + ",".join(str(p) for p in TWO),
         "data.image_size=192", "dream=dlwp", "dream.iterations=6", "dream.num_octaves=2", "dream.frame_every=2",
         "checkpoint.every_steps=2", "batch_size=2", "outputs.gif_max_side=96", "analyze=false"]
OUTPUTS = ("dream.png", "octave_0.png", "octave_1.png", "frames.gif", "losses.json")


def cli(sweep_dir, *extra, env=None, check=True, args=SWEEP):
    e = dict(os.environ, **(env or {}))
    e.pop("DREAMJAX_TEST_KILL_AT", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "dreamjax.cli", *args, f"hydra.sweep.dir={sweep_dir}", *extra],
                       cwd=Path(sweep_dir).parent, capture_output=True, text=True, env=e, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"dreamjax failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def outputs(sweep_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(sweep_dir)): p.read_bytes() for p in sorted(sweep_dir.rglob("*"))
            if p.name in OUTPUTS or p.name.startswith("octave_")}


def assert_complete_and_identical(ref: Path, sw: Path, n_cells=4):
    a, b = outputs(ref), outputs(sw)
    assert len(a) == n_cells * len(OUTPUTS) and sorted(a) == sorted(b)
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"outputs differ from the uninterrupted run: {diff}"
    leftovers = [str(p) for p in sw.rglob("*") if p.name.endswith(".tmp") or "orbax-checkpoint-tmp" in p.name
                 or (p.name.startswith(".") and p.name.endswith("tmp"))]
    assert not leftovers, leftovers
    ck = sw / ".checkpoints"
    assert not ck.exists() or not any(ck.iterdir()), list(ck.rglob("*"))[:5]
    m = json.loads((sw / "manifest.json").read_text())
    assert m["counts"]["done"] == n_cells and m["counts"]["failed"] == 0 and len(m["cells"]) == n_cells


def missing(why: str):
    """A component that .ci/run installs is missing: a failure in CI (DREAMJAX_CI=1), else a skip
    that says how to get it. Tests never count a skipped check as passing in CI."""
    import pytest

    if os.environ.get("DREAMJAX_CI"):
        pytest.fail(f"{why} (CI installs it: see .ci/run)")
    pytest.skip(why)


def dlwp_octaves(img, hw, resize, ascend, num_octave: int = 3, octave_scale: float = 1.4):
    """Deep Learning with Python's octave loop (ch. 12), as the parity references write it: the
    shapes from ``hw`` (the painting's height, width) down by ``octave_scale``, ``ascend(x)`` at
    each, the detail lost to the shrinking put back; ``resize(x, shape)`` in the caller's layout."""
    shapes = [tuple(hw)] + [tuple(int(d / (octave_scale ** i)) for d in hw) for i in range(1, num_octave)]
    shapes = shapes[::-1]
    shrunk = resize(img, shapes[0])
    x = img.copy()
    for shape in shapes:
        x = ascend(resize(x, shape))
        x = x + (resize(img, shape) - resize(shrunk, shape))
        shrunk = resize(img, shape)
    return x
