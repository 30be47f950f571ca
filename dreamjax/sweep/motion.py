"""Moving dreams: zoom/rotate/translate feedback loops and videos, batched across cells,
resumable frame by frame.

A chain of frames per cell (DESIGN: "Motion is a sequence of cells"). Every frame step of a batch
is one dream of all its cells through the group's compiled :class:`~dreamjax.engine.dream.Dreamer`
(same shapes every frame, so nothing compiles after the first frame), started from

* loop (``+experiment=zoom``): ``affine(dream[t-1])`` with each cell's own zoom, angle, shift;
* video (``data.video=PATH``): ``blend * source[t] + (1 - blend) * flow_warp(dream[t-1])``, the
  flow between source frames t and t-1 (``video.flow=none|farneback|dis``).

The *frame* is the unit of checkpointing: after frame t every cell's PNG is written and added to
its ``frames.json`` (index, sha256, stability), then the batch's float states are saved in one
atomic ``.checkpoints/<batch>/frame.npz``. A rerun restores the last saved frame (its meta and
checksum must match, and every cell's frames up to it must hash as recorded) and continues with
the next: frames already written are never recomputed, and the float state is exact, so a killed
render gives the same bytes as an uninterrupted one. At the end the MP4 (H.264, yuv420p, the
source's audio) and GIF are written atomically from the frame PNGs, then ``cell.json``.
Test-only kill points (``DREAMJAX_TEST_KILL_AT``, see sweep/checkpoint.py): ``frame`` (frame t
written, its checkpoint not yet) and ``finish`` (a cell of the batch finished, the next not yet).

Per cell, in ``<job_dir>/<painting or video>/``: ``frames/00000.png...``, ``frames.json``,
``video.mp4``, ``frames.gif`` (short sequences), ``stability.png``, ``cell_config.json``,
``cell.json`` (written last; ``outputs.dream`` is the last frame, so grids and the gallery work).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from dreamjax import config, files
from dreamjax.config import ConfigError
from dreamjax.engine import dream, motion
from dreamjax.models.registry import get_spec
from dreamjax.outputs import images, video
from dreamjax.sweep import grid
from dreamjax.sweep.checkpoint import fault_point
from dreamjax.sweep.executor import (
    CELL_RECORD,
    Executor,
    Interrupted,
    _record_base,
    pad_to,
    write_failed,
)

log = logging.getLogger("dreamjax")

MODES = ("none", "loop", "video")
PER_CELL = ("zoom", "angle", "shift", "blend")  # ride the batch axis
FRAME_CKPT = "frame.npz"
FRAMES_RECORD = "frames.json"


# ----------------------------------------------------------------------------------------------
# Config -> motion settings on the cell
# ----------------------------------------------------------------------------------------------
def settings(cfg) -> dict | None:
    """The run's motion settings, or None for a still-image run. The schema (``dreamjax.config``:
    ``motion``, ``video``, ``data.video``) checks types and choices; this adds the rules between keys."""
    c = config.validate(cfg)
    m, v, src = c.motion, c.video, c.data.video
    mode = "video" if src else m.mode
    if mode == "none":
        return None
    if len(m.shift) != 2:
        raise ConfigError("motion.shift", "must be [dx, dy] in pixels per frame", value=list(m.shift))
    out = {"mode": mode, "zoom": float(m.zoom), "angle": float(m.angle), "shift": [float(x) for x in m.shift],
           "border": m.border, "fps": float(m.fps), "gif_max_frames": int(m.gif_max_frames)}
    if mode == "loop":
        out["frames"] = int(m.frames)
        return out
    if not 0.0 <= v.blend <= 1.0:
        raise ConfigError("video.blend", "must be in [0, 1] (weight of the new source frame; 1 = every frame "
                          "dreamed alone, 0 = only the warped previous dream)", value=v.blend)
    if v.end is not None and v.end <= v.start:
        raise ConfigError("video.end", f"must be > video.start={v.start}", value=v.end)
    source = [str(x) for x in src] if isinstance(src, (list, tuple)) else str(src)
    out.update(source=source, flow=v.flow, blend=float(v.blend), start=int(v.start), end=v.end,
               every=int(v.every), fps=None if v.fps is None else float(v.fps))
    return out


def plan_inputs(m: dict) -> list[grid.PaintingInput]:
    """The videos of ``data.video`` as the cells' inputs (hashed when the cell loads them)."""
    try:
        return [grid.PaintingInput(str(p)) for p in video.find_videos(m["source"])]
    except video.VideoError as e:
        raise ConfigError(f"data.video: {e}") from None


def with_motion(cells: Sequence[grid.Cell], m: dict) -> list[grid.Cell]:
    """The cells carrying the motion settings (per-cell values and the static part)."""
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in m.items() if k != "source"))
    return [dataclasses.replace(c, motion=items) for c in cells]


def static_key(cell: grid.Cell) -> tuple:
    """The part of a cell's motion settings shared by a batch (everything but PER_CELL)."""
    return tuple((k, v) for k, v in cell.motion if k not in PER_CELL)


# ----------------------------------------------------------------------------------------------
# Inputs: a painting to loop over, or a video's frames
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
    """One input of a motion group: its frame count, bucket and output size, and its frames."""

    path: str
    sha256: str
    size: tuple[int, int]  # (w, h) of the input
    n_frames: int
    painting: Any = None  # loop: images.Painting
    info: Any = None  # video: video.VideoInfo
    indices: tuple[int, ...] = ()  # video: source frame index of each output frame
    meta: dict = dataclasses.field(default_factory=dict)  # video: the cell's motion settings
    _reader: Any = None
    _pos: int = -1
    _cache: dict = dataclasses.field(default_factory=dict)

    def frame(self, t: int) -> np.ndarray:
        """Output frame t's source pixels (video: decoded in order; loop: the painting)."""
        if self.painting is not None:
            return self.painting.pixels
        if t in self._cache:
            return self._cache[t]
        if self._reader is None or t < self._pos:
            m = self.meta
            self._reader = video.read_frames(self.path, m["start"], m["end"], m["every"])
            self._pos = -1
        while self._pos < t:
            _, px = next(self._reader)
            self._pos += 1
            self._cache[self._pos] = px
            self._cache.pop(self._pos - 3, None)
        return self._cache[t]


def load_source(cell: grid.Cell, max_pixels: int, min_size: int) -> Source | str:
    """The cell's input, or the one-line reason it cannot be used (its cells fail, the rest go on)."""
    m = dict(cell.motion)
    if m["mode"] == "loop":
        try:
            p = images.load_painting(cell.painting_path, max_pixels=max_pixels, min_size=min_size)
        except images.ImageError as e:
            log.warning("painting refused: %s", e)
            return f"ImageError: {e}"
        return Source(cell.painting_path, p.sha256, p.original_size, int(m["frames"]), painting=p)
    try:
        info = video.probe(cell.painting_path)
        n_total = video.count_frames(cell.painting_path)  # a frame size change or a broken tail fails here
        end = n_total if m["end"] is None else min(m["end"], n_total)
        idx = tuple(range(m["start"], end, m["every"]))
        if not idx:
            raise video.VideoError(cell.painting_path, f"no frames in video.start={m['start']} .. video.end={end} "
                                   f"(the video has {n_total})", "check video.start / video.end")
    except video.VideoError as e:
        log.warning("video refused: %s", e)
        return f"VideoError: {e}"
    return Source(cell.painting_path, info.sha256, info.size, len(idx), info=info, indices=idx, meta=m)


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def run_cells(ex: Executor, cells: Sequence[grid.Cell], checkpoint_root=None) -> list[dict]:
    """Still cells through the executor, moving ones through :class:`MotionRunner`."""
    still = [c for c in cells if not c.motion]
    moving = [c for c in cells if c.motion]
    records = ex.run(still, checkpoint_root=checkpoint_root) if still else []
    if moving:
        records += MotionRunner(ex).run(moving, checkpoint_root=checkpoint_root)
    return records


class MotionRunner:
    """Runs motion cells in batches of chains, using the executor's backbones and dreamers."""

    def __init__(self, ex: Executor, on_frame=None):
        """``on_frame(t, cells, states)``: called after frame t of a batch with its real cells and
        their float dreams [n, h, w, 3] (network space, bucket shape): tests and benchmarks."""
        self.ex = ex
        self.opt = ex.opt
        self.on_frame = on_frame
        self.summary: list[dict] = []
        self._start = jax.jit(self._start_frame, static_argnames=("mode", "border", "use_flow"))
        self._moved = jax.jit(lambda x, z, a, s, border: motion.affine_warp(x, motion.Affine(z, a, s), border),
                              static_argnames=("border",))

    def run(self, cells: Sequence[grid.Cell], checkpoint_root=None) -> list[dict]:
        t0 = time.perf_counter()
        records, complete = self.ex.skip_complete(cells)
        # Batches are formed from *all* cells (complete ones included, as the executor does), so a
        # rerun has exactly the batches, checkpoints and bytes of an uninterrupted run.
        todo = list(cells) if len(complete) < len(cells) else []
        sources: dict[str, Any] = {}
        keyed = []
        for c in todo:
            if c.input_error:  # found at plan time (unreadable data.paths entry)
                if c.id not in complete:
                    records[c.id] = write_failed(c, c.input_error)
                    self.ex.stats["cells_failed"] += 1
                continue
            if c.painting_path not in sources:
                sources[c.painting_path] = load_source(c, self.opt.max_pixels, get_spec(c.backbone).min_size)
            s = sources[c.painting_path]
            if isinstance(s, str):
                if c.id not in complete:
                    records[c.id] = write_failed(c, s)
                    self.ex.stats["cells_failed"] += 1
                continue
            w, h = s.size
            keyed.append((c, images.bucket_shape(h, w, c.image_size) + (s.n_frames,)))
        groups: dict[tuple, list] = {}
        for c, (bh, bw, n) in keyed:
            groups.setdefault(c.signature() + (static_key(c), (bh, bw), n), []).append(c)
        self.ex.stats["groups"] += len(groups)
        for key, group in groups.items():
            shape, n_frames = key[-2], key[-1]
            if all(c.id in complete for c in group):
                continue
            length = pad_to(min(self.opt.batch_size, len(group)), jax.local_device_count())
            try:
                dreamer = self.ex.dreamer(group[0], max(c.iterations for c in group), shape, length)
            except (ValueError, dream.DreamSettingsError) as e:
                for c in group:
                    records[c.id] = write_failed(c, f"{type(e).__name__}: {e}")
                    self.ex.stats["cells_failed"] += 1
                continue
            for batch in self.ex.pending_batches(group, complete):
                for rec in self._run_batch(dreamer, batch, sources, shape, n_frames, length, checkpoint_root,
                                           complete):
                    records[rec["id"]] = rec
        self.ex.count_programs()
        self.ex.stats["seconds"] += time.perf_counter() - t0
        self._log_summary()
        return [records[c.id] for c in cells if c.id in records]

    @functools.cached_property
    def _moved_flow(self):
        return jax.jit(motion.flow_warp)

    # --- device program: the start of a frame -------------------------------------------------
    @staticmethod
    def _start_frame(prev, source, flow, zoom, angle, shift, blend, *, mode, border, use_flow):
        if mode == "loop":
            return motion.affine_warp(prev, motion.Affine(zoom, angle, shift), border)
        return motion.video_start(source, prev, flow, blend, use_flow=use_flow, mode="edge")

    # --- one batch of chains ------------------------------------------------------------------
    def _run_batch(self, dreamer, batch, sources, shape, n_frames, length, checkpoint_root,
                   complete=frozenset()) -> list[dict]:
        bb = dreamer.backbone
        n_real = len(batch)
        padded = batch + [batch[-1]] * (length - n_real)
        m = dict(batch[0].motion)
        mode = m["mode"]
        per = {k: np.asarray([dict(c.motion).get(k, d) for c in padded], np.float32)
               for k, d in (("zoom", 1.0), ("angle", 0.0), ("shift", (0.0, 0.0)), ("blend", 1.0))}
        iterations = [c.iterations for c in batch] + [0] * (length - n_real)
        srcs = [sources[c.painting_path] for c in padded]
        flow_method = m.get("flow", "none")
        # The stability figure warps along the source flow even when the render does not, so
        # renders with and without flow are measured the same way (DIS, cheap).
        measure_flow = "dis" if mode == "video" else None
        out_sizes = [_even(images.restored_size(s.size, c.image_size)) for s, c in zip(srcs, padded)]

        ckdir = Path(checkpoint_root or Path(batch[0].job_dir).parent / ".checkpoints") / \
            f"motion-{grid.batch_id(batch)}"
        meta = {"batch_id": grid.batch_id(batch), "cells": [c.id for c in batch],
                "fingerprints": [c.fingerprint() for c in batch], "weights_id": bb.weights_id,
                "n_frames": n_frames, "shape": list(shape), "length": length}
        for c in batch:
            _clean_tmp(c.out_dir)
        start_t, prev = self._restore(ckdir, meta, batch)
        t_batch = time.perf_counter()
        compiles_before = self.ex.compiles.seconds
        bar = tqdm(total=n_frames * n_real, initial=start_t * n_real, unit="frame", disable=not self.opt.progress,
                   dynamic_ncols=True, desc=f"{n_real} {mode} chain{'s' if n_real > 1 else ''} x {n_frames} frames")
        try:
            prev_src = None
            for t in range(start_t, n_frames):
                t_frame = time.perf_counter()
                px = np.stack([images.resize_uint8(s.frame(t), shape) for s in srcs])
                source = np.asarray(bb.preprocess(px.astype(np.float32)), np.float32)
                flows = np.zeros(source.shape[:3] + (2,), np.float32)
                mflows = None
                if mode == "video" and t > 0:
                    prev_px = np.stack([images.resize_uint8(s.frame(t - 1), shape) for s in srcs]) \
                        if prev_src is None else prev_src
                    if flow_method != "none":
                        flows = _flows(srcs, px, prev_px, flow_method)
                    mflows = flows if flow_method == measure_flow else _flows(srcs, px, prev_px, measure_flow)
                prev_src = px
                if t == 0:
                    start = source
                else:
                    start = np.asarray(self._start(prev, source, flows, per["zoom"], per["angle"], per["shift"],
                                                   per["blend"], mode=mode, border=m["border"],
                                                   use_flow=flow_method != "none"))
                params = dream.CellParams.make(
                    [c.layer_weights for c in padded], [c.step_size for c in padded],
                    [c.max_loss for c in padded], [c.jitter for c in padded], iterations,
                    seed=[_frame_seed(c.key_seed(), t) for c in padded])
                run = dream.DreamRun(dreamer, start.astype(dreamer.cfg.image_dtype), params).run()
                final = np.asarray(run.final, np.float32)
                seconds = time.perf_counter() - t_frame
                self._write_frame(batch, t, final, prev, mflows, bb, out_sizes, srcs, seconds, per, m["border"],
                                  complete)
                fault_point("frame")  # tests: killed with frame t written, its checkpoint not yet
                self._save(ckdir, meta, t, final)
                if self.on_frame is not None:
                    self.on_frame(t, batch, final[:n_real])
                prev = final
                bar.update(n_real)
                if self.ex.stop_requested():
                    raise Interrupted(f"stopped after frame {t} of batch {meta['batch_id']} (saved)")
        except Interrupted:
            bar.close()
            raise
        except Exception as e:  # one bad batch (a video that breaks mid-stream) must not stop the sweep
            bar.close()
            msg = str(e).splitlines()[0] if str(e) else ""
            if not isinstance(e, video.VideoError):
                log.exception("motion batch of %d cells failed", n_real)
            todo = [c for c in batch if c.id not in complete]
            self.ex.stats["cells_failed"] += len(todo)
            return [write_failed(c, f"{type(e).__name__}: {msg}") for c in todo]
        bar.close()
        seconds = {"run": time.perf_counter() - t_batch, "compile": self.ex.compiles.seconds - compiles_before}
        recs = []
        for c, s in zip(batch, srcs):
            if c.id not in complete:
                recs.append(self._finish_cell(c, s, bb, seconds, n_frames, shape))
                fault_point("finish")  # tests: killed with some cells of the batch finished
        _rm_tree(ckdir)
        self.ex.stats["batches"] += 1
        self.ex.stats["cells_done"] += len(recs)
        self.ex.stats["frames"] = self.ex.stats.get("frames", 0) + (n_frames - start_t) * n_real
        self.ex.stats["cell_steps"] += sum(c.iterations for c in batch) * len(dreamer.plan.exponents) * \
            (n_frames - start_t)
        return recs

    # --- frame records and checkpoints -------------------------------------------------------
    def _write_frame(self, batch, t, final, prev, mflows, bb, out_sizes, srcs, seconds, per, border, complete):
        cur_px = _to_px(bb, final)
        prev_px = _to_px(bb, prev) if prev is not None else None
        if prev_px is not None and mflows is None:  # loop: the feedback transform is the motion
            n = len(prev_px)
            moved = np.asarray(self._moved(prev_px.astype(np.float32) / 255.0, per["zoom"][:n], per["angle"][:n],
                                           per["shift"][:n], border=border))
        for i, c in enumerate(batch):
            if c.id in complete:  # finished (and hashed) before a kill: left as it is
                continue
            rel = f"frames/{t:05d}.png"
            w, h = out_sizes[i]
            img = images.resize_uint8(cur_px[i], (h, w))
            images.save_png(c.out_dir / rel, img)
            entry = {"index": t, "file": rel, "sha256": files.file_sha256(c.out_dir / rel),
                     "seconds": round(seconds / len(batch), 4)}
            if srcs[i].indices:
                entry["source_index"] = srcs[i].indices[t]
            if prev_px is not None:
                a = cur_px[i:i + 1].astype(np.float32) / 255.0
                b = prev_px[i:i + 1].astype(np.float32) / 255.0
                raw = float(np.mean(np.abs(a - b)))
                if mflows is not None:
                    comp = float(np.mean(np.abs(a[0] - self._moved_flow(b, mflows[i:i + 1])[0])))
                else:
                    comp = float(np.mean(np.abs(a[0] - moved[i])))
                entry["stability"] = {"with_flow": comp, "without_flow": raw}
            rec_path = c.out_dir / FRAMES_RECORD
            rec = _read_json(rec_path) or {}
            if rec.get("fingerprint") != c.fingerprint():
                rec = {"fingerprint": c.fingerprint(), "frames": []}
            rec["frames"] = [f for f in rec["frames"] if f["index"] < t] + [entry]
            files.write_json(rec_path, rec)

    def _save(self, ckdir: Path, meta: dict, t: int, states: np.ndarray):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(states))
        data = buf.getvalue()
        body = json.dumps(meta | {"frame": t, "sha256": hashlib.sha256(data).hexdigest()}, sort_keys=True).encode()
        files.atomic_write_bytes(ckdir / FRAME_CKPT, len(body).to_bytes(8, "little") + body + data)

    def _restore(self, ckdir: Path, meta: dict, batch) -> tuple[int, np.ndarray | None]:
        """(first frame to compute, float states of the frame before it)."""
        path = ckdir / FRAME_CKPT
        if not path.is_file():
            return 0, None
        try:
            raw = path.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            saved = json.loads(raw[8:8 + n])
            data = raw[8 + n:]
            if {k: saved.get(k) for k in meta} != meta:
                raise ValueError("the checkpoint belongs to other cells or settings")
            if hashlib.sha256(data).hexdigest() != saved["sha256"]:
                raise ValueError("its arrays do not match their checksum")
            states = np.load(io.BytesIO(data))
            t = int(saved["frame"])
            for c in batch:
                rec = _read_json(c.out_dir / FRAMES_RECORD) or {}
                have = {f["index"]: f for f in rec.get("frames", [])}
                for k in range(t + 1):
                    f = have.get(k)
                    p = c.out_dir / f"frames/{k:05d}.png"
                    if f is None or not p.is_file() or files.file_sha256(p) != f["sha256"]:
                        raise ValueError(f"frame {k} of {c.id} is missing or does not match its hash")
        except (OSError, ValueError, KeyError) as e:
            log.warning("frame checkpoint %s refused (%s): the batch starts again at frame 0", path, e)
            return 0, None
        log.info("resuming %d chains at frame %d (frames 0..%d verified)", len(batch), t + 1, t)
        self.ex.stats["batches_resumed"] = self.ex.stats.get("batches_resumed", 0) + 1
        return t + 1, states

    # --- outputs at the end of a chain -------------------------------------------------------
    def _finish_cell(self, c: grid.Cell, src: Source, bb, seconds, n_frames, shape) -> dict:
        out = c.out_dir
        m = dict(c.motion)
        rec = _read_json(out / FRAMES_RECORD)
        frames_meta = rec["frames"][:n_frames]
        pngs = []
        for f in frames_meta:  # the MP4 is made from the frames on disk, checked against their hashes
            p = out / f["file"]
            if files.file_sha256(p) != f["sha256"]:
                raise RuntimeError(f"{p}: frame changed on disk since it was written")
            with images.Image.open(p) as im:
                pngs.append(np.asarray(im.convert("RGB")))
        rel = lambda p: str(Path(p).relative_to(c.job_dir))  # noqa: E731
        outputs: dict[str, Any] = {"frames": [rel(out / f["file"]) for f in frames_meta]}
        if m["mode"] == "video":
            info = src.info
            every = m["every"]
            fps = m["fps"] or float(info.fps) / every
            t0 = src.indices[0] / float(info.fps)
            t1 = (src.indices[-1] + every) / float(info.fps)
            video.write_mp4(out / "video.mp4", pngs, fps, audio_from=src.path if info.has_audio else None,
                            audio_start=t0, audio_end=t1)
        else:
            fps = m["fps"]
            video.write_mp4(out / "video.mp4", pngs, fps)
        outputs["video"] = rel(out / "video.mp4")
        if m["gif_max_frames"] and n_frames <= m["gif_max_frames"]:
            outputs["gif"] = rel(images.save_gif(out / "frames.gif", pngs, duration_ms=int(round(1000 / fps)),
                                                 max_side=self.opt.gif_max_side))
        stab = [f.get("stability") for f in frames_meta if f.get("stability")]
        stability = None
        if stab:
            stability = {"with_flow": float(np.mean([s["with_flow"] for s in stab])),
                         "without_flow": float(np.mean([s["without_flow"] for s in stab]))}
            fig = plot_stability(out / "stability.png", stab, c.id, flow=m.get("flow"))
            if fig:
                outputs["stability"] = rel(fig)
        outputs["dream"] = rel(out / frames_meta[-1]["file"])
        outputs["frames_record"] = rel(out / FRAMES_RECORD)
        files.write_json(out / "cell_config.json", _record_base(c))
        outputs["config"] = rel(out / "cell_config.json")
        hashed = [outputs["video"], outputs["frames_record"], outputs["config"]] + outputs["frames"] + \
            [outputs[k] for k in ("gif", "stability") if k in outputs]
        record = _record_base(c) | {
            "status": "done", "error": None, "outputs": outputs,
            "hashes": {r: files.file_sha256(Path(c.job_dir) / r) for r in hashed},
            "motion": {k: list(v) if isinstance(v, tuple) else v for k, v in c.motion},
            "frames": n_frames, "fps": fps, "stability": stability,
            "frame_seconds": float(sum(f.get("seconds", 0.0) for f in frames_meta)),
            "painting_sha256": src.sha256, "painting_size": list(src.size), "painting_notes": [],
            "weights_id": bb.weights_id, "bucket": list(shape), "seconds": seconds,
            "final_losses": {}, "final_loss": None,
        }
        if src.info is not None:
            record["source"] = {"fps": float(src.info.fps), "frames": src.info.frames, "codec": src.info.codec,
                                "audio": src.info.has_audio, "indices": [src.indices[0], src.indices[-1]]}
        files.write_json(out / CELL_RECORD, record)
        self.summary.append({"id": c.id, "frames": n_frames, "seconds": record["frame_seconds"],
                             "stability": stability})
        return record

    def _log_summary(self):
        if not self.summary:
            return
        lines = [f"{'cell':<40} {'frames':>6} {'seconds':>8} {'fps':>6} {'instab. flow/raw':>18}"]
        for s in self.summary:
            st = s["stability"]
            stxt = f"{st['with_flow']:.4f}/{st['without_flow']:.4f}" if st else "-"
            fps = s["frames"] / s["seconds"] if s["seconds"] else 0.0
            lines.append(f"{s['id'][-40:]:<40} {s['frames']:>6} {s['seconds']:>8.1f} {fps:>6.2f} {stxt:>18}")
        log.info("motion chains:\n%s", "\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _flows(srcs, px, prev_px, method) -> np.ndarray:
    """Optical flow per cell, computed once per source (four weight sets on one video: one flow)."""
    done: dict[int, np.ndarray] = {}
    out = []
    for s, a, b in zip(srcs, px, prev_px):
        if id(s) not in done:
            done[id(s)] = video.optical_flow(a, b, method)
        out.append(done[id(s)])
    return np.stack(out)


def _frame_seed(seed: int, t: int) -> int:
    """Each frame draws its own jitter from the cell's key (the same on a rerun)."""
    return int.from_bytes(hashlib.sha256(f"{seed}|frame{t}".encode()).digest()[:4], "little")


def _even(wh):
    w, h = wh
    eh, ew = video.even_size(h, w)
    return ew, eh


def _to_px(bb, x):
    return images.to_uint8(np.asarray(bb.deprocess(np.asarray(x))))


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _clean_tmp(folder: Path):
    """Temp files a SIGKILL left behind (``.<name>.<random>.tmp`` of the atomic writer)."""
    for d in (folder, folder / "frames"):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def _rm_tree(folder: Path):
    if folder.is_dir():
        for p in sorted(folder.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        folder.rmdir()


def plot_stability(path: Path, stab: list[dict], title: str, flow: str | None = None) -> Path | None:
    """Per-frame mean |frame_t - warp(frame_{t-1})| with and without the flow warp (matplotlib,
    optional: no figure without it)."""
    try:  # lazy: optional dependency (the report extra)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: with matplotlib above
    except ImportError:
        return None
    t = np.arange(1, len(stab) + 1)
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=100)
    ax.plot(t, [s["with_flow"] for s in stab], marker="o", ms=3, label="warped along the flow")
    ax.plot(t, [s["without_flow"] for s in stab], marker="s", ms=3, label="not warped")
    ax.set_xlabel("frame")
    ax.set_ylabel("mean |f_t - warp(f_t-1)|")
    ax.set_title(f"{title} (render flow: {flow or 'loop'})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return files.atomic_write_bytes(path, buf.getvalue())
