"""What did a sweep's dreams do? Hallucinated classes, per-layer energy, how far images moved.

``dreamjax-analyze SWEEP_DIR`` (or :func:`analyze`) reads a finished sweep (``manifest.json``
and the per-cell outputs ``dream.png`` / ``losses.json``) and writes, per sweep:

* ``analysis.json`` — every number below, per cell and per weight set (``layers`` name);
* ``analysis.md``   — a short human-readable report with tables and the plots;
* ``analysis/*.png`` — loss curves, class-family shares, pixel/perceptual change (matplotlib,
  optional: skipped with a logged note when it is not installed);
* ``index.html``    — the gallery rewritten with each dream's new classes under it.

Definitions (all computed from files, numpy only, except the classifier forward pass):

**Originals.** A cell's original is its painting (``manifest["paintings"][name]["path"]``,
loaded like the run loads it) resized with :func:`dreamjax.outputs.images.resize_uint8` to the dream's
own size (``dream.png`` is the final image at the painting's aspect, long side =
``data.image_size``). Pixel and perceptual change compare exactly these two images.

**Classification.** Originals and dreams go through the backbone's own classifier top
(``load_backbone(name, weights, include_top=True)``), softmax probabilities. Each image is
resized to a fixed input per aspect bucket (:func:`dreamjax.outputs.images.bucket_shape` with the
classifier's training resolution as long side, e.g. 224 for EfficientNet-Lite0), and images
are run in fixed-size padded batches: one compilation per bucket. The classifier is
injectable (``analyze(..., classifier=...)``), see :class:`Classifier`.

**Hallucinated classes** of a cell: the classes in the dream's top-5 that are not in its
original's top-5. Per weight set, a class is counted once per *painting* on which any of the
set's cells hallucinated it: "lite_set3: 'Egyptian_cat' in 7 of 12 paintings" (N = paintings
with a finished cell in that set); the number of cells is kept too.

**Families** (ImageNet-1k index ranges, WordNet order; see :data:`FAMILY_RANGES`): dogs =
the domestic breeds 151–268 only (wolves, foxes, wild dogs and the hyena, 269–280, are "other
animals": the DeepDream "dog-slug" look comes from the breeds); cats = 281–293 (domestic
281–285 and big cats 286–293); birds = 7–24, 80–100, 127–146; other animals = the rest of
0–397 (fish, amphibians, reptiles, invertebrates, insects, wild mammals, primates); objects =
398–923 and 999 (toilet tissue); "food, plants & scenes" = 924–998 (food 924–969, landscapes
970–980, the three person classes 981–983, plants and fungi 984–998). A family's *share* for
an image = the softmax probability mass of its top-5 classes in that family divided by the
top-5 mass (so the shares of one image sum to 1); a set's share = the mean over its dreams
(and, for comparison, over the same cells' originals). A classifier that is not 1000-class
ImageNet (the test-only ``tiny`` backbone's 10 random classes) gets no families.

**Layer energy.** ``losses.json`` holds each tap's unweighted loss (mean square activation,
the "activation energy") measured before every step of every octave. ``energy_ratio[tap]`` =
last recorded step of the last octave / first step of the first octave. Octave rescaling
matters: the first octave dreams a downscaled image and the last a full-size one, and the
mean square of an activation also changes with the image scale, so this ratio mixes the
dream's effect with the resize; ``octave_energy_ratios[tap]`` (last/first step *within* each
octave) are free of it. ``final_share[tap]`` = that tap's share of the weighted objective
``w_tap · loss_tap / Σ w · loss`` at the last step: what each layer contributes. Set values
are arithmetic means over the set's cells.

**Change.** ``pixel_change`` = mean |dream − original| over all pixels and channels, on the
0–255 scale. ``perceptual_change`` = cosine distance (1 − cos) between the globally average
pooled features of the backbone's *deepest tap* (the penultimate features that feed the
classifier: ``head`` for EfficientNet-Lite0, ``mixed10`` for InceptionV3) of original and
dream: the same layer for every cell, so sets are comparable (a set's own deepest tap would
not be).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dreamjax import files
from dreamjax.models.registry import load_backbone
from dreamjax.outputs import images, report

log = logging.getLogger("dreamjax")

__all__ = [
    "Classifier", "BackboneClassifier", "analyze", "analyze_after_collect", "main", "family_of",
    "FAMILY_RANGES", "FAMILIES", "energy_stats", "loss_curves", "pixel_change", "cosine_distance",
    "imagenet_labels", "hallucinated", "family_shares",
]

TOP_K = 5
ANALYSIS_JSON = "analysis.json"
ANALYSIS_MD = "analysis.md"
PLOTS_DIR = "analysis"
IMAGENET_LABELS = files.IMAGENET_LABELS

# ImageNet-1k class-index ranges (inclusive) per coarse family; indices not listed are "objects".
FAMILY_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "dogs": ((151, 268),),  # domestic breeds only; wild canids 269-280 are "other animals"
    "cats": ((281, 293),),  # 281-285 domestic, 286-293 big cats
    "birds": ((7, 24), (80, 100), (127, 146)),
    "other animals": ((0, 6), (25, 79), (101, 126), (147, 150), (269, 280), (294, 397)),
    "food, plants & scenes": ((924, 998),),
    "objects": ((398, 923), (999, 999)),
}
FAMILIES = tuple(FAMILY_RANGES)
# Training resolution of each classifier (long side of the classification input).
CLASSIFIER_SIZE = {"inception_v3": 299, "efficientnet_lite0": 224, "tiny": 64}


def family_of(index: int) -> str:
    """Coarse family of an ImageNet-1k class index (see :data:`FAMILY_RANGES`)."""
    i = int(index)
    if not 0 <= i < 1000:
        raise ValueError(f"ImageNet class index out of range: {index}")
    for fam, ranges in FAMILY_RANGES.items():
        if any(a <= i <= b for a, b in ranges):
            return fam
    return "objects"


def imagenet_labels() -> list[str]:
    labels = [line.strip() for line in IMAGENET_LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != 1000:
        raise ValueError(f"{IMAGENET_LABELS}: expected 1000 ImageNet labels, found {len(labels)}")
    return labels


# ---------------------------------------------------------------------------------------------
# Classifiers


@dataclasses.dataclass
class Classifier:
    """What the analysis needs from a classifier; inject one into :func:`analyze` for tests.

    ``predict(list of uint8 H×W×3 images, any sizes) -> (probs [N, C], features [N, D])``:
    class probabilities (rows sum to 1) and the pooled features used for perceptual change.
    ``imagenet``: the C = 1000 classes are ImageNet's, in index order (enables families).
    """

    labels: Sequence[str]
    predict: Callable[[Sequence[np.ndarray]], tuple[np.ndarray, np.ndarray]]
    imagenet: bool = False
    name: str = "classifier"
    weights_id: str = ""
    feature_layer: str = ""


class BackboneClassifier(Classifier):
    """A registered backbone's own classifier top, batched and jitted per aspect bucket."""

    def __init__(self, backbone: str, weights: Any = "auto", batch_size: int = 8, input_size: int | None = None):
        bb = load_backbone(backbone, weights=weights, include_top=True)
        self.bb = bb
        self.batch_size = int(batch_size)
        self.input_size = int(input_size or CLASSIFIER_SIZE.get(backbone, 224))
        self.compilations = 0
        n = bb.spec.num_classes
        imagenet = n == 1000
        labels = imagenet_labels() if imagenet else [f"{backbone}_class_{i}" for i in range(n)]
        deepest = bb.taps[-1]
        module, variables = bb.module, bb.variables

        def fwd(v, pixels):
            x = bb.spec.preprocess(pixels.astype(jnp.float32))
            logits, acts = module.apply(v, x)
            feats = acts[deepest].astype(jnp.float32).mean(axis=(1, 2))
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), feats

        jitted = jax.jit(fwd)
        seen: set = set()

        def predict(imgs: Sequence[np.ndarray]):
            probs = np.zeros((len(imgs), n), np.float32)
            feats: np.ndarray | None = None
            groups: dict[tuple[int, int], list[int]] = defaultdict(list)
            resized = []
            for i, im in enumerate(imgs):
                im = _rgb(im)
                shape = images.bucket_shape(im.shape[0], im.shape[1], self.input_size)
                resized.append(images.resize_uint8(im, shape))
                groups[shape].append(i)
            for shape, idx in groups.items():
                for s in range(0, len(idx), self.batch_size):
                    chunk = idx[s:s + self.batch_size]
                    batch = np.zeros((self.batch_size, *shape, 3), np.uint8)  # fixed batch: one program
                    for j, i in enumerate(chunk):
                        batch[j] = resized[i]
                    if shape not in seen:
                        seen.add(shape)
                        self.compilations += 1
                    p, f = jitted(variables, batch)
                    p, f = np.asarray(p), np.asarray(f)
                    if feats is None:
                        feats = np.zeros((len(imgs), f.shape[-1]), np.float32)
                    probs[chunk] = p[:len(chunk)]
                    feats[chunk] = f[:len(chunk)]
            return probs, (feats if feats is not None else np.zeros((0, 0), np.float32))

        super().__init__(labels=labels, predict=predict, imagenet=imagenet, name=backbone,
                         weights_id=bb.weights_id, feature_layer=f"{deepest} (global average pool)")


def _rgb(im: np.ndarray) -> np.ndarray:
    a = np.asarray(im)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return a[..., :3]


# ---------------------------------------------------------------------------------------------
# Pure numpy pieces


def pixel_change(original: np.ndarray, dream: np.ndarray) -> float:
    """Mean |dream − original| on the 0–255 scale (same shape, RGB)."""
    a, b = _rgb(original).astype(np.float64), _rgb(dream).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pixel_change needs equal shapes, got {a.shape} and {b.shape}")
    return float(np.abs(b - a).mean())


def cosine_distance(u: np.ndarray, v: np.ndarray) -> float:
    u, v = np.asarray(u, np.float64).ravel(), np.asarray(v, np.float64).ravel()
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return float("nan")
    return float(1.0 - np.dot(u, v) / (nu * nv))


def _octave_rows(losses: Mapping) -> list[list[list[float]]]:
    """losses.json -> per octave, the recorded steps (rows of per-tap losses; gaps dropped)."""
    ntap = len(losses.get("taps") or [])
    return [[list(map(float, r)) for r in (o.get("per_tap") or []) if r is not None and len(r) == ntap]
            for o in losses.get("octaves") or []]


def energy_stats(losses: Mapping) -> dict:
    """Per-tap activation-energy numbers of one cell's ``losses.json`` (see the module doc)."""
    taps = [str(t) for t in losses.get("taps") or []]
    w = [float(x) for x in (losses.get("layer_weights") or [1.0] * len(taps))]
    octs = [o for o in _octave_rows(losses) if o]
    if not taps or not octs:
        return {}
    first, last = octs[0][0], octs[-1][-1]
    ratio = lambda a, b: float(b / a) if a else float("nan")  # noqa: E731
    total_last = sum(wi * li for wi, li in zip(w, last))
    return {
        "taps": taps,
        "initial": dict(zip(taps, first)),
        "final": dict(zip(taps, last)),
        "energy_ratio": {t: ratio(first[j], last[j]) for j, t in enumerate(taps)},
        "octave_energy_ratios": {t: [ratio(o[0][j], o[-1][j]) for o in octs] for j, t in enumerate(taps)},
        "final_share": {t: (w[j] * last[j] / total_last if total_last else float("nan")) for j, t in enumerate(taps)},
        "steps_per_octave": [len(o) for o in octs],
    }


def loss_curves(losses: Mapping) -> dict:
    """{"taps", "octaves": [{tap: [loss per step]}]} from one cell's ``losses.json``."""
    taps = [str(t) for t in losses.get("taps") or []]
    return {"taps": taps, "octaves": [{t: [r[j] for r in o] for j, t in enumerate(taps)}
                                      for o in _octave_rows(losses)]}


def _topk(p: np.ndarray, k: int = TOP_K) -> list[int]:
    p = np.asarray(p)
    k = min(k, p.shape[-1])
    idx = np.argpartition(-p, k - 1)[:k]
    return [int(i) for i in sorted(idx, key=lambda i: (-p[i], i))]


def hallucinated(dream_probs: np.ndarray, original_probs: np.ndarray, k: int = TOP_K) -> list[int]:
    """Class indices in the dream's top-k but not the original's top-k (by dream probability)."""
    orig = set(_topk(original_probs, k))
    return [i for i in _topk(dream_probs, k) if i not in orig]


def family_shares(probs: np.ndarray, k: int = TOP_K) -> dict[str, float]:
    """Share of the top-k probability mass per family (sums to 1); ImageNet classifiers only."""
    top = _topk(probs, k)
    mass = float(sum(probs[i] for i in top))
    out = {f: 0.0 for f in FAMILIES}
    for i in top:
        out[family_of(i)] += float(probs[i]) / mass if mass > 0 else 1.0 / len(top)
    return out


# ---------------------------------------------------------------------------------------------
# The analysis


def _load_manifest(sweep_dir: Path, manifest: Mapping | None) -> Mapping:
    if manifest is not None:
        return manifest
    p = sweep_dir / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run `dreamjax-collect {sweep_dir}` first (or the sweep is not done)")
    return json.loads(p.read_text())


def _weights_spec(cell: Mapping) -> str:
    """The ``model.weights`` setting a cell ran with, from its record (auto when an old record lacks it)."""
    return str(cell.get("weights") or "auto")


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class _Originals:
    """Each painting resized to a dream's size, cached; the full painting is decoded once and only
    the current one is kept (cells come sorted by painting)."""

    def __init__(self, paintings: Mapping):
        self.paintings = paintings
        self.current: tuple[str, np.ndarray | None] | None = None
        self.resized: dict[tuple, np.ndarray | None] = {}

    def get(self, name: str, shape) -> np.ndarray | None:
        key = (name, tuple(shape))
        if key not in self.resized:
            if self.current is None or self.current[0] != name:
                p = self.paintings.get(name) or {}
                try:
                    pix = _rgb(np.asarray(images.load_painting(p["path"]).pixels))
                except (KeyError, TypeError, images.ImageError, OSError) as e:
                    log.warning("analysis: painting %s unreadable (%s): no original to compare with", name, e)
                    pix = None
                self.current = (name, pix)
            pix = self.current[1]
            self.resized[key] = images.resize_uint8(pix, key[1]) if pix is not None else None
        return self.resized[key]


ClassifierArg = Union[Classifier, Callable[[str, str], Classifier], None]


def analyze(sweep_dir: str | os.PathLike, manifest: Mapping | None = None, *, classifier: ClassifierArg = None,
            plots: bool = True, gallery: bool = True, top_k: int = TOP_K, chunk_size: int = 64) -> dict:
    """Analyse a collected sweep; write analysis.json, analysis.md, plots and the gallery.

    ``classifier``: a :class:`Classifier` used for every cell, or a factory
    ``(backbone_name, weights) -> Classifier``; default: :class:`BackboneClassifier` (the
    backbone's own top). Images are read ``chunk_size`` cells at a time, each chunk classified in
    one ``predict`` call (originals once per painting and dream size). Returns
    ``{"cells": {cell_id: analysis dict}, "sets": {...},
    "gallery": {cell_id: dict for report.render_analysis}, "paths": {...}}`` (the JSON's content).
    """
    sweep_dir = Path(sweep_dir).resolve()
    manifest = _load_manifest(sweep_dir, manifest)
    cells = [c for c in manifest.get("cells") or []]
    done = [c for c in cells if c.get("status") == "done"]
    skipped = {str(c.get("id")): f"status {c.get('status')}" for c in cells if c.get("status") != "done"}
    paintings = manifest.get("paintings") or {}

    # --- what to read: dream files, losses, which classifier ---------------------------------------
    items: list[dict] = []
    for c in sorted(done, key=lambda c: str(c.get("painting"))):  # one painting decoded at a time
        cid = str(c["id"])
        rel = (c.get("outputs") or {}).get("dream")
        if not rel or not (sweep_dir / rel).is_file():
            skipped[cid] = "dream.png missing"
            continue
        losses = {}
        lrel = (c.get("outputs") or {}).get("losses")
        if lrel and (sweep_dir / lrel).is_file():
            try:
                losses = json.loads((sweep_dir / lrel).read_text())
            except ValueError as e:
                log.warning("analysis: unreadable %s: %s", lrel, e)
        items.append({"cell": c, "dream_path": sweep_dir / rel, "losses": losses})
    originals = _Originals(paintings)

    # --- read images in chunks (memory stays bounded), classify each chunk in one call -------------
    by_backbone: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for it in items:
        by_backbone[(str(it["cell"].get("backbone") or manifest.get("backbone")),
                     _weights_spec(it["cell"]))].append(it)
    classifiers: dict[str, dict] = {}
    for (bname, wspec), its in by_backbone.items():
        clf = _get_classifier(classifier, bname, wspec)
        if clf is not None:
            ids = {str(it["cell"].get("weights_id")) for it in its if it["cell"].get("weights_id")}
            mismatch = bool(clf.weights_id) and bool(ids) and ids != {clf.weights_id}
            if mismatch:  # e.g. InceptionV3: the with-top Keras file vs the no-top file the dreams used
                log.info("analysis: classifier weights file %s is not the sweep's %s (same backbone %s)",
                         clf.weights_id[:12], ", ".join(i[:12] for i in ids), bname)
            classifiers[f"{bname}:{wspec}"] = {"backbone": bname, "weights": wspec, "weights_id": clf.weights_id,
                                               "imagenet": clf.imagenet, "classes": len(clf.labels),
                                               "feature_layer": clf.feature_layer, "weights_mismatch": mismatch}
        orig_out: dict[tuple, tuple] = {}  # (painting, shape) -> (probs, feats) of the resized original
        for start in range(0, len(its), chunk_size):
            chunk = its[start:start + chunk_size]
            batch, slots, new_orig = [], [], {}
            for it in chunk:
                dream = _read_rgb(it["dream_path"])
                it["dream_shape"] = list(dream.shape[:2])
                name = str(it["cell"].get("painting"))
                original = originals.get(name, dream.shape[:2])
                key = (name, dream.shape[:2])
                if original is not None:
                    it["pixel_change"] = pixel_change(original, dream)
                    if key not in orig_out and key not in new_orig:
                        new_orig[key] = len(batch)
                        batch.append(original)
                it["orig_key"] = key if original is not None else None
                slots.append(len(batch))
                batch.append(dream)
            if clf is None:
                continue
            probs, feats = clf.predict(batch)
            probs, feats = np.asarray(probs, np.float64), np.asarray(feats, np.float64)
            row = lambda i, probs=probs, feats=feats: (probs[i], feats[i] if feats.size else None)  # noqa: E731
            orig_out.update({k: row(i) for k, i in new_orig.items()})
            for it, i in zip(chunk, slots):
                it["clf"] = clf
                it["probs"], it["feats"] = row(i)
                it["orig_probs"], it["orig_feats"] = orig_out.get(it["orig_key"], (None, None))

    # --- per cell ----------------------------------------------------------------------------------
    out_cells: dict[str, dict] = {}
    for it in items:
        c = it["cell"]
        cid = str(c["id"])
        rec: dict[str, Any] = {"id": cid, "painting": c.get("painting"), "layers": c.get("layers"),
                               "label": c.get("label"), "dream_shape": it["dream_shape"]}
        if it.get("pixel_change") is not None:
            rec["pixel_change"] = it["pixel_change"]
        rec.update(energy_stats(it["losses"]) if it["losses"] else {})
        clf = it.get("clf")
        if clf is not None and it.get("probs") is not None:
            lab = lambda i, clf=clf: str(clf.labels[i])  # noqa: E731
            p = it["probs"]
            rec["dream_top"] = [[lab(i), float(p[i]), i] for i in _topk(p, top_k)]
            if clf.imagenet:
                rec["dream_families"] = family_shares(p, top_k)
            if it.get("orig_probs") is not None:
                po = it["orig_probs"]
                rec["original_top"] = [[lab(i), float(po[i]), i] for i in _topk(po, top_k)]
                rec["hallucinated"] = [[lab(i), float(p[i]), i] for i in hallucinated(p, po, top_k)]
                if clf.imagenet:
                    rec["original_families"] = family_shares(po, top_k)
                if it.get("feats") is not None and it.get("orig_feats") is not None:
                    rec["perceptual_change"] = cosine_distance(it["orig_feats"], it["feats"])
        out_cells[cid] = rec

    sets = _set_summaries(out_cells, items)
    result = {
        "sweep_dir": str(sweep_dir), "backbone": manifest.get("backbone"), "top_k": top_k,
        "classifiers": classifiers, "families": {f: [list(r) for r in FAMILY_RANGES[f]] for f in FAMILIES},
        "definitions": _DEFINITIONS, "cells": out_cells, "sets": sets, "skipped": skipped,
        "gallery": {cid: _gallery_entry(r) for cid, r in out_cells.items()},
        "originals": _originals_entries(out_cells),
    }
    paths: dict[str, Any] = {}
    if plots:
        paths["plots"] = _write_plots(sweep_dir, sets, result)
    result["paths"] = {k: v for k, v in paths.items()}
    files.write_json(sweep_dir / ANALYSIS_JSON, result)
    files.atomic_write_text(sweep_dir / ANALYSIS_MD, render_markdown(result))
    result["paths"]["analysis_json"] = ANALYSIS_JSON
    result["paths"]["analysis_md"] = ANALYSIS_MD
    if gallery:
        write_gallery(sweep_dir, manifest, result)
        result["paths"]["index_html"] = "index.html"
    return result


_DEFINITIONS = {
    "hallucinated": "classes in the dream's top-k that are not in the original's top-k (original = painting "
                    "resized to the dream's size); per set counted once per painting",
    "family_share": "per image: top-k softmax mass in the family / top-k mass; per set: mean over its dreams",
    "energy_ratio": "tap loss (mean square activation) at the last step of the last octave / first step of the "
                    "first octave; includes the effect of octave rescaling (octave_energy_ratios do not)",
    "final_share": "w_tap * loss_tap / sum(w * loss) at the last step",
    "pixel_change": "mean |dream - original| over pixels and channels, 0-255",
    "perceptual_change": "1 - cosine similarity of the globally pooled deepest-tap (penultimate) features of "
                         "original and dream",
}


# Default classifiers made ahead of the analysis by prepare(), by (backbone, weights); guarded by
# _PREPARED_LOCK, filled by the thread in _PREPARING.
_PREPARED: dict[tuple[str, str], Classifier] = {}
_PREPARED_LOCK = threading.Lock()
_PREPARING: list[threading.Thread] = []


def prepare(models: Sequence[tuple[str, str]], paintings: Sequence[str | os.PathLike] = ()) -> threading.Thread:
    """Make, in a background thread, what the analysis of a sweep will need while the sweep runs:
    matplotlib imported, the default classifier of each ``(backbone, weights)`` built and its
    program compiled for the buckets of ``paintings`` (a dream keeps its painting's aspect). The
    analysis in this process takes them (:func:`_get_classifier` waits for the thread). A failure
    here is only a log line: the analysis then builds its own, as without this."""

    def work():
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot  # noqa: F401 - imported for the plots, ~1 s
        except ImportError:
            pass
        for backbone, weights in dict.fromkeys(models):
            try:
                clf = BackboneClassifier(backbone, weights)
                shapes = {}
                for path in paintings:
                    try:
                        with Image.open(path) as im:
                            w, h = im.size
                    except (OSError, ValueError):
                        continue  # a bad painting is the sweep's to report
                    shapes.setdefault(images.bucket_shape(h, w, clf.input_size), (h, w))
                if shapes:  # one dummy image per bucket: predict compiles each bucket's program
                    clf.predict([np.zeros((h, w, 3), np.uint8) for h, w in shapes.values()])
                with _PREPARED_LOCK:
                    _PREPARED[(backbone, weights)] = clf
            except Exception as e:  # noqa: BLE001 - the analysis will try again and say why
                log.debug("analysis: preparing the %s classifier failed: %s: %s", backbone, type(e).__name__, e)

    t = threading.Thread(target=work, name="dreamjax-analysis-prepare", daemon=True)
    _PREPARING.append(t)
    t.start()
    return t


def _prepared(backbone: str, weights: str) -> Classifier | None:
    for t in list(_PREPARING):
        t.join()
        _PREPARING.remove(t)
    with _PREPARED_LOCK:
        return _PREPARED.pop((backbone, weights), None)


def _get_classifier(classifier: ClassifierArg, backbone: str, weights: str) -> Classifier | None:
    if isinstance(classifier, Classifier):
        return classifier
    try:
        if classifier is not None:
            return classifier(backbone, weights)
        return _prepared(backbone, weights) or BackboneClassifier(backbone, weights)
    except Exception as e:  # noqa: BLE001 - no top / no weights: the rest of the analysis goes on
        log.warning("analysis: no classifier for %s (weights %s): %s: %s", backbone, weights, type(e).__name__, e)
        return None


def _mean(xs: Sequence[float]) -> float | None:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def _set_summaries(cells: Mapping[str, dict], items: Sequence[dict]) -> dict:
    by_set: dict[str, list[dict]] = defaultdict(list)
    for r in cells.values():
        by_set[str(r["layers"])].append(r)
    losses_by_id = {str(it["cell"]["id"]): it["losses"] for it in items}
    out = {}
    for name, rs in by_set.items():
        paintings = sorted({str(r["painting"]) for r in rs})
        classified = sorted({str(r["painting"]) for r in rs if "hallucinated" in r})
        counts: dict[str, dict] = {}
        for r in rs:
            for lab, p, i in r.get("hallucinated", []):
                e = counts.setdefault(lab, {"label": lab, "index": i, "paintings": set(), "cells": 0, "probs": []})
                e["paintings"].add(str(r["painting"]))
                e["cells"] += 1
                e["probs"].append(p)
        hall = sorted(({"label": e["label"], "index": e["index"], "paintings": len(e["paintings"]),
                        "of": len(classified), "cells": e["cells"], "mean_prob": float(np.mean(e["probs"])),
                        "family": family_of(e["index"]) if "dream_families" in rs[0] else None}
                       for e in counts.values()),
                      key=lambda e: (-e["paintings"], -e["cells"], -e["mean_prob"], e["label"]))
        taps = next((r["taps"] for r in rs if r.get("taps")), [])
        s: dict[str, Any] = {
            "cells": len(rs), "paintings": len(paintings), "classified_paintings": len(classified),
            "hallucinated": hall, "taps": taps,
            "pixel_change": _mean([r.get("pixel_change") for r in rs]),
            "perceptual_change": _mean([r.get("perceptual_change") for r in rs]),
            "energy_ratio": {t: _mean([r.get("energy_ratio", {}).get(t) for r in rs]) for t in taps},
            "final_share": {t: _mean([r.get("final_share", {}).get(t) for r in rs]) for t in taps},
        }
        if any("dream_families" in r for r in rs):
            s["dream_families"] = {f: _mean([r["dream_families"][f] for r in rs if "dream_families" in r])
                                   for f in FAMILIES}
            s["original_families"] = {f: _mean([r["original_families"][f] for r in rs if "original_families" in r])
                                      for f in FAMILIES}
        s["loss_curves"] = _mean_curves([losses_by_id[str(r["id"])] for r in rs if losses_by_id.get(str(r["id"]))])
        out[name] = s
    return dict(sorted(out.items()))


def _mean_curves(all_losses: Sequence[Mapping]) -> dict:
    """Mean per-tap loss per step over cells, octave by octave (shorter cells padded with NaN)."""
    curves = [loss_curves(lj) for lj in all_losses]
    curves = [c for c in curves if c["taps"]]
    if not curves:
        return {"taps": [], "octaves": []}
    taps = curves[0]["taps"]
    curves = [c for c in curves if c["taps"] == taps]
    n_oct = max(len(c["octaves"]) for c in curves)
    octs = []
    for k in range(n_oct):
        steps = max((len(c["octaves"][k][taps[0]]) for c in curves if k < len(c["octaves"])), default=0)
        o = {}
        for t in taps:
            m = np.full((len(curves), steps), np.nan)
            for i, c in enumerate(curves):
                if k < len(c["octaves"]):
                    v = c["octaves"][k][t]
                    m[i, :len(v)] = v
            with np.errstate(all="ignore"):
                o[t] = [None if np.isnan(x) else float(x) for x in np.nanmean(m, axis=0)] if steps else []
        octs.append(o)
    return {"taps": taps, "octaves": octs}


def _gallery_entry(r: Mapping) -> dict:
    g: dict[str, Any] = {}
    if "hallucinated" in r:
        g["hallucinated"] = [[lab, p] for lab, p, _ in r["hallucinated"][:3]]
    bits = []
    if r.get("pixel_change") is not None:
        bits.append(f"pixels {r['pixel_change']:.1f}/255")
    if r.get("perceptual_change") is not None:
        bits.append(f"features {r['perceptual_change']:.3g}")
    if bits:
        g["change"] = " · ".join(bits)
    return g


def _originals_entries(cells: Mapping[str, dict]) -> dict:
    out = {}
    for r in cells.values():
        if r.get("original_top") and str(r["painting"]) not in out:
            out[str(r["painting"])] = [[lab, p] for lab, p, _ in r["original_top"][:3]]
    return out


# ---------------------------------------------------------------------------------------------
# Gallery, markdown, plots


def write_gallery(sweep_dir: Path, manifest: Mapping, result: Mapping) -> Path:
    """Rewrite index.html with the analysis: new classes under each dream, originals' classes."""
    m = dict(manifest)
    m["paintings"] = {name: dict(p) | ({"top_classes": result["originals"][name]} if name in result["originals"]
                                       else {}) for name, p in (manifest.get("paintings") or {}).items()}
    m["analysis_md"] = ANALYSIS_MD
    titles = {"losses": "loss curves", "families": "class families", "change": "pixel/perceptual change"}
    m["analysis_links"] = [[p, titles.get(k, k)] for k, p in (result.get("paths", {}).get("plots") or {}).items()]
    return report.write_gallery(sweep_dir, m, analysis=result["gallery"], analysis_md_path=sweep_dir / ANALYSIS_MD)


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def _md_esc(s: Any) -> str:
    return str(s).replace("|", "\\|")


def headline_lines(result: Mapping, per_set: int = 5) -> list[str]:
    """"set → 'class' (k of N paintings), …" per weight set."""
    lines = []
    for name, s in result["sets"].items():
        hall = s["hallucinated"][:per_set]
        if not s["classified_paintings"]:
            lines.append(f"- **{name}** → (not classified)")
        elif not hall:
            lines.append(f"- **{name}** → no new classes in any dream's top-{result['top_k']}")
        else:
            lines.append(f"- **{name}** → " + ", ".join(f"'{_md_esc(h['label'])}' ({h['paintings']} of {h['of']} "
                                                         f"paintings)" for h in hall))
    return lines


def render_markdown(result: Mapping) -> str:
    k = result["top_k"]
    sets = result["sets"]
    out = [f"# Analysis · {Path(result['sweep_dir']).name}", ""]
    clfs = list(result["classifiers"].values())
    if clfs:
        kind = lambda c: ", ImageNet" if c["imagenet"] else ", not ImageNet: no families"  # noqa: E731
        other = lambda c: " (a different file from the sweep's, e.g. with top)" if c["weights_mismatch"] else ""  # noqa
        out.append("Classifier: " + "; ".join(
            f"{c['backbone']} top ({c['classes']} classes{kind(c)}, weights {c['weights_id'][:12]}{other(c)})"
            for c in clfs) + ".")
    else:
        out.append("No classifier was available: class and perceptual numbers are missing.")
    n_cells = len(result["cells"])
    out += [f"{n_cells} finished cells analysed, {len(result['skipped'])} skipped. "
            f"Numbers: `analysis.json`; definitions: `dreamjax/outputs/analysis.py`.", "",
            f"## What gets hallucinated (in the dream's top-{k}, not in the original's)", ""]
    out += headline_lines(result) + [""]
    plots = result.get("paths", {}).get("plots") or {}

    fam_sets = {n: s for n, s in sets.items() if s.get("dream_families")}
    if fam_sets:
        out += [f"### Class families (share of top-{k} probability mass, mean over dreams; originals in brackets)", "",
                "| set | " + " | ".join(FAMILIES) + " |", "|---" * (len(FAMILIES) + 1) + "|"]
        for n, s in fam_sets.items():
            shares = [f"{_fmt(s['dream_families'][f], '.0%')} ({_fmt(s['original_families'][f], '.0%')})"
                      for f in FAMILIES]
            out.append(f"| {n} | " + " | ".join(shares) + " |")
        out.append("")
    if "families" in plots:
        out += [f"![class families]({plots['families']})", ""]

    out += ["## What each layer contributes", "",
            "Energy ratio = tap loss at the last step of the last octave / first step of the first octave "
            "(includes octave rescaling); share = the tap's part of the weighted objective at the end.", "",
            "| set | tap | energy ratio | share of final objective |", "|---|---|---|---|"]
    for n, s in sets.items():
        for t in s["taps"]:
            out.append(f"| {n} | {t} | {_fmt(s['energy_ratio'].get(t))} | {_fmt(s['final_share'].get(t), '.0%')} |")
    out.append("")
    if "losses" in plots:
        out += [f"![loss curves]({plots['losses']})", ""]

    out += ["## How far the images moved", "",
            "| set | cells | pixel change (0–255) | perceptual change (1 − cos) |", "|---|---|---|---|"]
    for n, s in sets.items():
        out.append(f"| {n} | {s['cells']} | {_fmt(s['pixel_change'], '.1f')} | {_fmt(s['perceptual_change'], '.3f')} |")
    out.append("")
    if "change" in plots:
        out += [f"![change]({plots['change']})", ""]

    out += ["## Per cell", "", "| cell | set | pixel | perceptual | new classes |", "|---|---|---|---|---|"]
    for cid, r in result["cells"].items():
        new = ", ".join(f"{_md_esc(lab)} {p:.0%}" for lab, p, _ in r.get("hallucinated", [])) or "–"
        out.append(f"| {_md_esc(cid)} | {r['layers']} | {_fmt(r.get('pixel_change'), '.1f')} | "
                   f"{_fmt(r.get('perceptual_change'), '.3f')} | {new} |")
    if result["skipped"]:
        out += ["", "Skipped: " + "; ".join(f"{_md_esc(c)} ({why})" for c, why in result["skipped"].items())]
    return "\n".join(out) + "\n"


def _write_plots(sweep_dir: Path, sets: Mapping, result: Mapping) -> dict[str, str]:
    try:
        import matplotlib
    except ImportError:
        log.info("analysis: matplotlib not installed (pip install 'dreamjax[report]'): no plots")
        return {}
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}

    def save(fig, key: str, fname: str):
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        files.atomic_write_bytes(sweep_dir / PLOTS_DIR / fname, buf.getvalue())
        written[key] = f"{PLOTS_DIR}/{fname}"

    names = list(sets)
    if not names:
        return written
    # Loss curves: one panel per set, one line per tap, octave boundaries dotted.
    with_curves = [n for n in names if sets[n]["loss_curves"]["octaves"]]
    if with_curves:
        ncol = min(2, len(with_curves))
        nrow = math.ceil(len(with_curves) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 3.4 * nrow), dpi=90, squeeze=False)
        for ax, n in zip(axes.flat, with_curves):
            lc = sets[n]["loss_curves"]
            x0 = 0
            for k, o in enumerate(lc["octaves"]):
                steps = len(o[lc["taps"][0]]) if lc["taps"] else 0
                for j, t in enumerate(lc["taps"]):
                    ys = np.array([np.nan if v is None else v for v in o[t]], float)
                    ax.plot(np.arange(x0, x0 + steps), ys, color=f"C{j}", label=t if k == 0 else None, lw=1.3)
                x0 += steps
                if k < len(lc["octaves"]) - 1:
                    ax.axvline(x0 - 0.5, color="0.6", ls=":", lw=1)
            ax.set_yscale("log")
            ax.set_title(f"{n} (mean of {sets[n]['cells']} cells)", fontsize=10)
            ax.set_xlabel("step (octaves dotted)")
            ax.set_ylabel("tap loss (mean square act.)")
            ax.spines[["top", "right"]].set_visible(False)
            ax.legend(fontsize=7, frameon=False)
        for ax in list(axes.flat)[len(with_curves):]:
            ax.axis("off")
        save(fig, "losses", "loss_curves.png")
    # Family shares: dreams (solid) vs originals (hatched), per set.
    fam = [n for n in names if sets[n].get("dream_families")]
    if fam:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(fam) + 3), 3.6), dpi=90)
        xs = np.arange(len(fam))
        for which, off, style in (("original_families", -0.2, {"hatch": "//", "alpha": 0.45}),
                                  ("dream_families", 0.2, {})):
            bottom = np.zeros(len(fam))
            for j, f in enumerate(FAMILIES):
                v = np.array([sets[n][which][f] or 0.0 for n in fam])
                ax.bar(xs + off, v, 0.38, bottom=bottom, color=f"C{j}", label=f if which == "dream_families" else None,
                       edgecolor="white", **style)
                bottom += v
        ax.set_xticks(xs, [f"{n}\n(orig | dream)" for n in fam], fontsize=8)
        ax.set_ylabel(f"share of top-{result['top_k']} mass")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left")
        ax.spines[["top", "right"]].set_visible(False)
        save(fig, "families", "families.png")
    # Pixel / perceptual change per set: mean bar + each cell's value.
    cells = list(result["cells"].values())
    if any(r.get("pixel_change") is not None for r in cells):
        fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.3 * len(names) * 2 + 2), 3.2), dpi=90)
        for ax, key, title in ((axes[0], "pixel_change", "pixel change (mean |Δ|, 0–255)"),
                               (axes[1], "perceptual_change", "perceptual change (1 − cos)")):
            for i, n in enumerate(names):
                vals = [r[key] for r in cells if r["layers"] == n and r.get(key) is not None]
                if vals:
                    ax.bar(i, np.mean(vals), 0.6, color="C0", alpha=0.5)
                    ax.scatter(np.full(len(vals), i), vals, s=10, color="C0", zorder=3)
            ax.set_xticks(range(len(names)), names, fontsize=8, rotation=20)
            ax.set_title(title, fontsize=10)
            ax.spines[["top", "right"]].set_visible(False)
        save(fig, "change", "change.png")
    return written


# ---------------------------------------------------------------------------------------------
# Entry points


def analyze_after_collect(sweep_dir: str | os.PathLike, manifest: Mapping | None = None) -> dict | None:
    """Called by ``sweep.collect``: analyse unless the sweep's config says ``analyze: false``;
    never raises (a failure is a logged warning)."""
    try:
        sweep_dir = Path(sweep_dir)
        manifest = _load_manifest(sweep_dir, manifest)
        if not _config_wants_analysis(manifest):
            log.info("analysis skipped (analyze=false); run `dreamjax-analyze %s` to make it", sweep_dir)
            return None
        result = analyze(sweep_dir, manifest)
        log.info("analysis: %s", sweep_dir / ANALYSIS_MD)
        return result
    except Exception as e:  # noqa: BLE001 - the sweep's own outputs are already written
        log.warning("analysis failed (the sweep's results are fine; retry with `dreamjax-analyze %s`): %s: %s",
                    sweep_dir, type(e).__name__, e)
        return None


def _config_wants_analysis(manifest: Mapping) -> bool:
    """The sweep's ``analyze`` setting, as its cells recorded it (collect puts it in the manifest)."""
    if "analyze" in manifest:
        return bool(manifest["analyze"])
    wants = [(c.get("config") or {}).get("analyze") for c in manifest.get("cells") or []]
    return all(w for w in wants if w is not None)


def main(argv: Sequence[str] | None = None, collect: Callable[[Path], Any] | None = None) -> int:
    """``dreamjax-analyze SWEEP_DIR``: classify originals and dreams, layer energies, change.

    ``collect(sweep_dir)`` (given by the entry point, which may import the sweep layer) writes the
    manifest first when the sweep has none yet."""
    p = argparse.ArgumentParser(prog="dreamjax-analyze", description="Analyse a finished sweep: hallucinated "
                                "classes per weight set, per-layer energy, pixel/perceptual change; writes "
                                "analysis.md, analysis.json, analysis/*.png and rewrites index.html.")
    p.add_argument("sweep_dir")
    p.add_argument("--top-k", type=int, default=TOP_K, help="classes compared per image (default 5)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sweep_dir = Path(a.sweep_dir)
    try:
        if not (sweep_dir / "manifest.json").is_file() and collect is not None:
            collect(sweep_dir)  # the manifest first; the analysis runs once, below
        result = analyze(sweep_dir, top_k=a.top_k, plots=not a.no_plots)
    except FileNotFoundError as e:
        print(f"dreamjax-analyze: {e}", file=sys.stderr)
        return 2
    print("\n".join(headline_lines(result)))
    print(f"-> {sweep_dir / ANALYSIS_MD}, {sweep_dir / ANALYSIS_JSON}, {sweep_dir / 'index.html'}")
    return 0
