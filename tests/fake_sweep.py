"""A hand-built sweep whose every number the tests know (cell records, dreams, losses, GIFs),
and a classifier that looks images up by their bytes: shared by the analysis and browser tests."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from dreamjax import files
from dreamjax.outputs import analysis, images
from dreamjax.sweep import jobs as sweep

LABELS = analysis.imagenet_labels()
EGYPTIAN_CAT, GOLDEN, GOLDFINCH, VOLCANO, TIMBER_WOLF = 285, 207, 11, 980, 269
# Originals' top-5 (class, prob): mostly objects.
ORIG_TOP = {
    "alpha": [(400, 0.30), (401, 0.20), (402, 0.10), (950, 0.05), (403, 0.05)],
    "beta": [(500, 0.40), (501, 0.10), (502, 0.08), (503, 0.06), (504, 0.04)],
    "gamma": [(600, 0.25), (601, 0.20), (EGYPTIAN_CAT, 0.10), (602, 0.05), (603, 0.05)],
}
# Dreams' top-5 per (set, painting).
DREAM_TOP = {
    ("setA", "alpha"): [(EGYPTIAN_CAT, 0.35), (GOLDEN, 0.20), (400, 0.10), (GOLDFINCH, 0.05), (401, 0.04)],
    ("setA", "beta"): [(EGYPTIAN_CAT, 0.30), (500, 0.20), (GOLDEN, 0.10), (TIMBER_WOLF, 0.06), (501, 0.05)],
    ("setA", "gamma"): [(EGYPTIAN_CAT, 0.50), (600, 0.10), (GOLDEN, 0.08), (601, 0.06), (602, 0.02)],
    ("setB", "alpha"): [(VOLCANO, 0.60), (400, 0.10), (401, 0.05), (402, 0.04), (403, 0.03)],
    ("setB", "beta"): [(500, 0.40), (501, 0.10), (502, 0.08), (503, 0.06), (504, 0.04)],  # = original
}
SHAPES = {"alpha": (90, 60), "beta": (50, 100), "gamma": (72, 72)}  # painting sizes (h, w)
TAPS = {"setA": ["t1", "t2"], "setB": ["t1", "t2", "t3"]}
WEIGHTS = {"setA": [1.0, 2.0], "setB": [0.5, 1.0, 3.0]}
LONG_SIDE = 64


def _key(img: np.ndarray) -> str:
    a = np.ascontiguousarray(np.asarray(img)[..., :3], dtype=np.uint8)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()


def _probs(top) -> np.ndarray:
    p = np.zeros(1000)
    for i, v in top:
        p[i] = v
    rest = [i for i in range(1000) if p[i] == 0]
    p[rest] = (1.0 - p.sum()) / len(rest)  # every other class below the 5th
    return p


class FakeClassifier:
    """Registry of exact images -> probabilities; features = mean colour (3 numbers)."""

    def __init__(self):
        self.table: dict[str, np.ndarray] = {}
        self.calls = 0
        self.seen = 0

    def register(self, img, top):
        self.table[_key(img)] = _probs(top)

    def __call__(self, backbone, weights):
        assert backbone == "tiny"

        def predict(imgs):
            self.calls += 1
            self.seen += len(imgs)
            probs = np.stack([self.table[_key(im)] for im in imgs])  # KeyError = unexpected image
            feats = np.stack([np.asarray(im, np.float64).reshape(-1, 3).mean(0) for im in imgs])
            return probs, feats

        return analysis.Classifier(labels=LABELS, predict=predict, imagenet=True, name="fake", weights_id="w0")


def _losses(rng, taps, octave_steps):
    """losses.json like run.py writes it; the last octave ends with frozen (None) steps."""
    octs = []
    for k, n in enumerate(octave_steps):
        rows = [[float(v) for v in rng.uniform(0.5, 5.0, len(taps))] for _ in range(n)]
        if k == len(octave_steps) - 1:
            rows += [None, None]
        octs.append({"octave": k, "shape": [32 * (k + 1), 32 * (k + 1)], "per_tap": rows})
    return octs


def build_sweep(root: Path, clf: FakeClassifier | None = None, backbone: str = "tiny") -> dict:
    """A 2-set x 3-painting sweep (setB/gamma failed) in ``root``; returns its manifest."""
    rng = np.random.default_rng(0)
    src = root / "paintings"
    src.mkdir(parents=True)
    paths = {}
    for name, (h, w) in SHAPES.items():
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                        rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        paths[name] = images.save_png(src / f"{name}.png", img)
    sweep_dir = root / "sweep"
    records = []
    for job, layers in enumerate(["setA", "setB"]):
        job_dir = sweep_dir / str(job)
        for name in SHAPES:
            out = job_dir / name
            out.mkdir(parents=True)
            base = {"id": f"{job}/{name}", "job": job, "job_dir": str(job_dir), "painting": name,
                    "painting_path": str(paths[name]), "layers": layers, "label": layers,
                    "taps": TAPS[layers], "layer_weights": WEIGHTS[layers], "backbone": backbone,
                    "overrides": [f"layers={layers}", "model=tiny"], "hyper": {"iterations": 4}}
            if (layers, name) not in DREAM_TOP:
                rec = base | {"status": "failed", "error": "ConfigError: too small", "outputs": {}}
                files.write_json(out / "cell.json", rec)
                records.append(rec)
                continue
            pix = images.load_painting(paths[name]).pixels
            dh, dw = images.restored_size((pix.shape[1], pix.shape[0]), LONG_SIDE)[::-1]
            orig = images.resize_uint8(pix, (dh, dw))
            dream = np.clip(orig.astype(int) + rng.integers(-40, 41, orig.shape), 0, 255).astype(np.uint8)
            images.save_png(out / "dream.png", dream)
            images.save_png(out / "octave_0.png", dream[::2, ::2])
            images.save_gif(out / "frames.gif", [orig, dream], max_side=64)
            files.write_json(out / "losses.json", {"taps": TAPS[layers], "layer_weights": WEIGHTS[layers],
                                                    "octaves": _losses(rng, TAPS[layers], [4, 3])})
            if clf is not None:
                clf.register(orig, ORIG_TOP[name])
                clf.register(dream, DREAM_TOP[(layers, name)])
            rel = lambda f, name=name: f"{name}/{f}"  # noqa: E731
            rec = base | {"status": "done", "error": None, "weights_id": "w0", "final_loss": 1.0,
                          "outputs": {"dream": rel("dream.png"), "gif": rel("frames.gif"),
                                      "losses": rel("losses.json"), "octaves": [rel("octave_0.png")]}}
            files.write_json(out / "cell.json", rec)
            records.append(rec)
    manifest = sweep.build_manifest(sweep_dir, sweep.find_records(sweep_dir))
    files.write_json(sweep_dir / "manifest.json", manifest)
    return manifest
