"""Class-directed augmentation: dream every image of a folder toward a target class, write an
ImageFolder-style dataset (``<out>/<class name>/<image>.png``) and a manifest with, per image, the
source, the target, the settings and the classifier's probability of the target before and after;
plus the success rate (target = top-1 after the dream).

Run by ``jobs.task`` after a run whose config has an ``augment`` node (conf/experiment/augment.yaml).
The classifier is the dream's own backbone with its top, at its classification size. Because a
target that only the dreaming network sees can be an invisible adversarial change, ``augment.second``
names a second, independently trained backbone (``efficientnet_lite2``: real ImageNet weights, its
own input size ``augment.second_size``) that classifies the originals and the dreams too: the
manifest gets its rank of the target before and after and how often the target is in its top-5.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np

from dreamjax import files
from dreamjax.config import ConfigError
from dreamjax.models.registry import get_spec
from dreamjax.outputs import analysis, images
from dreamjax.sweep import units

log = logging.getLogger("dreamjax")


KEYS = ("target", "out", "second", "second_size")
SECOND_SIZE = {"efficientnet_lite2": 260}  # a second classifier's own input size (long side)


def check(node: Mapping | None) -> None:
    """The ``augment`` node, checked while planning (before any compute): its keys, the target class,
    the second classifier's name (a registered backbone with a classifier top)."""
    if not node:
        return
    unknown = sorted(set(node) - set(KEYS))
    if unknown:
        raise ConfigError(f"augment: unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
    try:
        units.class_index(node.get("target"))
    except units.UnitError as e:
        raise ConfigError(f"augment.target: {e}") from None
    if node.get("second"):
        try:
            spec = get_spec(str(node["second"]))
        except ValueError as e:
            raise ConfigError(f"augment.second: {e}") from None
        if not spec.num_classes:
            raise ConfigError(f"augment.second={node['second']!r} has no classifier top to rank the target with")


def _rank(p: np.ndarray, target: int) -> int:
    """1-based rank of the target among a probability row (1 = top-1)."""
    return int(np.sum(p > p[target])) + 1


def write_dataset(run_dir: str | Path, augment: Mapping, classifier: analysis.Classifier | None = None,
                  second: analysis.Classifier | None = None) -> dict:
    run_dir = Path(run_dir)
    target = units.class_index(augment["target"])
    name = units.class_names()[target]
    out = run_dir / str(augment.get("out") or "dataset")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    done = [c for c in manifest["cells"] if c["status"] == "done"]
    if not done:
        raise RuntimeError(f"augment: no finished cells under {run_dir}")
    if classifier is None:
        backbone = done[0]["backbone"]
        classifier = analysis.BackboneClassifier(backbone)
    originals = [images.load_painting(manifest["paintings"][c["painting"]]["path"]).pixels for c in done]
    dreams = [np.asarray(images.load_painting(run_dir / c["outputs"]["dream"]).pixels) for c in done]
    p0, _ = classifier.predict(originals)
    p1, _ = classifier.predict(dreams)
    if second is None and augment.get("second"):
        name2 = str(augment["second"])
        second = analysis.BackboneClassifier(name2, input_size=augment.get("second_size") or SECOND_SIZE.get(name2))
    q0 = q1 = None
    if second is not None:
        q0, _ = second.predict(originals)
        q1, _ = second.predict(dreams)
    (out / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (c, a, b) in enumerate(zip(done, p0, p1)):
        stem = "_".join(p for p in (c["painting"], c.get("unit") or "") if p)
        dst = out / name / f"{stem}.png"
        shutil.copyfile(run_dir / c["outputs"]["dream"], dst)
        rows.append({"source": manifest["paintings"][c["painting"]]["path"], "image": str(dst.relative_to(out)),
                     "target": name, "target_index": target, "settings": {"hyper": c.get("hyper"),
                                                                          "layers": c.get("layers")},
                     "p_target_before": float(a[target]), "p_target_after": float(b[target]),
                     "top1_before": classifier.labels[int(np.argmax(a))],
                     "top1_after": classifier.labels[int(np.argmax(b))],
                     "target_top1_after": bool(int(np.argmax(b)) == target),
                     "target_top5_after": bool(target in np.argsort(-b)[:5])})
        if q1 is not None:
            rows[-1].update({"second_p_target_before": float(q0[i][target]),
                             "second_p_target_after": float(q1[i][target]),
                             "second_rank_before": _rank(q0[i], target), "second_rank_after": _rank(q1[i], target),
                             "second_top1_after": second.labels[int(np.argmax(q1[i]))],
                             "second_target_top5_after": _rank(q1[i], target) <= 5})
    result = {"target": name, "target_index": target, "classifier": classifier.name, "images": len(rows),
              "success_rate_top1": float(np.mean([r["target_top1_after"] for r in rows])),
              "success_rate_top5": float(np.mean([r["target_top5_after"] for r in rows])),
              "mean_p_target_before": float(np.mean([r["p_target_before"] for r in rows])),
              "mean_p_target_after": float(np.mean([r["p_target_after"] for r in rows]))}
    if second is not None:
        result.update({"second_classifier": second.name,
                       "second_success_rate_top5": float(np.mean([r["second_target_top5_after"] for r in rows])),
                       "second_success_rate_top1": float(np.mean([r["second_rank_after"] == 1 for r in rows])),
                       "second_mean_p_target_before": float(np.mean([r["second_p_target_before"] for r in rows])),
                       "second_mean_p_target_after": float(np.mean([r["second_p_target_after"] for r in rows]))})
    result["items"] = rows
    files.write_json(out / "manifest.json", result)
    log.info("augment: %d images toward %r, top-1 success %.0f%% (top-5 %.0f%%): %s", len(rows), name,
             100 * result["success_rate_top1"], 100 * result["success_rate_top5"], out)
    if second is not None:
        log.info("augment: a second network (%s) puts %r in its top-5 for %.0f%% of the dreams (top-1 %.0f%%)",
                 second.name, name, 100 * result["second_success_rate_top5"], 100 * result["second_success_rate_top1"])
    return result
