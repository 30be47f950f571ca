"""Videos in and out: decode frames, carry the audio, encode MP4 (H.264, yuv420p), optical flow.

Decode and encode go through PyAV (FFmpeg's libraries in-process, ``pip install av``); optical
flow through OpenCV (``opencv-python-headless``: Farneback and DIS). Why these two and not
``imageio-ffmpeg`` (an ffmpeg binary driven through a pipe), measured in
``results/bench/video_io.json`` (``scripts/bench_video_io.py``): PyAV decodes and encodes 1080p
at least as fast, in-process; it reports *which* frame changed size or failed to decode, sees
whether a file has a video and an audio stream, and remuxes the audio track into the output
without a second ffmpeg command line.

Both are optional dependencies (``pip install 'dreamjax[video]'``): imported inside the
functions that need them, with an error that says how to install them; a still-image sweep never
loads them. Nothing here imports JAX.

Every message about a bad input is one line: the file, what is wrong, what to do
(:class:`VideoError`). Every output goes through :mod:`dreamjax.files`' atomic writer.
"""
from __future__ import annotations

import dataclasses
import fractions
import os
import re
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from dreamjax import files

PathLike = Union[str, os.PathLike]

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mpg", ".mpeg", ".wmv", ".flv",
                    ".gif_video")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
FLOWS = ("none", "farneback", "dis")
_REENCODE = "re-encode it, e.g. ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4"


class VideoError(ValueError):
    """A video that cannot be used; the message is one line: file, reason, what to do."""

    def __init__(self, path: PathLike, reason: str, fix: str = ""):
        msg = f"{os.fspath(path)}: {reason}" + (f"; {fix}" if fix else "")
        super().__init__(" ".join(msg.split()))
        self.path = os.fspath(path)
        self.reason = reason


def _av():
    try:  # lazy: optional dependency (the video extra), only video runs need it
        import av
    except ImportError:  # pragma: no cover - depends on the install
        raise VideoError("video", "PyAV is not installed", "pip install 'dreamjax[video]' (or pip install av)") \
            from None
    av.logging.set_level(av.logging.PANIC)  # its messages are turned into VideoError lines here
    return av


def _cv2():
    try:  # lazy: optional dependency (the video extra), only flow-warped videos need it
        import cv2
    except ImportError:  # pragma: no cover - depends on the install
        raise VideoError("video.flow", "OpenCV is not installed",
                         "pip install 'dreamjax[video]' (or pip install opencv-python-headless), "
                         "or set video.flow=none") from None
    return cv2


# ---------------------------------------------------------------------------------------------
# Probe and decode
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    fps: fractions.Fraction
    frames: int  # as the container says (0 = unknown)
    codec: str
    has_audio: bool
    sha256: str

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def find_videos(spec: PathLike | Sequence[PathLike]) -> list[Path]:
    """A video file, a folder of videos (non-recursive, by extension), or a list of those."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: dict[str, Path] = {}
    for item in items:
        p = Path(os.path.expanduser(os.fspath(item)))
        if p.is_dir():
            matches = sorted(c for c in p.iterdir() if c.is_file() and not c.name.startswith(".")
                             and c.suffix.lower() in VIDEO_EXTENSIONS)
            if not matches:
                raise VideoError(p, "folder has no videos", f"put files ending in {' '.join(VIDEO_EXTENSIONS[:7])} "
                                 "there or name one video in data.video")
        elif p.is_file():
            matches = [p]
        else:
            raise VideoError(p, "no such file or folder", "check data.video")
        for m in matches:
            found.setdefault(str(m.resolve()), m.resolve())
    return sorted(found.values(), key=str)


def _looks_like_image(path: Path, head: bytes) -> bool:
    magic = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
    return head.startswith(magic) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or \
        path.suffix.lower() in IMAGE_EXTENSIONS


def probe(path: PathLike) -> VideoInfo:
    """Open a video and check it has a decodable video stream; raises :class:`VideoError`."""
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "file not found", "check data.video")
    size = path.stat().st_size
    if size == 0:
        raise VideoError(path, "zero-length file", "re-export or re-download the video")
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_image(path, head):
        raise VideoError(path, "is an image, not a video", "pass images as data.paths=PATH (a painting), "
                         "or use +experiment=zoom to animate it")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoError(path, f"not a readable video container ({_why(e)}), perhaps truncated",
                         "re-export or re-download the video") from None
    try:
        streams = container.streams.video
        if not streams:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
            raise VideoError(path, f"has no video stream (it holds {kinds})",
                             "pass a file with a video track; audio alone cannot be dreamed")
        vs = streams[0]
        ctx = vs.codec_context
        codec = getattr(getattr(ctx, "codec", None), "name", None) if ctx is not None else None
        if ctx is None or not codec or not ctx.width or not ctx.height:
            tag = getattr(vs, "codec_tag", "") or ""
            raise VideoError(path, f"its video codec {tag + ' ' if tag else ''}has no decoder in this FFmpeg build "
                             "(unsupported codec)", _REENCODE)
        fps = vs.average_rate or vs.base_rate or fractions.Fraction(25)
        info = VideoInfo(str(path), int(ctx.width), int(ctx.height), fractions.Fraction(fps), int(vs.frames or 0),
                         codec, bool(container.streams.audio), files.file_sha256(path))
    finally:
        container.close()
    return info


def _why(e: Exception) -> str:
    s = str(e).splitlines()[0] if str(e) else type(e).__name__
    s = re.sub(r"^\[Errno -?\d+\]\s*", "", s)
    return s.split(": '")[0]  # PyAV appends the file name, which the message already starts with


def read_frames(path: PathLike, start: int = 0, end: int | None = None, every: int = 1, *, convert: bool = True
                ) -> Iterator[tuple[int, np.ndarray | None]]:
    """Decoded frames ``start <= i < end`` (every k-th) as (index, uint8 H×W×3 RGB); with
    ``convert=False`` the pixels are None (a checking pass: :func:`count_frames`).

    Raises :class:`VideoError` on a decode error, a frame whose size differs from the first
    one, or a stream that ends before its first requested frame (or, reading to the end, well
    before the length its header claims: a truncated file).
    """
    av = _av()
    if every < 1 or start < 0 or (end is not None and end <= start):
        raise VideoError(path, f"bad frame range start={start} end={end} every={every}",
                         "use 0 <= video.start < video.end and video.every >= 1")
    info = probe(path)
    first_size = None
    n = -1
    got = 0
    container = av.open(str(path))
    try:
        vs = container.streams.video[0]
        vs.thread_type = "AUTO"
        try:
            for frame in container.decode(vs):
                n += 1
                if end is not None and n >= end:
                    break
                if first_size is None:
                    first_size = (frame.width, frame.height)
                elif (frame.width, frame.height) != first_size:
                    raise VideoError(path, f"frame {n} is {frame.width}x{frame.height} but the frames before it are "
                                     f"{first_size[0]}x{first_size[1]} (size changes mid-stream)",
                                     f"re-encode it at one size, e.g. ffmpeg -i IN -vf scale={first_size[0]}:"
                                     f"{first_size[1]} -c:v libx264 -pix_fmt yuv420p OUT.mp4")
                if n < start or (n - start) % every:
                    continue
                got += 1
                yield n, frame.to_ndarray(format="rgb24") if convert else None
        except av.FFmpegError as e:
            raise VideoError(path, f"decoding failed at frame {n + 1} ({_why(e)}), perhaps truncated",
                             "re-export or re-download the video") from None
    finally:
        container.close()
    if got == 0:
        raise VideoError(path, f"no frames in the range start={start} end={end} (the stream has {n + 1} frames)"
                         if n >= 0 else "no video frames decode (truncated or empty stream)",
                         "check video.start / video.end" if n >= 0 else "re-export or re-download the video")
    if end is None and info.frames and n + 1 < 0.9 * info.frames:
        raise VideoError(path, f"only {n + 1} of the {info.frames} frames its header lists decode (truncated)",
                         "re-export or re-download the video, or set video.end to use the frames that decode")


# ---------------------------------------------------------------------------------------------
# Encode
# ---------------------------------------------------------------------------------------------
def even_size(h: int, w: int) -> tuple[int, int]:
    """H.264 in yuv420p needs even sides."""
    return max(2, h - h % 2), max(2, w - w % 2)


def write_mp4(path: PathLike, frames: Sequence[np.ndarray], fps: float | fractions.Fraction, *,
              audio_from: PathLike | None = None, audio_start: float = 0.0, audio_end: float | None = None,
              crf: int = 18, preset: str = "medium") -> Path:
    """H.264 (yuv420p, so browsers play it) MP4 of uint8 H×W×3 frames, written atomically.

    ``audio_from``: a source whose first audio track, between ``audio_start`` and ``audio_end``
    seconds, is re-encoded as AAC into the output (nothing when it has none). x264 is
    deterministic at a fixed setting, so the same frames give the same file.
    """
    av = _av()
    frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
    if not frames:
        raise ValueError(f"write_mp4({os.fspath(path)!r}) got no frames")
    h, w = frames[0].shape[:2]
    if (h, w) != even_size(h, w):
        raise ValueError(f"write_mp4 needs even frame sides for yuv420p, got {w}x{h} (use even_size)")
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with files.atomic_open(path, "wb") as f:
        out = av.open(f, "w", format="mp4")
        try:
            vs = out.add_stream("libx264", rate=rate)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            vs.options = {"crf": str(crf), "preset": preset}
            audio = _open_audio(av, audio_from, out) if audio_from else None
            _encode_frames(av, out, vs, frames)
            if audio is not None:
                end = audio_end if audio_end is not None else audio_start + len(frames) / float(rate)
                _copy_audio(av, audio, out, audio_start, end)
        finally:
            out.close()
    return Path(path)


def _encode_frames(av, out, vs, frames) -> None:
    """Encode RGB ``frames`` into video stream ``vs`` of container ``out`` (pts = frame index), then flush."""
    for i, px in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(px), format="rgb24")
        vf.pts = i
        for pkt in vs.encode(vf):
            out.mux(pkt)
    for pkt in vs.encode():
        out.mux(pkt)


def _open_audio(av, source, out):
    src = av.open(str(source))
    if not src.streams.audio:
        src.close()
        return None
    a = src.streams.audio[0]
    rate = a.codec_context.sample_rate or 48000
    layout = a.codec_context.layout.name if a.codec_context.layout else "stereo"
    os_ = out.add_stream("aac", rate=rate)
    os_.layout = layout
    return src, a, os_, av.AudioResampler(format="fltp", layout=layout, rate=rate)


def _copy_audio(av, audio, out, t0: float, t1: float):
    src, a, os_, resampler = audio
    rate = os_.codec_context.sample_rate
    first, last = int(round(t0 * rate)), int(round(t1 * rate))
    pts = 0
    try:
        for frame in src.decode(a):
            for rf in resampler.resample(frame):
                arr = rf.to_ndarray()  # [channels, samples]
                s0 = pts
                pts += arr.shape[1]
                lo, hi = max(first, s0), min(last, pts)
                if hi <= lo:
                    continue
                piece = np.ascontiguousarray(arr[:, lo - s0:hi - s0])
                nf = av.AudioFrame.from_ndarray(piece, format="fltp", layout=rf.layout.name)
                nf.sample_rate, nf.pts = rate, lo - first
                for pkt in os_.encode(nf):
                    out.mux(pkt)
            if pts >= last:
                break
    except av.FFmpegError:
        pass  # a damaged audio tail: keep what decoded; the video is what is dreamed
    for pkt in os_.encode(None):
        out.mux(pkt)
    src.close()


def count_frames(path: PathLike) -> int:
    """Decode the whole video once (no pixel conversion): its true frame count, after checking
    that every frame decodes at one size. Raises :class:`VideoError` before any dreaming."""
    return sum(1 for _ in read_frames(path, convert=False))


def decode_all(path: PathLike) -> list[np.ndarray]:
    """Every frame of a video as uint8 RGB (tests, benchmarks)."""
    return [px for _, px in read_frames(path)]


def audio_info(path: PathLike) -> dict | None:
    """{"codec", "rate", "channels", "seconds"} of the first audio track, None without one."""
    av = _av()
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return None
        a = c.streams.audio[0]
        samples = sum(fr.samples for fr in c.decode(a))
        rate = a.codec_context.sample_rate
        return {"codec": a.codec_context.name, "rate": rate, "channels": a.codec_context.channels,
                "seconds": samples / rate if rate else 0.0}


# ---------------------------------------------------------------------------------------------
# Optical flow
# ---------------------------------------------------------------------------------------------
def optical_flow(frame: np.ndarray, prev: np.ndarray, method: str = "dis") -> np.ndarray:
    """Dense flow from ``frame`` (t) to ``prev`` (t-1), float32 H×W×2 (dx, dy): pixel (y, x) of
    frame t was at (y + dy, x + dx) in frame t-1, so warping the dream of t-1 along it
    (:func:`dreamjax.engine.motion.flow_warp`) aligns it with frame t.

    "farneback": OpenCV's Farneback (the flow DeepDreamVideo forks use); "dis": OpenCV's DIS
    (medium preset), faster at the same quality on video; "none": zeros.
    """
    if method not in FLOWS:
        raise ValueError(f"video.flow={method!r} is not allowed; choose one of: {', '.join(FLOWS)}")
    h, w = frame.shape[:2]
    if method == "none":
        return np.zeros((h, w, 2), np.float32)
    cv2 = _cv2()
    a = cv2.cvtColor(np.ascontiguousarray(frame, np.uint8), cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(np.ascontiguousarray(prev, np.uint8), cv2.COLOR_RGB2GRAY)
    if method == "farneback":
        flow = cv2.calcOpticalFlowFarneback(a, b, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3,
                                            poly_n=5, poly_sigma=1.2, flags=0)
    else:
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        flow = dis.calc(a, b, None)
    return np.asarray(flow, np.float32)


# ---------------------------------------------------------------------------------------------
# Synthetic test video: a textured square moving over a textured background, with a sine tone
# ---------------------------------------------------------------------------------------------
def synthetic_frames(n: int, height: int = 96, width: int = 128, *, seed: int = 0, speed: int = 3,
                     square: int | None = None) -> list[np.ndarray]:
    """``n`` uint8 frames: a textured square moving right and down over a still background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    bg = np.stack([128 + 60 * np.sin(xx / 7.0), 128 + 60 * np.cos(yy / 9.0), 128 + 40 * np.sin((xx + yy) / 11.0)],
                  -1)
    s = square or max(8, min(height, width) // 3)
    tex = rng.integers(0, 256, (s // 4 + 1, s // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:s, :s]
    frames = []
    for t in range(n):
        f = bg.copy()
        y0 = (8 + t * speed // 2) % max(1, height - s)
        x0 = (8 + t * speed) % max(1, width - s)
        f[y0:y0 + s, x0:x0 + s] = tex
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return frames


def write_synthetic_video(path: PathLike, n: int = 12, height: int = 96, width: int = 128, *, fps: int = 12,
                          tone_hz: float | None = 440.0, codec: str = "libx264", frames=None, seed: int = 0) -> Path:
    """A test video (tests, benchmarks, demos): :func:`synthetic_frames` (or ``frames``) and, unless
    ``tone_hz`` is None, a mono sine tone as AAC audio. ``codec="ffv1"`` (in .mkv) is lossless,
    so decoding gives back exactly ``frames``."""
    av = _av()
    frames = synthetic_frames(n, height, width, seed=seed) if frames is None else frames
    h, w = frames[0].shape[:2]
    fmt = {".mkv": "matroska", ".ts": "mpegts", ".mov": "mov"}.get(Path(path).suffix.lower(), "mp4")
    with files.atomic_open(path, "wb") as f:
        out = av.open(f, "w", format=fmt)
        try:
            vs = out.add_stream(codec, rate=fps)
            vs.width, vs.height = w, h
            vs.pix_fmt = "yuv420p" if codec == "libx264" else "bgr0" if codec == "ffv1" else "yuv420p"
            if codec == "libx264":
                vs.options = {"crf": "10", "preset": "veryfast"}
            a = None
            if tone_hz is not None:
                a = out.add_stream("aac", rate=16000)
                a.layout = "mono"
            _encode_frames(av, out, vs, frames)
            if a is not None:
                total = int(16000 * len(frames) / fps)
                t = np.arange(total) / 16000.0
                tone = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
                for s0 in range(0, total, 1024):
                    chunk = tone[None, s0:s0 + 1024]
                    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                    af.sample_rate, af.pts = 16000, s0
                    for pkt in a.encode(af):
                        out.mux(pkt)
                for pkt in a.encode(None):
                    out.mux(pkt)
        finally:
            out.close()
    return Path(path)
