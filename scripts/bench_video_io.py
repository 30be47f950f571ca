"""Decode / encode speed at 1080p and install size: PyAV vs imageio-ffmpeg (why video.py uses PyAV).

    PYTHONPATH=. python scripts/bench_video_io.py [--frames 30] [--out results/bench/video_io.json]

About 2 minutes on 2 CPU cores. Both encoders run libx264 at the settings video.write_mp4 uses
(crf 18, preset medium, yuv420p); decode is to uint8 RGB arrays.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dreamjax import files
from dreamjax.outputs import video


def _dist_mb(name: str) -> float:
    dist = md.distribution(name)
    total = 0
    for f in dist.files or []:
        p = Path(dist.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
    return round(total / 2**20, 1)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--out", default="results/bench/video_io.json")
    a = ap.parse_args(argv)
    import imageio_ffmpeg  # lazy: the alternative measured here, not a dreamjax dependency

    n, h, w = a.frames, 1080, 1920
    frames = video.synthetic_frames(n, h, w, speed=12, square=400)
    tmp = Path(tempfile.mkdtemp())
    src = video.write_synthetic_video(tmp / "src.mp4", frames=frames, fps=30, tone_hz=None)
    res = {"frames": n, "size": f"{w}x{h}", "load_before": os.getloadavg(), "cpus": os.cpu_count()}

    t = time.perf_counter()
    dec = video.decode_all(src)
    res["pyav_decode_fps"] = n / (time.perf_counter() - t)
    assert len(dec) == n

    t = time.perf_counter()
    got = 0
    gen = imageio_ffmpeg.read_frames(str(src))
    meta = next(gen)
    for raw in gen:
        np.frombuffer(raw, np.uint8).reshape(meta["size"][1], meta["size"][0], 3)
        got += 1
    res["imageio_ffmpeg_decode_fps"] = n / (time.perf_counter() - t)
    assert got == n

    t = time.perf_counter()
    video.write_mp4(tmp / "pyav.mp4", dec, 30)
    res["pyav_encode_fps"] = n / (time.perf_counter() - t)

    t = time.perf_counter()
    wr = imageio_ffmpeg.write_frames(str(tmp / "iio.mp4"), (w, h), fps=30, codec="libx264", pix_fmt_out="yuv420p",
                                     output_params=["-crf", "18", "-preset", "medium"], macro_block_size=2)
    wr.send(None)
    for f in dec:
        wr.send(np.ascontiguousarray(f))
    wr.close()
    res["imageio_ffmpeg_encode_fps"] = n / (time.perf_counter() - t)
    res["install_mb"] = {"av": _dist_mb("av"), "imageio-ffmpeg": _dist_mb("imageio-ffmpeg"),
                         "imageio": _dist_mb("imageio"), "opencv-python-headless": _dist_mb("opencv-python-headless")}
    res["load_after"] = os.getloadavg()
    res = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}
    files.write_json(a.out, res)
    print(res)


if __name__ == "__main__":
    main()
