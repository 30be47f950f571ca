"""Orbax checkpoints of in-flight batches, so a killed sweep resumes exactly.

One ``CheckpointManager`` per batch, in ``<sweep>/.checkpoints/<batch_id>/``. A checkpoint
holds the whole :class:`~dreamjax.dream.DreamRun` state as a flat dict of arrays (current
octave image, optimizer state, step, stop masks, loss and frame buffers, every finished
octave's image, losses and frames; the PRNG keys are part of the batch's parameters and are
rebuilt from the cells) plus a JSON ``meta`` item naming the batch: which cells, in which
order, their fingerprints, the weights and the dreamjax version. A checkpoint whose meta
does not match, or that cannot be read, is refused with a message and the batch restarts
from its beginning; nothing else is touched.

Saves are asynchronous (the next save, ``finish`` and ``close`` wait for the previous one)
and orbax commits each step atomically (written under a temporary name, then renamed;
``cleanup_tmp_directories`` removes what a kill left half-written).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger("dreamjax")
FORMAT = 1


def _flatten_run(run) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {"octave": np.asarray(run.octave, np.int32)}
    s = run.state
    if s is not None:
        flat["step"] = np.asarray(s.step)
        for name in ("image", "stopped", "losses", "frames"):
            flat[f"state_{name}"] = np.asarray(getattr(s, name))
        for i, leaf in enumerate(jax.tree_util.tree_leaves(s.opt_state)):
            flat[f"opt_{i}"] = np.asarray(leaf)
    for i, (im, lo, fr) in enumerate(zip(run.octave_images, run.octave_losses, run.octave_frames)):
        flat[f"oct{i}_image"], flat[f"oct{i}_losses"], flat[f"oct{i}_frames"] = im, lo, fr
    if run.detail is not None:
        flat["detail"] = np.asarray(run.detail)
    # Zero-size arrays (no frames kept) are rebuilt on restore, not stored.
    return {k: v for k, v in flat.items() if v.size > 0}


def _unflatten_into(run, flat: dict[str, np.ndarray]):
    from dreamjax import dream

    d = run.dreamer
    octave = int(flat["octave"])
    n_done = octave
    run.octave_images, run.octave_losses, run.octave_frames = [], [], []
    for i in range(n_done):
        shape = run.shapes[i]
        b = run.originals.shape[0]
        nf = (d.capacity // d.cfg.frame_every) if d.cfg.frame_every else 0
        run.octave_images.append(np.asarray(flat[f"oct{i}_image"]))
        run.octave_losses.append(np.asarray(flat[f"oct{i}_losses"]))
        run.octave_frames.append(np.asarray(flat.get(f"oct{i}_frames", np.zeros((nf, b, *shape, 3), np.float32))))
    run.detail = np.asarray(flat["detail"]) if "detail" in flat else None
    run.octave = octave
    run.state = None
    if "step" in flat:
        # The abstract state of this octave gives the optimizer-state tree structure.
        shape = run.shapes[octave]
        images = jax.ShapeDtypeStruct((run.originals.shape[0], *shape, 3), np.float32)
        abstract = jax.eval_shape(d._init_state, images, run.params)
        leaves, treedef = jax.tree_util.tree_flatten(abstract.opt_state)
        opt = jax.tree_util.tree_unflatten(
            treedef, [np.asarray(flat.get(f"opt_{i}", np.zeros(l.shape, l.dtype))) for i, l in enumerate(leaves)])
        get = lambda n, a: np.asarray(flat.get(f"state_{n}", np.zeros(a.shape, a.dtype)))  # noqa: E731
        from dreamjax.run import shard_batch

        run.state = shard_batch(dream.OctaveState(
            image=get("image", abstract.image), opt_state=opt, step=np.asarray(flat["step"]),
            stopped=get("stopped", abstract.stopped), losses=get("losses", abstract.losses),
            frames=get("frames", abstract.frames)))
        # step is a scalar: keep it unsharded
        run.state = run.state._replace(step=jax.numpy.asarray(np.asarray(flat["step"])))
        for name, a in (("image", abstract.image), ("losses", abstract.losses)):
            if getattr(run.state, name).shape != a.shape:
                raise ValueError(f"state_{name} has shape {getattr(run.state, name).shape}, expected {a.shape}")


class BatchCheckpointer:
    """Save/restore one batch's :class:`DreamRun` with an orbax ``CheckpointManager``."""

    def __init__(self, directory: str | Path, meta: dict, *, max_to_keep: int = 2, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = Path(directory).absolute()  # orbax wants absolute paths
        self.meta = dict(meta) | {"format": FORMAT}
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
            create=True)
        self._mngr = None
        self.saves = 0
        self.seconds = 0.0

    @property
    def mngr(self):
        if self._mngr is None:
            self._mngr = self.ocp.CheckpointManager(self.directory, options=self._options,
                                                    item_names=("state", "meta"))
        return self._mngr

    @staticmethod
    def _step(run) -> int:
        s = run.state
        return run.octave * (run.dreamer.capacity + 1) + (int(s.step) if s is not None else 0)

    def save(self, run, force: bool = False):
        import time

        t = time.perf_counter()
        step = self._step(run)
        if step in self.mngr.all_steps():
            return
        flat = _flatten_run(run)
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(flat),
                                       meta=self.ocp.args.JsonSave(self.meta | {"keys": sorted(flat)}))
        self.mngr.save(step, args=args, force=force)
        self.saves += 1
        self.seconds += time.perf_counter() - t

    def restore_into(self, run) -> bool:
        """Restore the latest checkpoint into ``run``; False (and a fresh start) if none is usable."""
        if not self.directory.exists():
            return False
        try:
            step = self.mngr.latest_step()
            if step is None:
                return False
            restored = self.mngr.restore(step, args=self.ocp.args.Composite(
                meta=self.ocp.args.JsonRestore(), state=self.ocp.args.StandardRestore()))
            meta = dict(restored["meta"])
            mismatch = [k for k in self.meta if meta.get(k) != self.meta[k]]
            if mismatch:
                raise ValueError(f"it was written for another batch or dreamjax version (differs in {mismatch})")
            flat = {k: np.asarray(v) for k, v in restored["state"].items()}
            if sorted(flat) != sorted(meta.get("keys", [])):
                raise ValueError("its arrays do not match its own index")
            _unflatten_into(run, flat)
        except Exception as e:  # corrupt, truncated, foreign: refuse and start over
            log.warning("checkpoint %s refused: %s: %s; this batch restarts from its beginning",
                        self.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self._reset(run)
            return False
        log.info("resumed batch %s from octave %d step %s", self.meta.get("batch_id"), run.octave,
                 None if run.state is None else int(run.state.step))
        return True

    def _reset(self, run):
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
        self._mngr = None
        run.octave, run.state, run.detail = 0, None, None
        run.octave_images, run.octave_losses, run.octave_frames = [], [], []

    def close(self):
        if self._mngr is not None:
            self._mngr.wait_until_finished()
            self._mngr.close()
            self._mngr = None

    def finish(self):
        """The batch's outputs are written: its checkpoints are no longer needed."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
