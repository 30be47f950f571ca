"""Benchmarks of moving dreams (the CLI is scripts/bench_motion.py).

* Zoom loop frames per second (:func:`zoom_fps`): the real :class:`~dreamjax.sweep.motion.MotionRunner`
  (per frame: the affine start, the dream, the PNG, the frame record, the frame checkpoint), four
  chains (the four offline weight sets) either batched in one program or one chain at a time. The
  first frame of every batch (compilation, warm-up) is left out; cell-frames/s over the rest.
* Video overhead (:func:`video_overhead`): per frame at a size, the time to decode a source frame
  (PyAV), compute its optical flow (OpenCV DIS and Farneback) and encode it into the MP4 (x264 +
  AAC), as a share of one cell's dream frame at that size.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import dreamjax as dj
from dreamjax import files
from dreamjax.outputs import video
from dreamjax.sweep import executor, jobs
from dreamjax.sweep import motion as msweep

SETS = ["lite_set1", "lite_set2", "lite_set3", "lite_set4"]


def _cfg(overrides):
    from hydra import compose, initialize_config_dir  # lazy: only the benchmark composes configs

    with initialize_config_dir(dj.config_dir(), version_base="1.3"):
        return jobs._plain(compose("config", overrides=list(overrides)))


def zoom_fps(size: int, *, batched: bool, chains: int = 4, frames: int = 4, iterations: int = 5,
             painting: str = "bundled/hokusai_great_wave.jpg", workdir: Path | None = None) -> dict:
    """Cell-frames per second of the zoom loop at ``size`` px (EfficientNet-Lite0, 1 octave,
    ``iterations`` steps a frame)."""
    cfg = _cfg(["+experiment=zoom", f"data.image_size={size}", f"data.paths=[{painting}]",
                f"dream.iterations={iterations}", "dream.num_octaves=1", f"motion.frames={frames}",
                f"layer_sets=[{','.join(SETS[:chains])}]", "analyze=false"])
    work = Path(workdir or tempfile.mkdtemp()) / f"zoom_{size}_{'batched' if batched else 'alone'}"
    cells = jobs.plan(cfg, job=0, job_dir=work)
    stamps: dict[tuple, list[float]] = {}

    def on_frame(t, batch, states):
        stamps.setdefault(tuple(c.id for c in batch), []).append(time.perf_counter())

    ex = executor.Executor(executor.RunOptions(batch_size=chains if batched else 1, progress=False))
    t0 = time.perf_counter()
    recs = msweep.MotionRunner(ex, on_frame=on_frame).run(cells, checkpoint_root=work / ".checkpoints")
    wall = time.perf_counter() - t0
    assert all(r["status"] == "done" for r in recs), [r.get("error") for r in recs]
    steady_frames = sum((len(s) - 1) * len(k) for k, s in stamps.items())
    steady_seconds = sum(s[-1] - s[0] for s in stamps.values())
    return {"size": size, "mode": "batched" if batched else "one_at_a_time", "chains": chains, "frames": frames,
            "iterations_per_frame": iterations, "bucket": recs[0]["bucket"],
            "cell_frames_per_s": steady_frames / steady_seconds,
            "seconds_per_cell_frame": steady_seconds / steady_frames,
            "wall_s_including_compile": wall, "compile_s": ex.compiles.seconds}


def video_overhead(size: int, dream_seconds_per_frame: float, frames: int = 12) -> dict:
    """Decode + flow + encode per frame at ``size`` (long side, 4:3) vs one dream frame."""
    h, w = video.even_size(size * 3 // 4, size)
    tmp = Path(tempfile.mkdtemp())
    src = video.write_synthetic_video(tmp / "src.mp4", frames, h, w, fps=12)
    t = time.perf_counter()
    decoded = video.decode_all(src)
    decode = (time.perf_counter() - t) / frames
    flows = {}
    for method in ("dis", "farneback"):
        t = time.perf_counter()
        for a, b in zip(decoded[1:], decoded[:-1]):
            video.optical_flow(a, b, method)
        flows[method] = (time.perf_counter() - t) / (frames - 1)
    t = time.perf_counter()
    video.write_mp4(tmp / "out.mp4", decoded, 12, audio_from=src)
    encode = (time.perf_counter() - t) / frames
    dis_total = decode + flows["dis"] + encode
    return {"size": f"{w}x{h}", "frames": frames, "decode_s": decode, "flow_dis_s": flows["dis"],
            "flow_farneback_s": flows["farneback"], "encode_s": encode,
            "dream_frame_s": dream_seconds_per_frame,
            "overhead_dis_share": dis_total / dream_seconds_per_frame,
            "overhead_farneback_share": (decode + flows["farneback"] + encode) / dream_seconds_per_frame}


def run(sizes=(256, 512), frames: int = 4, iterations: int = 5) -> dict:
    res = {"load_before": os.getloadavg(), "cpus": os.cpu_count(), "zoom": [], "video": []}
    for size in sizes:
        for batched in (True, False):  # interleaved per size, so load drifts hit both alike
            res["zoom"].append(zoom_fps(size, batched=batched, frames=frames, iterations=iterations))
    for size in sizes:
        alone = next(z for z in res["zoom"] if z["size"] == size and z["mode"] == "one_at_a_time")
        res["video"].append(video_overhead(size, alone["seconds_per_cell_frame"]))
    res["load_after"] = os.getloadavg()
    return res


def format_table(res: dict) -> str:
    lines = ["| size | mode | cell-frames/s | s / cell-frame | batched speed-up |", "|---|---|---|---|---|"]
    by = {(z["size"], z["mode"]): z for z in res["zoom"]}
    for z in res["zoom"]:
        alone = by.get((z["size"], "one_at_a_time"))
        up = z["cell_frames_per_s"] / alone["cell_frames_per_s"] if alone else float("nan")
        lines.append(f"| {z['size']} | {z['mode']} | {z['cell_frames_per_s']:.2f} "
                     f"| {z['seconds_per_cell_frame']:.3f} | {up:.2f}x |")
    lines += ["", "| size | decode | flow DIS | flow Farneback | encode | dream frame | overhead (DIS) | (Farneback) |",
              "|---|---|---|---|---|---|---|---|"]
    for v in res["video"]:
        lines.append(f"| {v['size']} | {v['decode_s'] * 1e3:.1f} ms | {v['flow_dis_s'] * 1e3:.1f} ms | "
                     f"{v['flow_farneback_s'] * 1e3:.1f} ms | {v['encode_s'] * 1e3:.1f} ms | "
                     f"{v['dream_frame_s']:.3f} s | "
                     f"{v['overhead_dis_share']:.1%} | {v['overhead_farneback_share']:.1%} |")
    lines.append(f"\nload average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f} "
                 f"({res['cpus']} CPUs)")
    return "\n".join(lines)


def write(res: dict, json_path: str, table_path: str | None = None):
    files.write_json(json_path, res)
    if table_path:
        files.atomic_write_text(table_path, format_table(res) + "\n")
    return json_path
