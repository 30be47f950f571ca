"""Orbax checkpoints of in-flight batches, so a killed sweep resumes exactly.

One ``CheckpointManager`` per batch, in ``<sweep>/.checkpoints/<batch_id>/`` (absolute path).
A checkpoint holds the whole :class:`~dreamjax.engine.dream.DreamRun` state as a flat dict of numpy
arrays (octave index, the current octave's image, optimizer state, step, stop masks, loss and
frame buffers, every finished octave's image, losses and frames, the google-mode detail; the
PRNG keys are part of the batch's parameters and are rebuilt from the cells) plus a JSON
``meta`` item naming the batch: which cells in which order, their fingerprints, the weights,
the dreamjax version, a hash of the code that computes the numbers (``code``), the batch's
array shapes and a sha256 of every array (``checksum``). A checkpoint whose meta does not
match, whose arrays do not hash to the recorded checksum, or that cannot be read at all, is
refused with a logged message and the batch restarts from its beginning; nothing else is
touched.

Saves are asynchronous: the arrays are copied on the host first, the next save, ``close`` and
``finish`` wait for the write. Orbax commits each step atomically (written under
``<step>.orbax-checkpoint-tmp-*``, then renamed); ``cleanup_tmp_directories`` removes what a
kill left half-written when the manager is next opened. ``max_to_keep`` prunes old steps.

Test-only fault injection: ``DREAMJAX_TEST_KILL_AT=<point>:<n>[:<SIG>]`` makes the process send
itself SIGKILL (or SIG<SIG>, e.g. USR2 = a SLURM preemption for submitit) the n-th time
(1-based) it reaches ``fault_point(<point>)``; with ``DREAMJAX_TEST_KILL_ONCE=<file>`` only the
first process to get there does (the marker file is created). ``<SIG>`` = ``PAUSE`` instead
sleeps there (signal handlers still run: SLURM's USR2 and SIGTERM reach submitit and the sweep),
once per SLURM task (or process), with ``DREAMJAX_TEST_PAUSE_DIR=<dir>``: it writes
``<dir>/<task>.paused`` (the task's SLURM id, ``<array job>_<index>``, else ``pid<pid>``; the
file holds the pid) and goes on when ``<dir>/<task>.go`` appears (at most 10 minutes). Points: ``step`` (after a
chunk of steps, before its checkpoint), ``checkpoint`` (an orbax save issued, not finished),
``octave`` (an octave just ended, before its checkpoint), ``output`` (a cell's PNGs written,
its GIF, losses and record not yet).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np

from dreamjax import files

log = logging.getLogger("dreamjax")
FORMAT = 2
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step being written
_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process at the n-th ``name`` if ``DREAMJAX_TEST_KILL_AT=name:n`` (tests only)."""
    spec = os.environ.get("DREAMJAX_TEST_KILL_AT")
    if not spec:
        return
    parts = spec.split(":")
    point, n, sig = parts[0], (parts[1:2] or ["1"])[0], (parts[2:3] or ["KILL"])[0]
    if point != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] != int(n or 1):
        return
    if sig == "PAUSE":
        _pause()
        return
    once = os.environ.get("DREAMJAX_TEST_KILL_ONCE")  # a marker file: fire in one process only
    if once:
        try:
            with open(once, "x"):
                pass
        except FileExistsError:
            return
    log.warning("DREAMJAX_TEST_KILL_AT=%s: sending SIG%s to this process", spec, sig)
    for h in logging.getLogger().handlers + log.handlers:
        h.flush()
    os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))


def _pause() -> None:
    folder = Path(os.environ["DREAMJAX_TEST_PAUSE_DIR"])
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    key = f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID") or f"pid{os.getpid()}"
    try:
        with open(folder / f"{key}.paused", "x") as f:  # once per task: not again after a requeue
            f.write(str(os.getpid()))
    except FileExistsError:
        return
    log.warning("DREAMJAX_TEST_KILL_AT=%s: task %s paused until %s exists", os.environ["DREAMJAX_TEST_KILL_AT"],
                key, folder / f"{key}.go")
    for h in logging.getLogger().handlers + log.handlers:
        h.flush()
    deadline = time.monotonic() + 600
    while not (folder / f"{key}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """Hash of all code that decides a batch's numbers (the engine, the models and their kernels,
    the weight readers, pixels in and out, the grid, where cells' keys and settings are derived,
    the executor and this format) and of the JAX version: a checkpoint written by other code is
    refused."""
    pkg = Path(__file__).resolve().parents[1]
    files = sorted([*pkg.glob("engine/**/*.py"), *pkg.glob("models/**/*.py"), *pkg.glob("models/**/*.cc"),
                    *pkg.glob("weights/**/*.py"), pkg / "outputs" / "images.py", pkg / "files.py",
                    pkg / "sweep" / "grid.py", pkg / "sweep" / "executor.py", Path(__file__).resolve()])
    h = hashlib.sha256(f"jax {jax.__version__}|format {FORMAT}".encode())
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _checksum(flat: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(flat):
        a = np.ascontiguousarray(flat[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _flatten_run(run) -> dict[str, np.ndarray]:
    # np.array(copy=True): the device buffers are donated to the next chunk while orbax writes.
    cp = lambda x: np.array(x, copy=True)  # noqa: E731
    flat: dict[str, np.ndarray] = {"octave": np.asarray(run.octave, np.int32)}
    s = run.state
    if s is not None:
        flat["step"] = cp(s.step)
        for name in ("image", "stopped", "losses", "frames"):
            flat[f"state_{name}"] = cp(getattr(s, name))
        for i, leaf in enumerate(jax.tree_util.tree_leaves(s.opt_state)):
            flat[f"opt_{i}"] = cp(leaf)
    for i, (im, lo, fr) in enumerate(zip(run.octave_images, run.octave_losses, run.octave_frames)):
        flat[f"oct{i}_image"], flat[f"oct{i}_losses"], flat[f"oct{i}_frames"] = cp(im), cp(lo), cp(fr)
    if run.detail is not None:
        flat["detail"] = cp(run.detail)
    # Zero-size arrays (no frames kept) are rebuilt on restore, not stored.
    return {k: v for k, v in flat.items() if v.size > 0}


def _unflatten_into(run, flat: dict[str, np.ndarray]):
    """Put a checkpoint's arrays back into ``run``; device arrays get exactly the shardings an
    uninterrupted run has (so the same compiled program runs on them)."""
    d = run.dreamer
    octave = int(flat["octave"])
    if not 0 <= octave <= len(run.shapes):
        raise ValueError(f"octave {octave} out of range for a {len(run.shapes)}-octave plan")
    b = run.originals.shape[0]
    nf = (d.capacity // d.cfg.frame_every) if d.cfg.frame_every else 0
    images, losses, frames = [], [], []
    for i in range(octave):
        shape = run.shapes[i]
        expect = {"image": (b, *shape, 3), "losses": (d.capacity, b, len(d.taps)), "frames": (nf, b, *shape, 3)}
        got = {k: np.asarray(flat[f"oct{i}_{k}"]) if f"oct{i}_{k}" in flat else np.zeros(v, np.float32)
               for k, v in expect.items()}
        for k, v in expect.items():
            if got[k].shape != v:
                raise ValueError(f"oct{i}_{k} has shape {got[k].shape}, expected {v}")
        images.append(got["image"])
        losses.append(got["losses"])
        frames.append(got["frames"])
    run.octave_images, run.octave_losses, run.octave_frames = images, losses, frames
    run.detail = np.asarray(flat["detail"]) if "detail" in flat else None
    run.octave = octave
    run.state = None
    if "step" in flat:
        if octave >= len(run.shapes):
            raise ValueError("a state for an octave past the plan's end")
        run._start_octave()  # a fresh state of this octave: the tree structure and the shardings
        fresh = run.state
        names = [f"state_{n}" for n in ("image", "stopped", "losses", "frames")]
        opt_leaves, treedef = jax.tree_util.tree_flatten(fresh.opt_state)

        def put(key, like):
            a = np.asarray(flat[key]) if key in flat else np.zeros(like.shape, like.dtype)
            if a.shape != like.shape or a.dtype != like.dtype:
                raise ValueError(f"{key} is {a.dtype}{list(a.shape)}, expected {like.dtype}{list(like.shape)}")
            return jax.device_put(a, like.sharding)

        image, stopped, losses_, frames_ = (put(k, getattr(fresh, k[6:])) for k in names)
        opt = jax.tree_util.tree_unflatten(treedef, [put(f"opt_{i}", l) for i, l in enumerate(opt_leaves)])
        step = put("step", fresh.step)
        run.state = fresh._replace(image=image, opt_state=opt, step=step, stopped=stopped, losses=losses_,
                                   frames=frames_)


class _QuietDiskFull(logging.Filter):
    """orbax logs each failed background write of a full disk with its traceback (dozens per
    save, from several threads); dreamjax says it once itself (:class:`dreamjax.files.DiskFull`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (files.is_disk_full(exc) or any(t in record.getMessage() for t in files._FULL_TEXT))


_QUIET = _QuietDiskFull()


class BatchCheckpointer:
    """Save/restore one batch's :class:`DreamRun` with an orbax ``CheckpointManager``."""

    def __init__(self, directory: str | Path, meta: dict, *, max_to_keep: int = 2, async_save: bool = True):
        import orbax.checkpoint as ocp  # lazy: ~1 s to import, only runs that checkpoint pay for it

        logging.getLogger("absl").addFilter(_QUIET)  # idempotent: the same filter object
        self.ocp = ocp
        self.directory = Path(directory).absolute()  # orbax wants absolute paths
        self.meta = dict(meta) | {"format": FORMAT, "code": code_version()}
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max(1, int(max_to_keep)), enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        self._mngr = None
        self.saves = 0
        self.seconds = 0.0  # time the run waited on checkpointing (blocking part + waits)
        self.restored_step: tuple[int, int] | None = None

    @property
    def mngr(self):
        if self._mngr is None:
            # Half-written steps of a killed process: removed here, whole. (orbax's own
            # cleanup_tmp_directories removes nested tmp dirs concurrently and can race with itself:
            # FileNotFoundError on a subdirectory the outer rmtree already took.)
            if self.directory.is_dir():
                for p in self.directory.iterdir():
                    if TMP_MARK in p.name:
                        log.info("removing a half-written checkpoint %s", p)
                        shutil.rmtree(p, ignore_errors=True)
            self._mngr = self.ocp.CheckpointManager(self.directory, options=self._options,
                                                    item_names=("state", "meta"))
        return self._mngr

    def _expected(self, run) -> dict:
        return self.meta | {"batch_shape": list(run.originals.shape),
                            "octave_shapes": [list(s) for s in run.shapes], "capacity": run.dreamer.capacity}

    @staticmethod
    def _step(run) -> int:
        s = run.state
        return run.octave * (run.dreamer.capacity + 1) + (int(s.step) if s is not None else 0)

    def save(self, run, force: bool = False):
        t = time.perf_counter()
        step = self._step(run)
        latest = self.mngr.latest_step()
        if latest is not None and step <= latest:
            return  # already saved (e.g. the chunk before a stop)
        flat = _flatten_run(run)
        meta = self._expected(run) | {"keys": sorted(flat), "checksum": _checksum(flat)}
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(flat), meta=self.ocp.args.JsonSave(meta))
        self.mngr.save(step, args=args, force=force)
        self.saves += 1
        fault_point("checkpoint")
        self.seconds += time.perf_counter() - t

    def restore_into(self, run) -> bool:
        """Restore the latest checkpoint into ``run``; False (and a fresh start) if none is usable."""
        if not self.directory.exists():
            return False
        t = time.perf_counter()
        step = None
        try:
            step = self.mngr.latest_step()  # opening the manager removes half-written tmp steps
            if step is None:
                self._reset(run)
                return False
            restored = self.mngr.restore(step, args=self.ocp.args.Composite(
                meta=self.ocp.args.JsonRestore(), state=self.ocp.args.StandardRestore()))
            meta = dict(restored["meta"])
            want = self._expected(run)
            mismatch = [k for k in want if meta.get(k) != want[k]]
            if mismatch:
                raise ValueError(f"it was written for another batch, config or code version (differs in "
                                 f"{', '.join(mismatch)})")
            flat = {k: np.asarray(v) for k, v in restored["state"].items()}
            if sorted(flat) != sorted(meta.get("keys", [])):
                raise ValueError("its arrays do not match its own index")
            if _checksum(flat) != meta.get("checksum"):
                raise ValueError("its arrays do not match their recorded checksum (corrupt)")
            _unflatten_into(run, flat)
        except Exception as e:  # corrupt, truncated, foreign: refuse and start over
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            log.warning("checkpoint refused: %s (step %s): %s: %s; batch %s restarts from its beginning",
                        self.directory, step, type(e).__name__, msg[:300], self.meta.get("batch_id"))
            self._reset(run)
            return False
        self.restored_step = (run.octave, 0 if run.state is None else int(run.state.step))
        self.seconds += time.perf_counter() - t
        log.info("resumed batch %s from its checkpoint at octave %d step %d (%s)", self.meta.get("batch_id"),
                 *self.restored_step, self.directory)
        return True

    def _reset(self, run):
        try:
            self.close()
        except Exception:  # a broken manager must not stop the fresh start
            self._mngr = None
        shutil.rmtree(self.directory, ignore_errors=True)
        run.octave, run.state, run.detail = 0, None, None
        run.octave_images, run.octave_losses, run.octave_frames = [], [], []

    def close(self):
        """Wait for the in-flight save to be committed, then release the manager."""
        if self._mngr is not None:
            t = time.perf_counter()
            try:
                self._mngr.wait_until_finished()
                self._mngr.close()
            finally:
                self._mngr = None
                self.seconds += time.perf_counter() - t

    def abandon(self):
        """After a failed write (a full disk): release the manager and remove the half-written
        steps; the committed ones stay, so the rerun resumes from them."""
        try:
            self.close()
        except Exception:  # the failed async save surfaces here again
            self._mngr = None
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                if TMP_MARK in p.name:
                    shutil.rmtree(p, ignore_errors=True)

    def finish(self):
        """The batch's outputs are written: its checkpoints are no longer needed."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self.directory.parent.rmdir()  # the sweep's .checkpoints, once no batch is in flight
        except OSError:
            pass
