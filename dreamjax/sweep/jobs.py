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

import dataclasses
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
from dreamjax import __version__, config, files
from dreamjax.config import ConfigError
from dreamjax.engine import dream
from dreamjax.models.registry import available_backbones, get_spec
from dreamjax.outputs import analysis, images, report
from dreamjax.sweep import augment, grid, objective
from dreamjax.sweep import motion as motion_sweep
from dreamjax.sweep.executor import (
    CELL_RECORD,
    Executor,
    Interrupted,
    RunOptions,
    _expand,
    check_memory,
    loaded_backbone,
    plan_inputs,
    setup_jax_cache,
)
from dreamjax.weights.keras_h5 import WeightsError

log = logging.getLogger("dreamjax")
SWEEP_RECORD = "dreamjax_sweep.json"  # which sweep owns the folder (written under the lock)
PLAN = "plan.json"  # the planned cells: the manifest is built from these

# What this process ran, for the exit status (cli.py): set by collect (and execute, as a fallback).
OUTCOME: dict[str, int] = {"done": 0, "failed": 0, "pending": 0, "collected": 0}
_HELD: dict[str, files.FolderLock] = {}  # folder -> its lock, held until the process ends
EXIT_DISK_FULL = 74  # sysexits EX_IOERR: stopped on a full disk, nothing failed, the same command resumes


def _plain(cfg) -> dict:
    """The user's config as plain data, without Hydra's own node (a master multirun config
    cannot resolve ``hydra.sweep.subdir`` outside a job)."""
    if isinstance(cfg, dict):
        return cfg
    if isinstance(cfg, config.Config):
        return cfg.to_dict()
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in cfg if k != "hydra"}


def check_config(cfg) -> tuple[config.Config, list[config.LayerSet] | None]:
    """The validation pass of one job, before any painting is read or backbone loaded: the schema
    (config.validate), the backbone's name, layer sets, taps, octave plan and static dream settings."""
    c = config.validate(_plain(cfg))
    name = c.model.name
    if c.model.module and ":" not in name:  # your own backbone: its module registers it (as grid does)
        name = f"{c.model.module}:{name}"
    try:
        spec = get_spec(name)
    except ImportError as e:
        raise ConfigError("model.module", f"cannot be imported ({e})", value=c.model.module) from None
    except ValueError:
        raise ConfigError("model.name", "is not a backbone", value=c.model.name,
                          allowed=available_backbones()) from None
    sets = load_layer_sets(c.layer_sets, model=dataclasses.asdict(c.model))
    for i, ls in enumerate(sets or [c.layers]):
        k = f"layer_sets[{i}]" if sets else "layers"
        grid._layer_set(ls, spec.name, k)
        unknown = [t for t in ls.taps if t not in spec.taps]
        if unknown:
            raise ConfigError(f"{k}.taps: unknown tap(s) {unknown} for backbone {spec.name!r}; "
                              f"allowed: {', '.join(spec.taps)}")
        _check_plan(c, tuple(ls.taps), spec)
    return c, sets


def plan(cfg, *, job: int, job_dir: str | Path, overrides: Sequence[str] = ()) -> list[grid.Cell]:
    """Cells of one job, everything checked before any compute: the config (check_config), the
    weights (opened and loaded once, here), each painting's bytes (hashed: cells are content-addressed;
    an unreadable one fails alone) and the peak-memory estimate."""
    c, sets = check_config(cfg)
    moving = motion_sweep.settings(c)  # a zoom loop or a video: chains of frames (sweep/motion.py)
    bb = load_weights(c.model)
    inputs = motion_sweep.plan_inputs(moving) if moving and moving["mode"] == "video" else plan_inputs(c.data.paths)
    cells = grid.cells_from_config(c, inputs, job=job, job_dir=job_dir, overrides=overrides, layer_sets=sets,
                                   weights_id=bb.weights_id)
    if any(cell.objective for cell in cells):  # units, channel counts, classes, guides, masks
        objective.check(cells, get_spec(cells[0].backbone), include_top=c.model.include_top)
    augment.check(c.augment)  # the augment experiment's target and second classifier
    if moving:
        cells = motion_sweep.with_motion(cells, moving)
    groups: dict[tuple, list[grid.Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.taps, cell.static), []).append(cell)
    for group in groups.values():
        check_memory(bb, group[0], min(c.batch_size, len(group)))
    return cells


def plan_jobs(jobs: Sequence[tuple[Any, int, str | Path, Sequence[str]]]) -> list[list[grid.Cell]]:
    """Every job of a sweep: all configs checked first (a typo in the last job stops the sweep before
    any weights or painting are read), then each job planned."""
    for cfg, *_ in jobs:
        check_config(cfg)
    return [plan(cfg, job=job, job_dir=job_dir, overrides=overrides) for cfg, job, job_dir, overrides in jobs]


def load_weights(model: config.Model):
    """The backbone with ``model.weights`` loaded (once per process; the run reuses it). Every problem
    (missing, empty, truncated, not a weights file, an unsafe pickle, offline ``auto`` with nothing
    cached) is one WeightsError naming the setting."""
    try:
        return loaded_backbone(model.name, model.weights)
    except Exception as e:  # noqa: BLE001 - whatever the loader met, it is the weights' problem
        msg = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, WeightsError):
            msg = f"{type(e).__name__}: {msg}"
        raise WeightsError(f"model.weights={model.weights!r} ({model.name}): {msg}"[:1000]) from None


def load_layer_sets(names, model: dict | None = None) -> list[config.LayerSet] | None:
    """``layer_sets=[set1,set2,...]``: several layer-weight sets dreamed in one run (one batch). A set
    file may refer to the model's keys (``${model.study.taps}``): they resolve against ``model``."""
    if not names:
        return None

    folder = Path(dreamjax.config_dir()) / "layers"
    out = []
    for i, n in enumerate(names):
        if isinstance(n, config.LayerSet):
            out.append(n)
            continue
        if isinstance(n, dict):
            out.append(config.validate_layer_set(n, f"layer_sets[{i}]"))
            continue
        f = folder / f"{n}.yaml"
        if not f.is_file():
            allowed = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
            raise ConfigError(f"layer_sets[{i}]", "is not a layer set", value=n, allowed=allowed)
        node = OmegaConf.create({"model": model or {}, "set": OmegaConf.load(f)})
        out.append(config.validate_layer_set(OmegaConf.to_container(node, resolve=True)["set"], f"layer_sets[{i}]"))
    return out


def _check_plan(c: config.Config, taps: tuple[str, ...], spec):
    """The octave plan and the static settings must fit the backbone, checked before any compute
    on the square bucket; a painting whose elongated bucket is too small fails alone at run time."""
    s = dict(grid.dream_static(c.dream))
    dream.OctavePlan.from_settings(s).check(
        c.data.image_size, c.data.image_size, backbone=spec.name, min_size=spec.min_size,
        deepest_stride=max(spec.tap_strides[t] for t in taps), border=int(s["border"]), objective=s["objective"])
    dream.DreamConfig(taps=taps, norm=s["norm"], objective=s["objective"], border=s["border"],
                      frame_every=s["frame_every"], clip=s["clip"], optimizer=s["optimizer"],
                      grad_clip=s["grad_clip"], compute_dtype=s["compute_dtype"],
                      straight_through=c.model.straight_through)


def options(cfg) -> RunOptions:
    return RunOptions.from_config(_plain(cfg))


class StopFlag:
    """SIGTERM/SIGINT: finish the current chunk, checkpoint, exit cleanly. A second Ctrl-C exits
    at once (every file is written atomically, so nothing is left half-written)."""

    def __init__(self):
        self.requested = False
        self.signum = 0
        self._old = {}

    def __call__(self) -> bool:
        return self.requested

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            os._exit(130)
        self.requested = True
        self.signum = signum
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
            records = motion_sweep.run_cells(ex, cells, checkpoint_root=checkpoint_root)
        except Interrupted as e:
            log.warning("%s. Resume with the same command: %s", e, resume_cmd)
            raise SystemExit(128 + (stop.signum or signal.SIGTERM)) from None  # 130: Ctrl-C, 143: SIGTERM
        except files.DiskFull as e:
            disk_full(e)
    ex.compiles.close()
    _final_table(ex, records, Path(checkpoint_root).parent)  # the sweep (or run) folder
    stats = dict(ex.stats, compilations=ex.compiles.count, compile_seconds=round(ex.compiles.seconds, 3))
    try:
        files.write_json(stats_path or Path(checkpoint_root).parent / "run_stats.json", stats)
    except OSError as e:
        if not files.is_disk_full(e):
            raise
        disk_full(files.DiskFull(Path(checkpoint_root).parent))
    for r in records:
        OUTCOME[r.get("status", "failed") if r.get("status") in ("done", "failed") else "pending"] += 1
    return records


def disk_full(e: files.DiskFull):
    """Stop once, with one line, on a full disk (exit 74)."""
    log.error("%s", e)
    raise SystemExit(EXIT_DISK_FULL)


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


def _inputs_of(c: config.Config) -> list[str]:
    """``data.paths`` as absolute entries: the same relative paths from two working folders are two
    different sweeps."""
    paths = [c.data.paths] if isinstance(c.data.paths, str) else c.data.paths
    return [os.path.abspath(os.path.expanduser(_expand(str(p)))) for p in paths]


def claim(directory: str | Path, overrides: Sequence[str], cfgs: Sequence, cells: Sequence[grid.Cell], *,
          record: bool = True) -> files.FolderLock:
    """Take the folder for this run, after its config was checked: an exclusive lock held until the
    process ends (a second process on the folder is told who holds it and exits), then, under the
    lock, the sweep record (another sweep's folder is never overwritten; the same command resumes)
    and the plan (the cells the manifest lists)."""
    directory = Path(directory).absolute()
    key = str(directory)
    lock = _HELD.get(key)
    if lock is None:
        lock = files.FolderLock(directory, {"name": config.validate(_plain(cfgs[0])).name})
        lock.acquire()
        if lock.previous.get("pid"):
            log.info("took over the lock left by pid %s on %s (no longer running)", lock.previous.get("pid"),
                     lock.previous.get("host"))
        _HELD[key] = lock
    try:
        if record:
            _check_sweep_record(directory, overrides, [config.validate(_plain(c)) for c in cfgs])
        _write_plan(directory, cells)
    except BaseException:
        _HELD.pop(key, None)
        lock.release()
        raise
    return lock


def release(directory: str | Path) -> None:
    lock = _HELD.pop(str(Path(directory).absolute()), None)
    if lock is not None:
        lock.release()


def _without_paths(overrides: Sequence[str]) -> list[str]:
    return sorted(o for o in overrides if not o.lstrip("+~").startswith("data.paths="))


def _check_sweep_record(directory: Path, overrides: Sequence[str], cfgs: Sequence[config.Config]) -> None:
    """The same sweep = the same name and overrides, with inputs (``data.paths`` resolved to absolute
    entries) that are the old ones, fewer (a removed painting: its cells are stale) or more (the sweep
    extended). Other settings, or other inputs altogether (the same relative paths from another
    working folder), are another sweep, and its folder is never overwritten."""
    mode = cfgs[0].resume
    rec = directory / SWEEP_RECORD
    inputs = sorted({p for c in cfgs for p in _inputs_of(c)})
    mine = {"overrides": sorted(overrides), "name": cfgs[0].name, "inputs": inputs}
    if rec.exists():
        try:
            theirs = json.loads(rec.read_text())
        except (OSError, ValueError):
            theirs = {}
        same = bool(theirs) and theirs.get("name") == mine["name"] and \
            _without_paths(theirs.get("overrides") or []) == _without_paths(mine["overrides"])
        old = set(theirs.get("inputs") or inputs)  # records of older versions have no "inputs"
        if same and not (old <= set(inputs) or set(inputs) <= old):
            same = False
            what = f"inputs {sorted(old)}"
        else:
            what = f"overrides {theirs.get('overrides')}"
        if not same:
            raise ConfigError(
                f"{directory} already holds the results of another sweep ({what}); it is never overwritten: "
                f"choose another name=... (or hydra.sweep.dir / hydra.run.dir)")
        if mode == "false":
            raise ConfigError("resume", f"is false and {directory} already holds results; choose another name=...",
                              value=False)
        log.info("resuming in %s (complete cells are skipped)", directory)
        if theirs.get("inputs") != inputs or theirs.get("overrides") != mine["overrides"]:
            files.write_json(rec, theirs | mine)
        return
    files.write_json(rec, mine | {"created": _dt.datetime.now().isoformat(timespec="seconds"),
                                  "command": _command()})


def _plan_entry(root: Path, c: grid.Cell) -> dict:
    return {"id": c.id, "job": c.job, "dir": os.path.relpath(c.out_dir, root),
            "job_dir": os.path.relpath(c.job_dir, root), "painting": c.painting,
            "painting_path": c.painting_path, "painting_sha256": c.painting_sha256 or None, "layers": c.layers,
            "label": grid.cell_label(c), "fingerprint": c.fingerprint(), "backbone": c.backbone,
            "weights": c.weights, "weights_id": c.weights_id, "input_error": c.input_error or None,
            "overrides": list(c.overrides)}


def _write_plan(directory: Path, cells: Sequence[grid.Cell]) -> None:
    """``plan.json``: the cells of this run, per job. A job's entries replace that job's old ones (the
    basic launcher plans one job at a time); a painting no longer planned is left out, so its old
    files are reported as stale, not as part of the run."""
    path = directory / PLAN
    try:
        old = json.loads(path.read_text()).get("jobs", {})
    except (OSError, ValueError):
        old = {}
    jobs = {str(j): [] for j in sorted({c.job for c in cells})}
    for c in cells:
        jobs[str(c.job)].append(_plan_entry(directory, c))
    merged = (old | jobs) if HydraConfig.initialized() and _basic_multirun() else jobs
    files.write_json(path, {"dreamjax_version": __version__, "jobs": merged})


def _basic_multirun() -> bool:
    try:
        hc = HydraConfig.get()
        return hc.mode == RunMode.MULTIRUN and "dreamjax" not in str(hc.launcher.get("_target_", ""))
    except Exception:  # noqa: BLE001 - no Hydra context: a library call
        return False


def task(cfg) -> Any:
    """The ``@hydra.main`` task: dream this job's cells (basic launcher / single run)."""
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    job = int(hc.job.num) if multirun and hc.job.get("num") is not None else 0
    cells = plan(cfg, job=job, job_dir=job_dir, overrides=list(hc.overrides.task))  # before any claim
    sweep_dir = Path(hc.sweep.dir) if multirun else job_dir
    claim(sweep_dir, list(hc.overrides.task), [cfg], cells, record=not multirun)
    root = sweep_dir / ".checkpoints"
    if not multirun and _plain(cfg).get("analyze", True):  # this process analyses at the end
        analysis.prepare([(c.backbone, str(c.weights or "auto")) for c in cells if not c.input_error],
                         dict.fromkeys(c.painting_path for c in cells if c.painting_path and not c.input_error))
    records = execute(cells, cfg, checkpoint_root=root, resume_cmd=_command(),
                      stats_path=job_dir / "run_stats.json")
    if not multirun:
        collect(job_dir)
        if _plain(cfg).get("augment"):  # experiment=augment: the dataset and its success rate
            augment.write_dataset(job_dir, _plain(cfg)["augment"])
        release(job_dir)
    return {r["id"]: r["status"] for r in records}


# ----------------------------------------------------------------------------------------------
# Collect: manifest, summary, grids, gallery
# ----------------------------------------------------------------------------------------------
def find_records(sweep_dir: Path) -> list[dict]:
    """Every cell record under a folder (a scan: for sweeps without a plan, and to find stale cells)."""
    recs = []
    for p in sorted(Path(sweep_dir).rglob(CELL_RECORD)):
        if ".checkpoints" in p.parts:
            continue
        try:
            recs.append(json.loads(p.read_text()) | {"_path": str(p)})
        except (OSError, ValueError) as e:
            log.warning("unreadable cell record %s: %s", p, e)
    recs.sort(key=lambda r: (int(r.get("job", 0)), r.get("painting", ""), r.get("layers", "")))
    return recs


def planned_records(sweep_dir: Path) -> tuple[list[dict], list[dict]] | None:
    """(records of the planned cells, stale records) from ``plan.json``; None for a folder without one.
    A planned cell without a current record (none yet, or one of other settings or other painting
    bytes) is pending; a record no planned cell claims is stale (its files stay, listed as such)."""
    try:
        plan_ = json.loads((Path(sweep_dir) / PLAN).read_text())
    except (OSError, ValueError):
        return None
    records, claimed = [], set()
    for _job, entries in sorted(plan_.get("jobs", {}).items(), key=lambda kv: int(kv[0])):
        for e in entries:
            path = Path(sweep_dir) / e["dir"] / CELL_RECORD
            claimed.add(os.path.normpath(str(path)))
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                rec = None
            if rec is None or rec.get("fingerprint") != e["fingerprint"]:
                rec = {k: v for k, v in e.items() if k != "dir"} | {
                    "job_dir": os.path.normpath(os.path.join(sweep_dir, e["job_dir"])),
                    "status": "pending", "error": None, "outputs": {}}
            records.append(rec)
    stale = [r | {"_dir": os.path.relpath(os.path.dirname(r["_path"]), sweep_dir)} for r in find_records(sweep_dir)
             if os.path.normpath(r["_path"]) not in claimed]
    return records, stale


def build_manifest(sweep_dir: Path, records: list[dict], stale: Sequence[dict] = ()) -> dict:
    sweep_dir = Path(sweep_dir).resolve()
    cells, paintings = [], {}
    for r in records:
        r.pop("_path", None)
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
            "label": r.get("label") or r["layers"], "overrides": r.get("overrides", []), "hyper": r.get("hyper", {}),
            "status": r["status"], "error": r.get("error"), "outputs": outs,
            "final_losses": r.get("final_losses", {}), "final_loss": r.get("final_loss"),
            "seconds": r.get("seconds", {}), "fingerprint": r.get("fingerprint"), "backbone": r.get("backbone"),
            "weights": r.get("weights"), "weights_id": r.get("weights_id"), "taps": r.get("taps"),
            "layer_weights": r.get("layer_weights"), "painting_sha256": r.get("painting_sha256"),
            "hashes": {rel(k): v for k, v in r.get("hashes", {}).items()},
            **{k: r[k] for k in ("frames", "fps", "frame_seconds", "stability", "motion", "picked") if k in r},
        })
    backbones = sorted({c["backbone"] for c in cells if c.get("backbone")})
    weights = sorted({c["weights_id"] for c in cells if c.get("weights_id")})
    wants = [w for w in ((r.get("config") or {}).get("analyze") for r in records) if w is not None]
    return {
        "dreamjax_version": __version__, "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "sweep_dir": str(sweep_dir), "backbone": ", ".join(backbones), "weights_id": ", ".join(weights),
        "analyze": all(wants) if wants else True,
        "counts": {s: sum(c["status"] == s for c in cells) for s in ("done", "failed", "pending")},
        "paintings": paintings, "cells": cells,
        "stale": [{"id": r.get("id"), "painting": r.get("painting"), "painting_path": r.get("painting_path"),
                   "dir": r.get("_dir"), "status": r.get("status")} for r in stale],
    }


def collect_or_warn(sweep_dir: str | Path) -> dict | None:
    """What a launcher runs at the end of a sweep: collect it; a sweep with no records is a warning,
    a full disk the one-line stop (exit 74)."""
    try:
        return collect(sweep_dir)
    except FileNotFoundError as e:
        log.warning("%s", e)
    except files.DiskFull as e:
        disk_full(e)
    return None


def collect(sweep_dir: str | Path, *, analyze: bool = True) -> dict:
    """Write manifest.json, summary.csv, grids/ and index.html for a sweep (or a single run) from its
    planned cells' records; then, unless ``analyze=False`` or the cells' config says ``analyze: false``,
    the analysis."""
    sweep_dir = Path(sweep_dir).resolve()
    planned = planned_records(sweep_dir)
    if planned is None:  # a folder of an older dreamjax (no plan.json): every record found
        records, stale = find_records(sweep_dir), []
    else:
        records, stale = planned
    if not records:
        raise FileNotFoundError(f"no cell records ({CELL_RECORD}) under {sweep_dir}: nothing to collect")
    try:
        return _collect(sweep_dir, records, stale, analyze)
    except OSError as e:
        if files.is_disk_full(e):
            raise files.DiskFull(sweep_dir) from None
        raise


def _collect(sweep_dir: Path, records: list[dict], stale: list[dict], analyze: bool) -> dict:
    manifest = build_manifest(sweep_dir, records, stale)
    for k in ("done", "failed", "pending"):
        OUTCOME[k] = manifest["counts"][k]
    OUTCOME["collected"] += 1
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
    if stale:
        log.info("%d stale cells (paintings no longer planned) kept on disk, listed under 'stale' in "
                 "manifest.json", len(stale))
    if analyze:  # config `analyze` (default true): classes, layer energy, change; never breaks the sweep
        analysis.analyze_after_collect(sweep_dir, manifest)
    return {"manifest": manifest, "paths": paths}
