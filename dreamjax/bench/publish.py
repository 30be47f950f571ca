"""The committed reference studies: run them with the real CLI and publish compact copies.

``scripts/make_results.py`` is the entry point. Each study's full sweep is written under a work
folder (not committed); ``publish`` copies what people look at into ``results/<study>/``: the
per-painting comparison grids (JPEG), the all-cells sheet, a handful of iteration GIFs, the
quickstart's dreams (PNG, to check reproduction), the analysis (md, json, plots), the summary,
and ``run.json`` (command, machine, time taken, versions).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from dreamjax import files

STUDIES = {
    "quickstart": {"args": ["+experiment=quickstart"], "multirun": False,
                   "title": "Quickstart: EfficientNet-Lite0 (offline), 3 bundled paintings, 192 px"},
    "seed_study_offline": {"args": ["-m", "+experiment=seed_study_offline"], "multirun": True,
                           "title": "Seed study on the offline backbone: 12 paintings x 4 weight sets"},
    "seed_study": {"args": ["-m", "+experiment=seed_study"], "multirun": True,
                   "title": "Seed study: InceptionV3, 12 paintings x the article's 4 weight sets (DLwP loop)"},
    "zoom": {"args": ["+experiment=zoom"], "multirun": False,
             "title": "Zoom feedback loop: The Great Wave under the four offline weight sets, 4 chains in one batch"},
}
GIFS_PER_STUDY = 4


def _machine() -> dict:
    import jax

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
            "jax": jax.__version__}


def run_and_publish(name: str, *, work: str | Path, out: str | Path, inception_weights: str | None = None) -> dict:
    study = STUDIES[name]
    work = Path(work).resolve() / name
    key = "hydra.sweep.dir" if study["multirun"] else "hydra.run.dir"
    args = list(study["args"]) + [f"{key}={work}"]
    if name == "seed_study" and inception_weights:
        args.append(f"model.weights={inception_weights}")
    cmd = [sys.executable, "-m", "dreamjax.cli", *args]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t
    from dreamjax import __version__

    info = {"study": name, "title": study["title"], "command": "dreamjax " + " ".join(study["args"]),
            "seconds": round(seconds, 1), "date": _dt.date.today().isoformat(), "dreamjax_version": __version__,
            "machine": _machine()}
    publish(work, Path(out) / name, info)
    return info


def _jpeg(src: Path, dst: Path, max_side: int = 1600, quality: int = 85):
    im = Image.open(src).convert("RGB")
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=True)
    files.atomic_write_bytes(dst, buf.getvalue())


def publish(sweep: Path, dest: Path, info: dict):
    """Copy the compact, committed view of a finished sweep into ``dest``."""
    manifest = json.loads((sweep / "manifest.json").read_text())
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for g in sorted((sweep / "grids").glob("*.jpg")):
        _jpeg(g, dest / "grids" / g.name, max_side=2400 if g.stem == "all_cells" else 1600)
    done = [c for c in manifest["cells"] if c["status"] == "done"]
    # A handful of iteration GIFs: the first painting under every weight set.
    first = done[0]["painting"] if done else None
    picked = [c for c in done if c["painting"] == first][:GIFS_PER_STUDY]
    for c in picked:
        if "gif" in c["outputs"]:
            dst = dest / "gifs" / f"{c['painting']}__{c['layers']}.gif"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sweep / c["outputs"]["gif"], dst)
    for c in picked:  # motion cells: their MP4 (H.264) too
        if "video" in c["outputs"]:
            dst = dest / "videos" / f"{c['painting']}__{c['layers']}.mp4"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sweep / c["outputs"]["video"], dst)
    if info["study"] == "quickstart":  # the dreams themselves, to check that a fresh clone reproduces them
        for c in done:
            dst = dest / "dreams" / f"{c['painting']}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sweep / c["outputs"]["dream"], dst)
    for f in ("analysis.md", "analysis.json", "summary.csv", "run_stats.json"):
        if (sweep / f).exists():
            shutil.copyfile(sweep / f, dest / f)
    if (sweep / "analysis").is_dir():
        shutil.copytree(sweep / "analysis", dest / "analysis")
    info = dict(info, counts=manifest["counts"], backbone=manifest["backbone"], weights_id=manifest["weights_id"])
    files.write_json(dest / "run.json", info)


def write_readme(out: str | Path):
    out = Path(out)
    lines = ["# Results", "",
             "Committed outputs of dreamjax's reference studies, regenerated by `python scripts/make_results.py`",
             "(full sweeps are written to `results_work/`, not committed; this folder keeps compact copies).", ""]
    for name, study in STUDIES.items():
        run = out / name / "run.json"
        lines += [f"## {study['title']}", ""]
        if not run.exists():
            if name == "seed_study":
                lines += ["Not run here: InceptionV3's ImageNet weights cannot be downloaded on this project's "
                          "machines (no network). Where they are available:", "", "```bash",
                          "dreamjax-weights fetch --top        # or copy the Keras .h5 files into ~/.cache/dreamjax",
                          "dreamjax -m +experiment=seed_study  # or: python scripts/make_results.py --inception PATH",
                          "```", ""]
            continue
        info = json.loads(run.read_text())
        m = info["machine"]
        lines += [f"- command: `{info['command']}`",
                  f"- time: {info['seconds'] / 60:.1f} min on {m['cpus']} CPU cores ({m['processor']}, "
                  f"{m['platform']}), jax {m['jax']}, dreamjax {info['dreamjax_version']}, {info['date']}",
                  f"- cells: {info['counts']['done']} done, {info['counts']['failed']} failed; backbone "
                  f"{info['backbone']} (weights sha256 {str(info['weights_id'])[:12]}…)", ""]
        for g in sorted((out / name / "grids").glob("*.jpg")):
            if g.stem != "all_cells":
                lines.append(f"![{g.stem}]({name}/grids/{g.name})")
        lines.append("")
        gifs = sorted((out / name / "gifs").glob("*.gif"))
        videos = sorted((out / name / "videos").glob("*.mp4"))
        if gifs:
            what = "GIFs" if videos else "Iteration GIFs"
            lines += [f"{what}: " + ", ".join(f"[{g.stem}]({name}/gifs/{g.name})" for g in gifs), ""]
        if videos:
            lines += ["MP4 (H.264): " + ", ".join(f"[{v.stem}]({name}/videos/{v.name})" for v in videos), ""]
        if (out / name / "analysis.md").exists():
            lines += [f"Analysis: [{name}/analysis.md]({name}/analysis.md)", ""]
    files.atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
