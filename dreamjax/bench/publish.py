"""The committed reference studies: run them with the real CLI and publish compact copies.

``scripts/make_results.py`` is the entry point. Each study's full sweep is written under a work
folder (not committed); ``publish`` copies what people look at into ``results/<study>/``: the
per-painting comparison grids (JPEG), the all-cells sheet, a handful of iteration GIFs, the
quickstart's dreams (PNG, to check reproduction), the analysis (md, json, plots), the summary,
and ``run.json`` (command, machine, time taken, versions).
"""
from __future__ import annotations

import datetime as _dt
import html
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import jax
from PIL import Image

from dreamjax import __version__, files

STUDIES = {
    "quickstart": {"args": ["+experiment=quickstart"], "multirun": False,
                   "title": "Quickstart: EfficientNet-Lite0 (offline), 3 bundled paintings, 192 px"},
    "seed_study_offline": {"args": ["-m", "+experiment=seed_study_offline"], "multirun": True,
                           "title": "Seed study on the offline backbone: 12 paintings x 4 weight sets"},
    "seed_study_offline_lite2": {"args": ["-m", "+experiment=seed_study_offline", "model=efficientnet_lite2"],
                                 "multirun": True,
                                 "title": "Seed study on the second offline backbone, EfficientNet-Lite2: "
                                          "12 paintings x 4 weight sets"},
    "seed_study": {"args": ["-m", "+experiment=seed_study"], "multirun": True,
                   "title": "Seed study: InceptionV3, 12 paintings x the article's 4 weight sets (DLwP loop)"},
}
GIFS_PER_STUDY = 4


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where a committed result was made: what decides whether another run can be byte-identical."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cpus": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
            "python": platform.python_version(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


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

    info = {"study": name, "title": study["title"], "command": "dreamjax " + " ".join(study["args"]),
            "seconds": round(seconds, 1), "date": _dt.date.today().isoformat(), "dreamjax_version": __version__,
            "machine": machine()}
    publish(work, Path(out) / name, info)
    return info


def _jpeg(src: Path, dst: Path, max_side: int = 1600, quality: int = 85):
    im = Image.open(src).convert("RGB")
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)

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
    write_index(dest, info)


def write_index(dest: Path, info: dict) -> Path:
    """``index.html`` of a published study: its grids, GIFs and analysis plots, all from the
    committed folder, so the gallery opens from a clone (the full sweep's own gallery links
    every cell's files, which are not committed)."""
    def rel(p: Path) -> str:
        return urllib.parse.quote(p.relative_to(dest).as_posix())

    esc = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{esc(info['title'])}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1700px}img{max-width:100%}"
             "figure{margin:1em 0}figcaption{color:#555}</style>",
             f"<h1>{esc(info['title'])}</h1>",
             f"<p><code>{esc(info['command'])}</code> — {info['counts']['done']} cells done, "
             f"{info['counts']['failed']} failed; backbone {esc(str(info['backbone']))}; {esc(info['date'])}</p>"]
    if (dest / "analysis.md").exists():
        parts.append(f"<p><a href='{rel(dest / 'analysis.md')}'>Analysis</a> · "
                     f"<a href='{rel(dest / 'summary.csv')}'>summary.csv</a></p>")
    for title, paths in (("Grids", sorted((dest / "grids").glob("*.jpg"))),
                         ("Iteration GIFs", sorted((dest / "gifs").glob("*.gif"))),
                         ("Analysis plots", sorted((dest / "analysis").glob("*.png")))):
        if paths:
            parts.append(f"<h2>{title}</h2>")
            parts += [f"<figure><img src='{rel(p)}' alt='{esc(p.stem)}' loading='lazy'>"
                      f"<figcaption>{esc(p.stem)}</figcaption></figure>" for p in paths]
    return files.atomic_write_text(dest / "index.html", "\n".join(parts) + "\n")


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
        if gifs:
            lines += ["Iteration GIFs: " + ", ".join(f"[{g.stem}]({name}/gifs/{g.name})" for g in gifs), ""]
        if (out / name / "analysis.md").exists():
            lines += [f"Analysis: [{name}/analysis.md]({name}/analysis.md)", ""]
    files.atomic_write_text(out / "README.md", "\n".join(lines) + "\n")
