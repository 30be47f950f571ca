"""Class-directed augmentation: dream every image of a folder toward a target class, write an
ImageFolder-style dataset (``<out>/<class name>/<image>.png``) and a manifest with, per image, the
source, the target, the settings and the classifier's probability of the target before and after;
plus the success rate (target = top-1 after the dream).

Run by ``jobs.task`` after a run whose config has an ``augment`` node (conf/experiment/augment.yaml).
The classifier is the dream's own backbone with its top, at its classification size.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np

from dreamjax import files
from dreamjax.outputs import analysis, images
from dreamjax.sweep import units

log = logging.getLogger("dreamjax")


def write_dataset(run_dir: str | Path, augment: Mapping, classifier: analysis.Classifier | None = None) -> dict:
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
    (out / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for c, a, b in zip(done, p0, p1):
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
    result = {"target": name, "target_index": target, "classifier": classifier.name, "images": len(rows),
              "success_rate_top1": float(np.mean([r["target_top1_after"] for r in rows])),
              "success_rate_top5": float(np.mean([r["target_top5_after"] for r in rows])),
              "mean_p_target_before": float(np.mean([r["p_target_before"] for r in rows])),
              "mean_p_target_after": float(np.mean([r["p_target_after"] for r in rows])), "items": rows}
    files.write_json(out / "manifest.json", result)
    log.info("augment: %d images toward %r, top-1 success %.0f%% (top-5 %.0f%%): %s", len(rows), name,
             100 * result["success_rate_top1"], 100 * result["success_rate_top5"], out)
    return result
