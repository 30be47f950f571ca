"""Hydra glue: a job's config -> cells (plan), run them (execute), and gather a sweep (collect).

* ``task(cfg)`` is what ``dreamjax`` (the ``@hydra.main`` entry point) runs for one job: with
  the stock ``basic`` launcher that is one job per call; a single run (no ``-m``) also ends
  by collecting its own report.
* The batched launcher (``hydra/launcher=dreamjax``, the default) calls ``plan`` for every
  job, then executes all cells together (``dreamjax.sweep.launcher``).
* ``collect(sweep_dir)`` builds ``manifest.json``, ``summary.csv``, the grids and
  ``index.html`` from the per-cell records, whichever launcher wrote them (also
  ``dreamjax-collect SWEEP_DIR``).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

import dreamjax
from dreamjax import __version__, files
from dreamjax.engine import dream
from dreamjax.models.registry import get_spec
from dreamjax.outputs import analysis, images, report
from dreamjax.sweep import augment, grid, objective
from dreamjax.sweep.executor import (
    CELL_RECORD,
    Executor,
    Interrupted,
    RunOptions,
    resolve_paintings,
    setup_jax_cache,
)

log = logging.getLogger("dreamjax")
SWEEP_LOCK = "dreamjax_sweep.json"


def _plain(cfg) -> dict:
    """The user's config as plain data, without Hydra's own node (a master multirun config
    cannot resolve ``hydra.sweep.subdir`` outside a job)."""
    if isinstance(cfg, dict):
        return cfg
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "hydra"}


def plan(cfg, *, job: int, job_dir: str | Path, overrides: Sequence[str] = ()) -> list[grid.Cell]:
    """Cells of one job, validated before any compute (unknown taps, shapes, presets...)."""
    c = _plain(cfg)
    paintings = resolve_paintings(c["data"]["paths"])
    cells = grid.cells_from_config(c, paintings, job=job, job_dir=job_dir, overrides=overrides,
                                   layer_sets=load_layer_sets(c.get("layer_sets")))
    spec = get_spec(cells[0].backbone) if cells else None
    if spec is not None and any(cell.objective for cell in cells):  # before the taps: names the term
        include_top = c.get("model", {}).get("include_top")
        objective.check(cells, spec, include_top=None if include_top is None else bool(include_top))
    for cell in {c.layers: c for c in cells}.values() if spec is not None else ():
        unknown = [t for t in cell.taps if t not in spec.taps]
        if unknown:
            raise grid.ConfigError(f"layers.taps: unknown tap(s) {unknown} for backbone {spec.name!r}; "
                                   f"allowed: {', '.join(spec.taps)}")
        _check_plan(cell, spec)
    return cells


def load_layer_sets(names) -> list[dict] | None:
    """``layer_sets=[set1,set2,...]``: several layer-weight sets dreamed in one run (one batch)."""
    if not names:
        return None

    folder = Path(dreamjax.config_dir()) / "layers"
    out = []
    for n in names:
        if isinstance(n, dict):
            out.append(n)
            continue
        f = folder / f"{n}.yaml"
        if not f.is_file():
            allowed = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
            raise grid.ConfigError(f"layer_sets: unknown layer set {n!r}; allowed: {allowed}")
        out.append(OmegaConf.to_container(OmegaConf.load(f), resolve=True))
    return out


def _check_plan(cell: grid.Cell, spec):
    """The octave plan must fit the backbone, checked before any compute on the square bucket;
    a painting whose elongated bucket is too small fails alone at run time (the rest go on)."""
    s = cell.static_dict()
    try:
        dream.OctavePlan.from_settings(s).check(
            cell.image_size, cell.image_size, backbone=spec.name, min_size=spec.min_size,
            deepest_stride=max(spec.tap_strides[t] for t in cell.taps), border=int(s["border"]),
            objective=s["objective"])
    except dream.DreamSettingsError as e:
        raise grid.ConfigError(str(e)) from None


def options(cfg) -> RunOptions:
    return RunOptions.from_config(_plain(cfg))


class StopFlag:
    """SIGTERM/SIGINT: finish the current chunk, checkpoint, exit cleanly. A second Ctrl-C exits
    at once (every file is written atomically, so nothing is left half-written)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            os._exit(130)
        self.requested = True
        log.warning("%s received: checkpointing the in-flight batch, then exiting (Ctrl-C again to exit now)",
                    signal.Signals(signum).name)

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        if self.requested:
            return  # exiting after a stop: a second Ctrl-C during shutdown still exits at once
        for s, h in self._old.items():
            signal.signal(s, h)


def execute(cells: list[grid.Cell], cfg, *, checkpoint_root: str | Path, resume_cmd: str,
            stats_path: str | Path | None = None) -> list[dict]:
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" on every start
    setup_jax_cache(_plain(cfg).get("jax_cache_dir"))
    with StopFlag() as stop:
        ex = Executor(options(cfg), stop_requested=stop)
        try:
            records = ex.run(cells, checkpoint_root=checkpoint_root)
        except Interrupted as e:
            log.warning("%s. Resume with the same command: %s", e, resume_cmd)
            raise SystemExit(143) from None
    ex.compiles.close()
    _final_table(ex, records, Path(stats_path).parent if stats_path else Path(checkpoint_root).parent)
    stats = dict(ex.stats, compilations=ex.compiles.count, compile_seconds=round(ex.compiles.seconds, 3))
    files.write_json(stats_path or Path(checkpoint_root).parent / "run_stats.json", stats)
    return records


def _final_table(ex: Executor, records: list[dict], out_dir: Path | None = None):
    """What ran, what failed and where the outputs are: one row per (backbone, layer set, bucket)."""
    done = sum(r.get("status") == "done" for r in records)
    failed = [r for r in records if r.get("status") == "failed"]
    st = ex.stats
    rows: dict[tuple, list[int]] = {}
    for r in records:
        key = (r.get("backbone", "?"), r.get("layers", "?"), "x".join(map(str, r.get("bucket") or [])) or "-")
        row = rows.setdefault(key, [0, 0, 0])
        row[0 if r.get("status") == "done" else 1] += 1
        row[2] += bool(r.get("skipped"))
    lines = [f"{'backbone':<20} {'layers':<16} {'bucket':<9} {'done':>5} {'failed':>6} {'skipped':>7}"]
    lines += [f"{b:<20} {l:<16} {k:<9} {d:>5} {f:>6} {sk:>7}" for (b, l, k), (d, f, sk) in sorted(rows.items())]
    lines.append(f"{done} done ({st['cells_skipped']} already complete), {len(failed)} failed | {st['groups']} groups, "
                 f"{st['batches']} batches, {st['programs']} dream programs, {ex.compiles.count} compilations "
                 f"({ex.compiles.seconds:.1f} s) | {st['seconds']:.1f} s")
    if out_dir is not None:
        lines.append(f"outputs: {out_dir} (index.html, summary.csv, manifest.json)")
    log.info("cells:\n%s", "\n".join(lines))
    for r in failed:
        log.warning("FAILED %s: %s", r["id"], r.get("error"))


def _command() -> str:
    return " ".join(shlex.quote(a) for a in ["dreamjax"] + sys.argv[1:])


def claim_dir(directory: Path, overrides: Sequence[str], cfg) -> None:
    """Refuse to mix two different sweeps in one folder; the same command resumes."""
    mode = str(_plain(cfg).get("resume", "auto"))
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / SWEEP_LOCK
    mine = {"overrides": sorted(overrides), "name": _plain(cfg).get("name")}
    if lock.exists():
        theirs = json.loads(lock.read_text())
        if {k: theirs.get(k) for k in mine} != mine:
            raise grid.ConfigError(
                f"{directory} already holds the results of another sweep (overrides {theirs.get('overrides')}); "
                f"it is never overwritten: choose another name=... (or hydra.sweep.dir / hydra.run.dir)")
        if mode in ("false", "False", "no"):
            raise grid.ConfigError(f"{directory} already holds results and resume=false; choose another name=...")
        log.info("resuming in %s (complete cells are skipped)", directory)
        return
    files.write_json(lock, mine | {"created": _dt.datetime.now().isoformat(timespec="seconds"),
                                    "command": _command()})


def task(cfg) -> Any:
    """The ``@hydra.main`` task: dream this job's cells (basic launcher / single run)."""
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    job = int(hc.job.num) if multirun and hc.job.get("num") is not None else 0
    if not multirun:
        claim_dir(job_dir, list(hc.overrides.task), cfg)
    cells = plan(cfg, job=job, job_dir=job_dir, overrides=list(hc.overrides.task))
    root = (Path(hc.sweep.dir) if multirun else job_dir) / ".checkpoints"
    records = execute(cells, cfg, checkpoint_root=root, resume_cmd=_command(),
                      stats_path=job_dir / "run_stats.json")
    if not multirun:
        collect(job_dir)
        if _plain(cfg).get("augment"):  # experiment=augment: the dataset and its success rate
            augment.write_dataset(job_dir, _plain(cfg)["augment"])
    return {r["id"]: r["status"] for r in records}


# ----------------------------------------------------------------------------------------------
# Collect: manifest, summary, grids, gallery
# ----------------------------------------------------------------------------------------------
def find_records(sweep_dir: Path) -> list[dict]:
    recs = []
    for p in sorted(sweep_dir.rglob(CELL_RECORD)):
        if ".checkpoints" in p.parts:
            continue
        try:
            recs.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            log.warning("unreadable cell record %s: %s", p, e)
    recs.sort(key=lambda r: (int(r.get("job", 0)), r.get("painting", ""), r.get("layers", "")))
    return recs


def build_manifest(sweep_dir: Path, records: list[dict]) -> dict:
    sweep_dir = Path(sweep_dir).resolve()
    cells, paintings = [], {}
    for r in records:
        job_rel = os.path.relpath(r["job_dir"], sweep_dir)
        rel = lambda p, job_rel=job_rel: os.path.normpath(os.path.join(job_rel, p))  # noqa: E731
        outs = {k: ([rel(x) for x in v] if isinstance(v, list) else rel(v)) for k, v in r.get("outputs", {}).items()}
        name = r["painting"]
        if name not in paintings or r.get("status") == "done":
            err = r.get("error") if r.get("error", "") and str(r.get("error")).startswith("ImageError") else None
            paintings[name] = {"path": r["painting_path"], "sha256": r.get("painting_sha256"),
                               "size": r.get("painting_size"), "notes": r.get("painting_notes", []),
                               "status": "failed" if err else "ok", "error": err}
        cells.append({
            "id": r["id"], "job_dir": job_rel, "painting": name, "layers": r["layers"], "unit": r.get("unit", ""),
            "label": _label(r), "overrides": r.get("overrides", []), "hyper": r.get("hyper", {}),
            "status": r["status"], "error": r.get("error"), "outputs": outs,
            "final_losses": r.get("final_losses", {}), "final_loss": r.get("final_loss"),
            "seconds": r.get("seconds", {}), "fingerprint": r.get("fingerprint"), "backbone": r.get("backbone"),
            "weights_id": r.get("weights_id"), "taps": r.get("taps"), "layer_weights": r.get("layer_weights"),
            "hashes": {rel(k): v for k, v in r.get("hashes", {}).items()},
        })
    backbones = sorted({c["backbone"] for c in cells if c.get("backbone")})
    weights = sorted({c["weights_id"] for c in cells if c.get("weights_id")})
    return {
        "dreamjax_version": __version__, "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "sweep_dir": str(sweep_dir), "backbone": ", ".join(backbones), "weights_id": ", ".join(weights),
        "counts": {s: sum(c["status"] == s for c in cells) for s in ("done", "failed", "pending")},
        "paintings": paintings, "cells": cells,
    }


def _label(r: dict) -> str:
    """Caption: the layer set, plus whatever hyperparameter the job's overrides changed."""
    extra = [o.split("=", 1) for o in r.get("overrides", []) if "=" in o]
    extra = [f"{k.split('.')[-1]} {v}" for k, v in extra if k.startswith("dream.")]
    return " · ".join([r["layers"]] + extra)


def collect(sweep_dir: str | Path, *, analyze: bool = True) -> dict:
    """Write manifest.json, summary.csv, grids/ and index.html for a sweep (or a single run);
    then, unless ``analyze=False`` or the sweep's config says ``analyze: false``, the analysis."""
    sweep_dir = Path(sweep_dir).resolve()
    records = find_records(sweep_dir)
    if not records:
        raise FileNotFoundError(f"no cell records ({CELL_RECORD}) under {sweep_dir}: nothing to collect")
    manifest = build_manifest(sweep_dir, records)
    originals = {}
    for name, p in manifest["paintings"].items():
        if p["status"] == "ok":
            try:
                originals[name] = images.load_painting(p["path"]).pixels
            except (images.ImageError, OSError):
                pass
    files.write_json(sweep_dir / "manifest.json", manifest)
    paths = report.write_sweep_report(sweep_dir, manifest, originals)
    log.info("sweep report: %s", sweep_dir / "index.html")
    if analyze:  # config `analyze` (default true): classes, layer energy, change; never breaks the sweep
        analysis.analyze_after_collect(sweep_dir, manifest)
    return {"manifest": manifest, "paths": paths}
