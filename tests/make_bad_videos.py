"""Bad video inputs for the tests, made with PyAV from the synthetic test video (no files shipped).

Each returns a path: a truncated MP4, a zero-length file, an audio-only file, a video whose codec
FFmpeg does not know, a stream whose frame size changes mid-stream, and an image named as a video.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dreamjax.outputs import video


def truncated(d: Path) -> Path:
    good = video.write_synthetic_video(d / "_full.mp4", 12)
    data = good.read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) * 6 // 10])
    good.unlink()
    return d / "truncated.mp4"


def zero_length(d: Path) -> Path:
    (d / "empty.mp4").write_bytes(b"")
    return d / "empty.mp4"


def audio_only(d: Path) -> Path:
    import av

    p = d / "audio_only.m4a"
    with av.open(str(p), "w", format="mp4") as out:
        a = out.add_stream("aac", rate=16000)
        a.layout = "mono"
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
        for s0 in range(0, 16000, 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[None, s0:s0 + 1024]), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, s0
            for pkt in a.encode(f):
                out.mux(pkt)
        for pkt in a.encode(None):
            out.mux(pkt)
    return p


def unknown_codec(d: Path) -> Path:
    """A valid MP4 whose sample entry names a codec no decoder knows (fourcc 'avc1' -> 'zzzz')."""
    good = video.write_synthetic_video(d / "_ok.mp4", 6, tone_hz=None)
    data = good.read_bytes()
    assert data.count(b"avc1") >= 1
    (d / "unknown_codec.mp4").write_bytes(data.replace(b"avc1", b"zzzz"))
    good.unlink()
    return d / "unknown_codec.mp4"


def size_change(d: Path) -> Path:
    """Two MPEG-TS streams of different sizes, concatenated (a broadcast-style resolution change)."""
    a = video.write_synthetic_video(d / "_a.ts", 6, 96, 128, tone_hz=None)
    b = video.write_synthetic_video(d / "_b.ts", 6, 72, 96, tone_hz=None, seed=1)
    (d / "size_change.ts").write_bytes(a.read_bytes() + b.read_bytes())
    a.unlink()
    b.unlink()
    return d / "size_change.ts"


def image_as_video(d: Path) -> Path:
    p = d / "still.mp4"  # a JPEG with a video's name
    Image.fromarray(video.synthetic_frames(1)[0]).save(p, format="JPEG")
    return p


ALL = {"truncated": truncated, "zero_length": zero_length, "audio_only": audio_only,
       "unknown_codec": unknown_codec, "size_change": size_change, "image_as_video": image_as_video}
