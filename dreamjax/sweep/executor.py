"""Executes cells: loads paintings, groups cells into batches, runs the engine, writes outputs.

The same code serves a single run (one job, several paintings), the batched multirun
launcher (all jobs' cells at once) and the ``basic`` launcher (one job per call).

Per cell, in ``<job_dir>/<painting>/``: ``dream.png``, ``octave_<i>.png``, ``frames.gif``,
``losses.json``, ``cell_config.json`` (the cell's settings) and, written last, ``cell.json``: the
cell's record (status, outputs with their sha256, losses, times). A cell is complete when its
``cell.json`` says "done", its fingerprint matches and every output's hash checks out; resume
skips exactly those cells.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from dreamjax import __version__, config, files
from dreamjax.engine import dream
from dreamjax.models.registry import get_spec, load_backbone
from dreamjax.outputs import images
from dreamjax.sweep import checkpoint, grid
from dreamjax.sweep import objective as cell_objective
from dreamjax.sweep.checkpoint import fault_point
from dreamjax.sweep.grid import Cell
from dreamjax.weights.store import cache_dir

log = logging.getLogger("dreamjax")

BUNDLED = files.BUNDLED_PAINTINGS
CELL_RECORD = "cell.json"


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------
def _expand(spec: str) -> str:
    if spec == "bundled":
        return str(BUNDLED)
    if spec.startswith("bundled/"):
        return str(BUNDLED / spec[len("bundled/"):])
    return spec


def resolve_paintings(paths: Any) -> list[Path]:
    """``data.paths`` -> painting files (absolute). "bundled" (or "bundled/<file>") names the shipped
    ones. Raises ConfigError when no entry names a painting; see :func:`plan_inputs` for the entries
    that fail one by one."""
    return [Path(p.path) for p in plan_inputs(paths) if not p.error]


def plan_inputs(paths: Any) -> list[grid.PaintingInput]:
    """Each painting of ``data.paths`` with the sha256 of its bytes, read once at plan time. An entry
    that names nothing, a broken symlink or an unreadable file becomes a failed input (its cells
    fail, the others run); ConfigError only when no entry yields any painting."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[str, grid.PaintingInput] = {}
    problems: list[str] = []
    for p in paths:
        spec = os.path.abspath(os.path.expanduser(_expand(str(p))))
        if os.path.isdir(spec):  # broken links in a folder are inputs too: listed, not skipped
            for entry in sorted(os.scandir(spec), key=lambda e: e.name):
                if entry.is_symlink() and not os.path.exists(entry.path) and images.is_painting_name(entry.name):
                    found.setdefault(entry.path, grid.PaintingInput(
                        entry.path, error=f"ImageError: {files.display_path(entry.path)}: broken symbolic link "
                                          f"(points to {files.display_path(os.readlink(entry.path))})"))
        try:
            matches = images.find_paintings([spec])
        except ValueError as e:
            problems.append(str(e))
            found.setdefault(spec, grid.PaintingInput(spec, error=f"ImageError: data.paths entry {str(p)!r}: {e}"))
            continue
        for m in matches:
            key = str(m)
            if key in found:
                continue
            try:
                found[key] = grid.PaintingInput(key, sha256=files.file_sha256(m))
            except OSError as e:  # unreadable (permissions), vanished: this input fails alone
                found[key] = grid.PaintingInput(key, error=f"ImageError: {files.display_path(m)}: cannot read "
                                                           f"({e.strerror or type(e).__name__}); check its permissions")
    if not any(not p.error for p in found.values()):
        raise config.ConfigError("data.paths", "names no readable painting (" + "; ".join(problems or [
            p.error for p in found.values()])[:400] + ")", value=list(map(str, paths)))
    return sorted(found.values(), key=lambda q: q.path)


def loaded_backbone(name: str, weights: str, include_top: bool = False):
    """The backbone with its weights, loaded once per process (plan time checks them; the run reuses them);
    with its classifier top when a class term needs the logits."""
    # (one cache key however the arguments are spelled: plan time's call and the run's were two,
    # and a random InceptionV3 was built twice, an .h5 read twice)
    return _loaded_backbone(str(name), str(weights), bool(include_top))


@functools.lru_cache(maxsize=None)
def _loaded_backbone(name: str, weights: str, include_top: bool):
    return load_backbone(name, weights=weights, include_top=include_top)


def setup_jax_cache(path: str | None = None):
    """Persistent compilation cache: rerunning or extending a sweep does not compile again."""
    path = path or os.environ.get("DREAMJAX_JAX_CACHE") or str(cache_dir() / "jax-cache")
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class CompileLog:
    """Counts and times XLA compilations (jax.monitoring), and logs the slow ones.

    Counting starts at construction (``active=True``) or on entering a ``with`` block, and stops
    at ``close()`` / leaving the block.
    """

    _listeners: list = []
    _registered = False

    def __init__(self, active: bool = True):
        self.count = 0
        self.seconds = 0.0
        if not CompileLog._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileLog._dispatch)
            CompileLog._registered = True
        if active:
            CompileLog._listeners.append(self)

    @staticmethod
    def _dispatch(event, duration, **kw):
        if event.endswith("backend_compile_duration"):
            for lst in CompileLog._listeners:
                lst.count += 1
                lst.seconds += duration
            if duration > 1.0 and CompileLog._listeners:
                log.info("compiled a program in %.1f s", duration)

    def __enter__(self):
        if self not in CompileLog._listeners:
            CompileLog._listeners.append(self)
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self in CompileLog._listeners:
            CompileLog._listeners.remove(self)


# ----------------------------------------------------------------------------------------------
# Completion records
# ----------------------------------------------------------------------------------------------
def read_record(cell: Cell) -> dict | None:
    try:
        return json.loads((cell.out_dir / CELL_RECORD).read_text())
    except (OSError, ValueError):
        return None


def is_complete(cell: Cell) -> bool:
    """Done, same settings, and every output present with the hash recorded when written."""
    rec = read_record(cell)
    if not rec or rec.get("status") != "done" or rec.get("fingerprint") != cell.fingerprint():
        return False
    for rel, digest in rec.get("hashes", {}).items():
        p = Path(cell.job_dir) / rel
        if not p.is_file() or files.file_sha256(p) != digest:
            return False
    return True


def _record_base(cell: Cell) -> dict:
    """What made the cell: every setting, the backbone and its weights id, the painting's hash, the
    code version and the full resolved config (analysis and reports read this, never Hydra's files)."""
    return {
        "id": cell.id, "job": cell.job, "job_dir": cell.job_dir, "painting": cell.painting,
        "painting_path": cell.painting_path, "painting_sha256": cell.painting_sha256 or None,
        "layers": cell.layers, "label": grid.cell_label(cell),
        "weights": cell.weights, "weights_id": cell.weights_id or None, "straight_through": cell.straight_through,
        "config": json.loads(cell.config_json) if cell.config_json else None,
        "dreamjax_version": __version__, "code_version": checkpoint.code_version(),
        "taps": list(cell.taps), "layer_weights": list(cell.layer_weights), "preset": cell.preset,
        "hyper": {"step_size": cell.step_size, "max_loss": None if math.isinf(cell.max_loss) else cell.max_loss,
                  "jitter": cell.jitter, "iterations": cell.iterations, "seed": cell.seed,
                  "image_size": cell.image_size},
        "static": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cell.static},
        "backbone": cell.backbone, "overrides": list(cell.overrides), "fingerprint": cell.fingerprint(),
        **(cell_objective.record(cell) if cell.objective or cell.start != "painting" or cell.objective_static else {}),
    }


def write_failed(cell: Cell, error: str):
    rec = _record_base(cell) | {"status": "failed", "error": error, "outputs": {}, "hashes": {}}
    cell.out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(cell.out_dir / CELL_RECORD, rec)
    return rec


# ----------------------------------------------------------------------------------------------
# Execution
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunOptions:
    batch_size: int = 8
    octave_images: bool = True
    gif: bool = True
    gif_max_side: int = 256
    gif_frame_ms: int = 120
    checkpoint: bool = True
    every_steps: int = 10
    max_to_keep: int = 2
    max_pixels: int = 64_000_000
    upscale_small: bool = True
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping) -> "RunOptions":
        c = config.validate(cfg)
        o, k, d = c.outputs, c.checkpoint, c.data
        return cls(batch_size=c.batch_size, octave_images=o.octave_images, gif=o.gif, gif_max_side=o.gif_max_side,
                   gif_frame_ms=o.gif_frame_ms, checkpoint=k.enabled, every_steps=k.every_steps,
                   max_to_keep=k.max_to_keep, max_pixels=d.max_pixels, upscale_small=d.upscale_small)


class Executor:
    """Runs cells in batches. Backbones and compiled programs are cached across batches."""

    def __init__(self, options: RunOptions, stop_requested: Callable[[], bool] = lambda: False):
        self.opt = options
        self.stop_requested = stop_requested
        self._backbones: dict = {}
        self._dreamers: dict = {}
        self._guides: dict = {}  # guide image features, once per (image, size, tap)
        self.compiles = CompileLog()
        self.stats = {"cells_done": 0, "cells_failed": 0, "cells_skipped": 0, "batches": 0, "groups": 0,
                      "programs": 0, "cell_steps": 0, "seconds": 0.0}

    # --- cached resources -----------------------------------------------------------------------
    def backbone(self, name: str, weights: str, include_top: bool = False):
        key = (name, weights, include_top)
        if key not in self._backbones:
            t = time.perf_counter()
            self._backbones[key] = loaded_backbone(name, weights, include_top)
            log.info("loaded backbone %s (%s) in %.1f s", name, self._backbones[key].weights_id[:12],
                     time.perf_counter() - t)
        return self._backbones[key]

    def dreamer(self, cell: Cell, capacity: int, shape: tuple[int, int], batch: int = 1):
        """One Dreamer (its compiled programs) per distinct static configuration."""
        bb = self.backbone(cell.backbone, cell.weights, cell_objective.needs_top([cell]))
        cfg, plan = dream_settings(cell, bb, shape, batch)
        key = (cell.backbone, cell.weights, cfg, plan, capacity)
        if key not in self._dreamers:
            self._dreamers[key] = dream.Dreamer(bb, cfg, plan, capacity)
        return self._dreamers[key]

    # --- the whole job ---------------------------------------------------------------------------
    def run(self, cells: Sequence[Cell], checkpoint_root: str | Path | None = None) -> list[dict]:
        """Dream every cell; returns their records (done, failed or skipped-as-complete). A full
        disk stops the run with :class:`~dreamjax.files.DiskFull` (no cell is marked failed)."""
        try:
            return self._run(cells, checkpoint_root)
        except Exception as e:
            if files.is_disk_full(e) and not isinstance(e, files.DiskFull):
                raise files.DiskFull(_out_root(cells, checkpoint_root)) from None
            raise

    def skip_complete(self, cells: Sequence[Cell]) -> tuple[dict[str, dict], set[str]]:
        """Records of the cells already complete (verified by ``is_complete``) and their ids; counted
        as skipped. Shared by still-image and motion runs."""
        records: dict[str, dict] = {}
        for c in cells:
            if is_complete(c):
                records[c.id] = read_record(c) | {"skipped": True}
                self.stats["cells_skipped"] += 1
        return records, set(records)

    def pending_batches(self, group: Sequence[Cell], complete: set[str]):
        """A group's batches (formed from *all* its cells, complete ones included, so a resumed run
        has exactly the batches of an uninterrupted one) that still have work; raises
        :class:`Interrupted` between batches when a stop was requested. Shared by still and motion runs."""
        for batch in grid.batches(group, self.opt.batch_size):
            if self.stop_requested():
                raise Interrupted("stopped between batches")
            if not all(c.id in complete for c in batch):
                yield batch

    def count_programs(self) -> None:
        self.stats["programs"] = sum(d.programs() for d in self._dreamers.values())

    def _run(self, cells: Sequence[Cell], checkpoint_root: str | Path | None = None) -> list[dict]:
        t0 = time.perf_counter()
        records, complete = self.skip_complete(cells)
        # Batches are formed from *all* cells (complete ones included), so a resumed run has
        # exactly the batches of an uninterrupted one: same checkpoints, same bytes.
        todo = list(cells) if len(complete) < len(cells) else []

        # Load each painting once; a bad painting fails its cells, the rest go on.
        loaded: dict[str, Any] = {}
        buckets = []
        for c in todo:
            if c.input_error:  # found at plan time: unreadable, broken link, an entry matching nothing
                if c.id not in complete:
                    records[c.id] = write_failed(c, c.input_error)
                    self.stats["cells_failed"] += 1
                continue
            if c.painting_path not in loaded:
                loaded[c.painting_path] = self._load(c)
            p = loaded[c.painting_path]
            if isinstance(p, str):
                if c.id not in complete:
                    records[c.id] = write_failed(c, p)
                    self.stats["cells_failed"] += 1
                continue
            h, w = p.pixels.shape[:2]
            bucket = images.bucket_shape(h, w, c.image_size)
            note = images.squeeze_note(p.original_size, bucket, c.image_size)
            if note and note not in p.notes:  # never a silent squeeze: in the record, the manifest, the log
                log.warning("painting %s: %s", c.painting, note)
                p = loaded[c.painting_path] = dataclasses.replace(p, notes=p.notes + (note,))
            buckets.append((c, bucket))

        groups = grid.group_cells(buckets)
        self.stats["groups"] += len(groups)
        total_steps = sum(_cell_steps(c) for cs in groups.values() for c in cs if c.id not in complete)
        bar = _progress(total_steps, self.opt.progress)
        for key, group_cells in groups.items():
            shape = key[-1]
            capacity = max(c.iterations for c in group_cells)
            if all(c.id in complete for c in group_cells):
                continue
            # Every batch of a group has the same length (the last one padded), so one program.
            length = pad_to(min(self.opt.batch_size, len(group_cells)), _device_count())
            try:
                dreamer = self.dreamer(group_cells[0], capacity, shape, length)
            except ValueError as e:  # ConfigError included: e.g. an elongated bucket too small
                for c in group_cells:
                    records[c.id] = write_failed(c, f"{type(e).__name__}: {e}")
                    self.stats["cells_failed"] += 1
                continue
            for batch in self.pending_batches(group_cells, complete):
                for rec in self._run_batch(dreamer, batch, loaded, shape, bar, checkpoint_root, length,
                                           complete):
                    records[rec["id"]] = rec
        bar.close()
        self.count_programs()
        self.stats["seconds"] += time.perf_counter() - t0
        return [records[c.id] for c in cells if c.id in records]

    def _load(self, cell: Cell):
        try:
            min_size = get_spec(cell.backbone).min_size
            return images.load_painting(cell.painting_path, max_pixels=self.opt.max_pixels, min_size=min_size,
                                        upscale_small=self.opt.upscale_small)
        except images.ImageError as e:
            log.warning("painting refused: %s", e)
            return f"ImageError: {e}"
        except OSError as e:  # unreadable since plan time (permissions changed, file removed)
            msg = f"{files.display_path(cell.painting_path)}: cannot read ({e.strerror or type(e).__name__})"
            log.warning("painting refused: %s", msg)
            return f"ImageError: {msg}"

    # --- one batch ---------------------------------------------------------------------------------
    def _run_batch(self, dreamer, batch: list[Cell], loaded, shape, bar, checkpoint_root, length,
                   complete: set = frozenset()) -> list[dict]:
        bb = dreamer.backbone
        n_real = len(batch)
        padded = batch + [batch[-1]] * (length - n_real)
        pixels = np.stack([images.resize_uint8(loaded[c.painting_path].pixels, shape) for c in padded])
        paintings = np.asarray(bb.preprocess(pixels))
        originals = np.asarray(bb.preprocess(cell_objective.start_images(padded, pixels)))
        iterations = [c.iterations for c in batch] + [0] * (len(padded) - n_real)  # padding cells idle
        try:
            picked: list = []  # the channels a pick entry chose on each painting (its record)
            values = cell_objective.cell_values(padded, dreamer.cfg.terms, bb, paintings, self._guides, picked)
        except grid.ConfigError as e:
            return [write_failed(c, f"ConfigError: {e}") for c in batch]
        params = dream.CellParams.make(
            [c.layer_weights for c in padded], [c.step_size for c in padded], [c.max_loss for c in padded],
            [c.jitter for c in padded], iterations, seed=[c.key_seed() for c in padded],
            dtype=np.dtype(dreamer.cfg.image_dtype), terms=values)
        params = shard_batch(params)
        originals = shard_batch(originals)
        t_start = time.perf_counter()
        compiles_before = self.compiles.seconds
        try:
            run = dream.DreamRun(dreamer, originals, params)
        except config.ConfigError as e:
            return [write_failed(c, f"ConfigError: {e}") for c in batch]

        ckpt = None
        if self.opt.checkpoint:
            root = Path(checkpoint_root or Path(batch[0].job_dir).parent / ".checkpoints")
            ckpt = checkpoint.BatchCheckpointer(root / grid.batch_id(batch), batch_meta(batch, bb),
                                                max_to_keep=self.opt.max_to_keep)
            if ckpt.restore_into(run):
                self.stats.setdefault("resume_restored_unix", time.time())  # bench: resume latency
        steps_per_octave = dreamer.capacity
        try:
            while not run.done:
                before = run.octave * steps_per_octave + (int(run.state.step) if run.state is not None else 0)
                run.advance(self.opt.every_steps if ckpt else None)
                after = run.octave * steps_per_octave + (int(run.state.step) if run.state is not None else 0)
                bar.update(max(0, after - before) * n_real)
                if ckpt is not None and ckpt.restored_step is not None and "resume_first_step_unix" not in self.stats:
                    self.stats["resume_first_step_unix"] = time.time()  # bench: resume latency
                checkpoint.fault_point("octave" if run.state is None else "step")
                if ckpt is not None and not run.done:
                    ckpt.save(run)
                if self.stop_requested():
                    if ckpt is not None:
                        ckpt.save(run, force=True)
                        ckpt.close()
                    raise Interrupted(f"stopped with a checkpoint of batch {grid.batch_id(batch)} at octave "
                                      f"{run.octave} step {0 if run.state is None else int(run.state.step)}")
        except Interrupted:
            raise
        except Exception as e:  # one bad batch must not stop the sweep
            if files.is_disk_full(e):  # ... but a full disk stops it, and is not the cells' fault
                if ckpt is not None:
                    ckpt.abandon()
                raise files.DiskFull(_out_root(batch, checkpoint_root)) from None
            if self.stop_requested():  # raised while stopping (a signal handler, a killed child): not the cells' fault
                if ckpt is not None:
                    ckpt.close()
                raise Interrupted(f"stopped during batch {grid.batch_id(batch)} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from e
            log.exception("batch of %d cells failed", n_real)
            if ckpt is not None:
                ckpt.close()
            self.stats["cells_failed"] += n_real
            return [write_failed(c, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                    for c in batch]
        except BaseException:  # SystemExit (submitit's requeue on preemption), KeyboardInterrupt
            if ckpt is not None:
                ckpt.close()  # the in-flight async save is committed before the process goes
            raise
        seconds = {"run": time.perf_counter() - t_start, "compile": self.compiles.seconds - compiles_before}
        try:
            recs = [self._write_cell(run, i, c, loaded[c.painting_path], bb, seconds, picked[i] if picked else None)
                    for i, c in enumerate(batch) if c.id not in complete]
        except Exception as e:
            if ckpt is not None and files.is_disk_full(e):
                ckpt.abandon()  # the batch's last checkpoint stays: the rerun writes its cells from it
            raise
        if ckpt is not None:
            ckpt.finish()
            self.stats["checkpoint_seconds"] = self.stats.get("checkpoint_seconds", 0.0) + ckpt.seconds
            self.stats["checkpoint_saves"] = self.stats.get("checkpoint_saves", 0) + ckpt.saves
            if ckpt.restored_step is not None:
                self.stats["batches_resumed"] = self.stats.get("batches_resumed", 0) + 1
        self.stats["batches"] += 1
        self.stats["cells_done"] += len(recs)
        self.stats["cell_steps"] += sum(c.iterations for c in batch) * len(run.shapes)
        return recs

    def _write_cell(self, run, i: int, cell: Cell, painting, bb, seconds, picked: dict | None = None) -> dict:
        out = cell.out_dir
        out.mkdir(parents=True, exist_ok=True)
        rel = lambda p: str(Path(p).relative_to(cell.job_dir))  # noqa: E731
        outputs: dict[str, Any] = {}
        to_px = lambda x: images.to_uint8(np.asarray(bb.deprocess(np.asarray(x))))  # noqa: E731
        size = painting.original_size
        final = images.restore_aspect(to_px(run.final[i]), size, cell.image_size)
        if cell.original_colors:
            final = images.original_colors(final, painting.pixels)
        outputs["dream"] = rel(images.save_png(out / "dream.png", final))
        if self.opt.octave_images:
            outputs["octaves"] = [rel(images.save_png(out / f"octave_{k}.png", to_px(im[i])))
                                  for k, im in enumerate(run.octave_images)]

        fault_point("output")  # tests: killed with some of this cell's outputs written
        if self.opt.gif:
            frames = [images.restore_aspect(to_px(f[i]), size, self.opt.gif_max_side)
                      for octf in run.octave_frames for f in octf]
            frames.append(images.restore_aspect(final, size, self.opt.gif_max_side))
            outputs["gif"] = rel(images.save_gif(out / "frames.gif", frames, duration_ms=self.opt.gif_frame_ms,
                                                 max_side=self.opt.gif_max_side))
        losses = []
        nt = len(cell.taps)
        columns = run.dreamer.cfg.columns[nt:]  # objective terms (weighted), after the taps
        for k, (ol, sh) in enumerate(zip(run.octave_losses, run.shapes)):
            li = np.asarray(ol)[:, i, :]
            steps = [None if np.isnan(r).any() else [float(v) for v in r] for r in li]
            while steps and steps[-1] is None:
                steps.pop()
            octave = {"octave": k, "shape": list(sh), "per_tap": [s and s[:nt] for s in steps]}
            if columns:
                octave["per_term"] = [s and s[nt:] for s in steps]
            losses.append(octave)
        last_row = next((s for s in reversed(np.asarray(run.octave_losses[-1])[:, i, :])
                         if not np.isnan(s).any()), None) if run.octave_losses else None
        last = None if last_row is None else [float(v) for v in last_row]
        final_losses = dict(zip(cell.taps, last[:nt])) if last else {}
        final_terms = dict(zip(columns, last[nt:])) if last and columns else {}
        files.write_json(out / "losses.json", {"taps": list(cell.taps), "layer_weights": list(cell.layer_weights),
                                                **({"terms": list(columns)} if columns else {}),
                                                "octaves": losses})
        outputs["losses"] = rel(out / "losses.json")
        files.write_json(out / "cell_config.json", _record_base(cell))
        outputs["config"] = rel(out / "cell_config.json")
        hashed = [outputs["dream"], outputs["losses"], outputs["config"]] + outputs.get("octaves", []) + \
            ([outputs["gif"]] if "gif" in outputs else [])
        rec = _record_base(cell) | {
            "status": "done", "error": None, "outputs": outputs,
            "hashes": {r: files.file_sha256(Path(cell.job_dir) / r) for r in hashed},
            "final_losses": final_losses, **({"final_terms": final_terms} if final_terms else {}),
            "final_loss": (float(np.dot(list(final_losses.values()), cell.layer_weights) + sum(final_terms.values()))
                           if final_losses else None),
            "painting_sha256": painting.sha256, "painting_notes": list(painting.notes),
            "painting_size": list(painting.original_size), "weights_id": bb.weights_id,
            "bucket": list(run.originals.shape[1:3]), "seconds": seconds,
            **({"picked": picked} if picked else {}),  # {tap: channels} a pick chose on this painting
        }
        files.write_json(out / CELL_RECORD, rec)  # last: marks the cell complete
        return rec


def _out_root(cells: Sequence[Cell], checkpoint_root) -> Path:
    """The folder a run writes into (the sweep's, or the single run's), for messages."""
    return Path(checkpoint_root).parent if checkpoint_root else Path(cells[0].job_dir).parent


class Interrupted(RuntimeError):
    """A stop was requested (SIGTERM/SIGINT); in-flight batches were checkpointed."""


def batch_meta(batch: Sequence[Cell], bb) -> dict:
    return {"batch_id": grid.batch_id(batch), "cells": [c.id for c in batch],
            "fingerprints": [c.fingerprint() for c in batch], "weights_id": bb.weights_id,
            "dreamjax_version": __version__}


def dream_settings(cell: Cell, bb, shape, batch: int = 1):
    """Cell's static settings -> (DreamConfig, OctavePlan) for its backbone and bucket shape."""
    s = cell.static_dict()
    plan = dream.OctavePlan.from_settings(s)
    micro_batch = auto_micro_batch() if s["micro_batch"] == "auto" else s["micro_batch"]
    tile = s["tile_size"]
    if tile == "auto":  # sized for what one gradient pass holds
        tile = auto_tile_size(bb, cell.taps, shape, budget_gb=float(s.get("memory_budget_gb") or 4.0),
                              batch=dream.pass_size(batch, micro_batch), compute_dtype=s["compute_dtype"])
    cfg = dream.DreamConfig(
        taps=bb.check_taps(cell.taps), norm=s["norm"], objective=s["objective"], border=int(s["border"]),
        frame_every=int(s["frame_every"] or 0), clip=bool(s["clip"]), value_range=tuple(bb.value_range),
        tile_size=int(tile), tiles=s.get("tiles") or "cover", optimizer=s["optimizer"],
        grad_clip=float(s["grad_clip"] or 0),
        compute_dtype=s["compute_dtype"], straight_through=cell.straight_through,
        constant_weights=bool(s.get("constant_weights") or False), micro_batch=micro_batch,
        cpu_kernels=str(s.get("cpu_kernels") or "auto"))
    if cell.objective or cell.objective_static:
        terms, param, transforms, lapnorm = cell_objective.group_terms(cell, bb, shape)
        cfg = dataclasses.replace(cfg, terms=terms, param=param, transforms=transforms, lapnorm=lapnorm)
    return cfg, plan


def auto_micro_batch() -> int:
    """Cells per gradient pass when the config says ``auto``: 1 on a single CPU device (one
    image already fills the cores, and a pass over several large images runs out of cache),
    the whole batch elsewhere, and wherever the batch is split over several devices
    (``results/bench/README.md`` has the measurements)."""
    return 1 if jax.default_backend() == "cpu" and jax.device_count() == 1 else 0


# A generous bound on a gradient's temporary memory per input pixel (the backbones here measure
# 1-40 KiB): below it the exact figure (a probe compilation) is not needed to know a run fits.
_GRAD_BYTES_PER_PIXEL_BOUND = 64 * 1024


def memory_limit() -> int:
    """Bytes the run may use: the accelerator's memory, or this machine's physical memory on CPU."""
    dev = jax.local_devices()[0]
    if dev.platform != "cpu":
        try:
            limit = (dev.memory_stats() or {}).get("bytes_limit")
            if limit:
                return int(limit)
        except Exception:  # noqa: BLE001 - a backend without memory_stats
            pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _gb(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def memory_estimate(bb, cell: Cell, batch: int) -> dict:
    """Peak memory of one batch of ``cell``'s group, from the image size, the batch, the backbone and
    the tile: the images the engine keeps (image, original, detail, optimizer state, frames and
    octave images) plus one gradient pass. The gradient's bytes per pixel are XLA's own figure
    (:func:`gradient_bytes_per_pixel`), asked for only when a generous bound does not already fit."""
    s = cell.static_dict()
    shapes = dream.OctavePlan.from_settings(s).shapes(cell.image_size, cell.image_size)
    area = max(h * w for h, w in shapes)
    itemsize = 8 if s["compute_dtype"] == "float64" else 4
    frames = (cell.iterations // s["frame_every"] + 1) if s["frame_every"] else 0
    state = batch * 3 * itemsize * (area * (8 + frames) + sum(h * w for h, w in shapes))
    micro = auto_micro_batch() if s["micro_batch"] == "auto" else s["micro_batch"]
    n_pass = dream.pass_size(batch, micro)
    tile = s["tile_size"]
    limit = memory_limit()
    per_pixel = float(_GRAD_BYTES_PER_PIXEL_BOUND)
    exact = False
    if tile == "auto" or state + n_pass * area * per_pixel > limit:
        if state <= limit:  # the images alone do not fit: no need to ask XLA about the gradient
            per_pixel, exact = gradient_bytes_per_pixel(bb, tuple(cell.taps), s["compute_dtype"]), True
    if tile == "auto":
        tile = auto_tile_size(bb, cell.taps, (cell.image_size, cell.image_size),
                              budget_gb=float(s.get("memory_budget_gb") or 4.0), batch=n_pass,
                              compute_dtype=s["compute_dtype"])
    pixels = min(area, tile * tile) if tile else area
    return {"bytes": state + n_pass * pixels * per_pixel, "images_bytes": state, "limit": limit, "tile": tile,
            "pass": n_pass, "exact": exact}


def check_memory(bb, cell: Cell, batch: int) -> dict:
    """Refuse, before any compute, a run whose estimated peak memory exceeds the machine's."""
    est = memory_estimate(bb, cell, batch)
    if est["bytes"] > est["limit"]:
        how = f"tiles of {est['tile']} px" if est["tile"] else "untiled"
        fix = "lower data.image_size or batch_size"
        if not est["tile"] and est["images_bytes"] <= est["limit"]:
            fix += ", or set dream.tile_size=auto (tiles sized to dream.memory_budget_gb)"
        raise config.ConfigError(
            "data.image_size", f"needs an estimated {_gb(est['bytes'])} of memory (batch {batch}, {cell.backbone}, "
            f"{how}, {est['pass']} cell(s) per gradient pass) but this machine has {_gb(est['limit'])}; {fix}",
            value=cell.image_size)
    return est


def auto_tile_size(bb, taps, shape, budget_gb: float, batch: int = 1, compute_dtype: str = "float32") -> int:
    """The largest tile (multiple of 64) whose backward pass for ``batch`` cells fits the budget;
    0 (untiled) when the whole image does."""
    per_pixel = gradient_bytes_per_pixel(bb, tuple(taps), compute_dtype)
    budget = budget_gb * 2**30
    h, w = shape
    if batch * h * w * per_pixel <= budget:
        return 0
    t = int(math.sqrt(budget / (batch * per_pixel))) // 64 * 64
    return max(t, ((2 * bb.min_size + 63) // 64) * 64)


@functools.lru_cache(maxsize=None)
def gradient_bytes_per_pixel(bb, taps: tuple[str, ...], compute_dtype: str = "float32") -> float:
    """Temporary memory of one cell's gradient per input pixel, as XLA itself reports it
    (``memory_analysis`` of the compiled gradient at a 128x128 probe): follows the backbone, the
    taps and the compute dtype instead of a constant."""
    cfg = dream.DreamConfig(taps=taps, compute_dtype=compute_dtype, border=0)
    grad = dream.make_grad_fn(bb.feature_fn(taps, dtype=compute_dtype), cfg)
    probe = 128
    x = jax.ShapeDtypeStruct((1, probe, probe, 3), jnp.float32)
    w = jax.ShapeDtypeStruct((1, len(taps)), jnp.float32)
    mem = jax.jit(grad).lower(bb.dream_variables, x, w).compile().memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    return max(float(temp), 1.0) / probe**2


def _cell_steps(cell: Cell) -> int:
    return cell.iterations * len(dream.OctavePlan.from_settings(cell.static_dict()).exponents)


def pad_to(n: int, devices: int) -> int:
    """Round a batch length up to a multiple of the local device count."""
    return int(math.ceil(n / devices) * devices)


def _device_count() -> int:
    return jax.local_device_count()


def shard_batch(tree):
    """Place the batch axis across all local devices (a 1-D mesh); replicated on one device."""
    devices = jax.local_devices()
    if len(devices) == 1:
        return tree
    mesh = Mesh(np.array(devices), ("batch",))
    sharding, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(np.asarray(a), sharding if np.ndim(a) else replicated), tree)


def _progress(total: int, enabled: bool):
    return tqdm(total=total, unit="cell-step", disable=not enabled, dynamic_ncols=True, smoothing=0.1)
