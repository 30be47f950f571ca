"""Paintings in, pixels out: decode, validate, orient, bucket, resize and write images.

Pure numpy + Pillow. This module never imports JAX (DESIGN: ``images.py`` never
touches JAX tracing), so it is safe to use from writer threads, the grid builder
and the report without pulling in a device.

Three jobs:

* :func:`load_painting` turns any file a user drops in a folder into a uint8
  H×W×3 RGB array, or refuses it with a one-line :class:`ImageError` naming the
  file and what to do. Everything it had to change on the way (CMYK, 16-bit,
  alpha, EXIF rotation, animation, upscaling) is recorded in ``Painting.notes``
  so the manifest says what was actually dreamed.
* :func:`bucket_shape` maps every aspect ratio to a handful of shapes so a whole
  collection compiles to a few programs; :func:`restore_aspect` puts the dream
  back to the painting's own aspect.
* Image writers (PNG, JPEG, GIF) through :mod:`dreamjax.files`' atomic writer: a killed
  run never leaves a half-written image under its final name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob as _glob
import hashlib
import io
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from dreamjax.files import atomic_write_bytes

__all__ = [
    "ImageError", "Painting", "load_painting", "find_paintings", "PAINTING_EXTENSIONS",
    "DEFAULT_RATIOS", "bucket_shape", "resize_uint8", "resize_float", "restore_aspect",
    "restored_size", "squeeze_note", "to_uint8", "save_png", "save_jpeg", "save_gif",
]

PathLike = Union[str, os.PathLike]

PAINTING_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """A painting that cannot be used; the message is one line: file, reason, what to do."""

    def __init__(self, path: PathLike, reason: str, fix: str = ""):
        msg = f"{os.fspath(path)}: {reason}" + (f"; {fix}" if fix else "")
        super().__init__(" ".join(msg.split()))  # one line, whatever the reason contained
        self.path = os.fspath(path)
        self.reason = reason


@dataclasses.dataclass(frozen=True, eq=False)
class Painting:
    """A decoded painting. ``pixels`` is read-only uint8 H×W×3 RGB."""

    pixels: np.ndarray
    path: Path
    name: str  # file stem
    sha256: str  # of the file bytes
    original_size: tuple[int, int]  # (w, h) as stored, after EXIF rotation, before any upscaling
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> tuple[int, int]:
        """(w, h) of ``pixels``."""
        return (int(self.pixels.shape[1]), int(self.pixels.shape[0]))


# ---------------------------------------------------------------------------------------------
# Loading

_TRUNCATED_LOCK = threading.Lock()
_PILLOW_LIMIT_LOCK = threading.Lock()
# Pillow refuses, on its own, any image above 2 * Image.MAX_IMAGE_PIXELS (~179 M pixels) whatever
# max_pixels says. dreamjax's check (the header's size, before any pixel is decoded) is the one
# that governs: Pillow's limit is lifted to max_pixels while a painting is opened and decoded,
# so raising data.max_pixels really admits a larger painting.
_BOMB_FIX = ("downscale the image, or raise data.max_pixels above its pixel count (dreamjax lifts Pillow's own "
             "limit to match)")


@contextlib.contextmanager
def _pillow_limit(max_pixels: int):
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None and max_pixels > saved:
            Image.MAX_IMAGE_PIXELS = int(max_pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved
_FIX_REEXPORT = "re-download it or re-export it as PNG/JPEG"


def load_painting(
    path: PathLike,
    *,
    max_pixels: int = 64_000_000,
    min_size: int | None = None,
    upscale_small: bool = True,
) -> Painting:
    """Decode ``path`` into a :class:`Painting` (uint8 RGB) or raise :class:`ImageError`.

    * Refused (ImageError): missing, zero-byte, non-image, truncated/corrupt files
      (never returned half grey), and decompression bombs: more than ``max_pixels``
      pixels according to the header, checked *before* any pixel is decoded.
    * Converted, with a note: CMYK, 16-bit (scaled, not clipped), grayscale,
      palette, alpha/transparency (composited on white, as a painting on paper),
      EXIF orientation (applied with ``ImageOps.exif_transpose``), animations
      (first frame).
    * ``min_size``: the backbone's smallest input side. A painting whose short side
      is smaller is upscaled (bicubic, noted) when ``upscale_small`` — the default,
      because the shape bucket resizes every painting to ``image_size`` anyway and a
      blurry small painting is more useful in a sweep than a failed row — or
      refused when ``upscale_small=False``.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found", "check the data.paths setting")
    if not path.is_file():
        raise ImageError(path, "not a regular file", "point data.paths at image files or folders")
    data = path.read_bytes()
    if not data:
        raise ImageError(path, "zero-byte file", _FIX_REEXPORT)
    sha = hashlib.sha256(data).hexdigest()
    notes: list[str] = []

    try:
        with warnings.catch_warnings(), _pillow_limit(max_pixels):
            # Our own max_pixels check below replaces Pillow's warning; Pillow's hard limit
            # (DecompressionBombError, 2x its warning size) only applies above 2 * max_pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"refused as a decompression bomb ({e})", _BOMB_FIX) from None
    except UnidentifiedImageError:
        if _looks_like_video(path, data[:16]):
            raise ImageError(path, "is a video, not a painting",
                             "pass videos as data.video=PATH (dreamed frame by frame)") from None
        raise ImageError(path, "not an image Pillow can read (unknown format or not an image at all)",
                         "check the file type and re-export it as PNG/JPEG") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(path, f"corrupt image header ({e})", _FIX_REEXPORT) from None

    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(path, f"image has an empty size {w}x{h}", _FIX_REEXPORT)
    if w * h > max_pixels:
        raise ImageError(path, f"{w}x{h} = {w * h:,} pixels exceeds max_pixels={max_pixels:,} "
                         "(possible decompression bomb)", _BOMB_FIX)

    try:  # counting frames scans the file; a broken tail must not escape as a bare OSError
        n_frames = int(getattr(im, "n_frames", 1) or 1)
        if n_frames > 1:
            im.seek(0)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(path, f"corrupt or truncated animation ({e})", _FIX_REEXPORT) from None
    if n_frames > 1:
        fmt = im.format or "image"
        kind = "animated" if fmt in ("GIF", "PNG", "WEBP") else "multi-frame"
        notes.append(f"{kind} {fmt}: used frame 1 of {n_frames}")

    with _pillow_limit(max_pixels):
        _load_fully(im, path)

    orientation = _exif_orientation(im)
    if orientation in range(2, 9):
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as e:  # malformed EXIF: keep the stored orientation, say so
            notes.append(f"EXIF orientation {orientation} could not be applied ({type(e).__name__})")
        else:
            notes.append(f"EXIF orientation {orientation} applied")
    original_size = (int(im.size[0]), int(im.size[1]))

    pixels = _to_rgb_uint8(im, notes, path)

    if min_size is not None and min(original_size) < min_size:
        ow, oh = original_size
        if not upscale_small:
            raise ImageError(path, f"{ow}x{oh} is smaller than the backbone's minimum side {min_size}",
                             "use a larger image or set upscale_small=True")
        scale = min_size / min(ow, oh)
        nw, nh = max(min_size, round(ow * scale)), max(min_size, round(oh * scale))
        pixels = resize_uint8(pixels, (nh, nw), resample=Image.Resampling.BICUBIC)
        notes.append(f"upscaled from {ow}x{oh} to {nw}x{nh} (short side below min_size {min_size})")

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    pixels.setflags(write=False)
    return Painting(pixels=pixels, path=path, name=path.stem, sha256=sha,
                    original_size=original_size, notes=tuple(notes))


VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mpg", ".mpeg", ".wmv", ".flv")


def _looks_like_video(path: Path, head: bytes) -> bool:
    """MP4/MOV (``ftyp`` box), Matroska/WebM (EBML), AVI (RIFF AVI), MPEG-PS, or a video extension."""
    return (head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:11] == b"AVI")
            or head[:4] == b"\x00\x00\x01\xba" or path.suffix.lower() in VIDEO_EXTENSIONS)


def _load_fully(im: Image.Image, path: Path) -> None:
    """Decode all pixels; a truncated file raises instead of coming back partly grey."""
    with _TRUNCATED_LOCK:
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # someone may have set it globally
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
        except Image.DecompressionBombError as e:
            raise ImageError(path, f"refused as a decompression bomb ({e})", _BOMB_FIX) from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            what = "file is truncated" if "truncated" in reason.lower() else "corrupt or truncated image data"
            raise ImageError(path, f"{what}, refusing a partial image (Pillow: {reason})", _FIX_REEXPORT) from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # broken EXIF blocks are common; they only lose the orientation
        return 1


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_rgb_uint8(im: Image.Image, notes: list[str], path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("L", "RGB", "P") and "transparency" in im.info:
        # tRNS chunk: a transparent grey level / colour / palette entries.
        if mode == "P":
            notes.append("palette converted to RGB")
        elif mode == "L":
            notes.append("grayscale expanded to RGB")
        im, mode = im.convert("RGBA"), "RGBA"
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("1", "L"):
        notes.append("grayscale expanded to RGB")
        return np.repeat(np.asarray(im.convert("L"), dtype=np.uint8)[..., None], 3, axis=2)
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_uint8(im, notes)
        notes.append("grayscale expanded to RGB")
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "CMYK":
        return _cmyk_to_rgb(im, notes)
    if mode in ("P", "PA"):
        if mode == "P" and im.palette is not None and im.palette.mode != "RGBA":
            notes.append("palette converted to RGB")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"), dtype=np.uint8)
        notes.append("grayscale expanded to RGB")
        return _with_alpha(np.repeat(la[..., :1], 3, axis=2), la[..., 1], notes)
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        return _with_alpha(rgba[..., :3], rgba[..., 3], notes)
    try:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ImageError(path, f"unsupported image mode {mode} ({e})", "re-export it as 8-bit RGB") from None
    notes.append(f"{mode} converted to RGB")
    return rgb


def _cmyk_to_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    icc = im.info.get("icc_profile")
    if icc:  # print-profile CMYK: the embedded profile gives far truer colours than the naive formula
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            rgb = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            notes.append("CMYK converted to RGB (embedded ICC profile)")
            return np.asarray(rgb, dtype=np.uint8)
        except Exception:  # missing littlecms or a broken profile: fall back below
            pass
    notes.append("CMYK converted to RGB")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _with_alpha(rgb: np.ndarray, alpha: np.ndarray, notes: list[str]) -> np.ndarray:
    if alpha.min() == 255:
        notes.append("opaque alpha channel dropped")
        return np.ascontiguousarray(rgb)
    notes.append("transparency composited on white")
    return _composite_on_white(rgb, alpha)


def _scale_to_uint8(im: Image.Image, notes: list[str]) -> np.ndarray:
    """16-bit / 32-bit integer or float grayscale -> uint8, scaled (not clipped)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        top = 65535.0
    elif im.mode == "F":
        top = 1.0 if float(np.nanmax(arr)) <= 1.0 else 255.0
    else:  # "I": 32-bit container; a 16-bit source is by far the common case
        mx = float(arr.max())
        top = 255.0 if mx <= 255 else 65535.0 if mx <= 65535 else mx
    if top == 65535.0:
        notes.append("16-bit scaled to 8-bit")
    elif top != 255.0:
        notes.append(f"{im.mode} values scaled from [0, {top:g}] to 8-bit")
    out = np.nan_to_num(arr.astype(np.float64), nan=0.0) * (255.0 / top)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def find_paintings(spec: PathLike | Sequence[PathLike]) -> list[Path]:
    """Expand a folder, glob, file, or a list of those into sorted, unique painting paths.

    Folders are scanned non-recursively for PAINTING_EXTENSIONS (case-insensitive,
    hidden files skipped); use a glob like ``dir/**/*.jpg`` to recurse. An explicit
    file is taken as given (``load_painting`` judges it). A spec that matches
    nothing raises ValueError naming it.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise ValueError("no painting paths given (empty list)")
    found: dict[str, Path] = {}
    for item in items:
        text = os.path.expanduser(os.fspath(item))
        p = Path(text)
        if p.is_dir():
            matches = [c for c in p.iterdir() if c.is_file() and is_painting_name(c.name)]
        elif p.is_file():
            matches = [p]
        else:
            matches = [Path(m) for m in _glob.glob(text, recursive=True)
                       if os.path.isfile(m) and is_painting_name(os.path.basename(m))]
        if not matches:
            what = "folder has no images" if p.is_dir() else "no image files match"
            raise ValueError(f"{what}: {os.fspath(item)!r} (extensions: {' '.join(PAINTING_EXTENSIONS)})")
        for m in matches:
            found.setdefault(os.path.normcase(str(m.resolve())), m.resolve())
    return sorted(found.values(), key=lambda q: str(q))


def is_painting_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in PAINTING_EXTENSIONS


# ---------------------------------------------------------------------------------------------
# Shape buckets and resizing

# Aspect ratios as (long, short), from common canvas and reproduction formats: square,
# 9:8 (near-square canvases), 5:4 (portrait canvases, 8x10), 4:3, 3:2 (landscapes,
# 35mm reproductions), 16:9 and 2:1 (panoramas, scrolls, friezes; anything longer is
# squeezed into 2:1). Snapping is in log space, so the worst stretch a painting gets is
# half the widest gap between neighbours: ~8.9% (aspect ~1.63, between 3:2 and 16:9);
# most formats in the list map exactly. 7 ratios x 2 orientations = 13 shapes per
# image_size, i.e. 13 compiles per (group, octave) at most, usually far fewer. The
# stretch is undone by restore_aspect, so it only distorts the dream's own patterns.
DEFAULT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (9, 8), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1))


def _ratio_value(r: Any) -> float:
    if isinstance(r, (tuple, list)):
        a, b = r
        v = float(a) / float(b)
    else:
        v = float(r)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"invalid aspect ratio {r!r}")
    return max(v, 1.0 / v)  # orientation comes from the painting, not the ratio


def bucket_shape(h: int, w: int, image_size: int, ratios: Sequence[Any] = DEFAULT_RATIOS,
                 multiple: int = 8) -> tuple[int, int]:
    """The bucket (bh, bw) for an h×w painting: long side = ``image_size``.

    The aspect long/short is snapped to the nearest of ``ratios`` in log space
    (so 4:5 and 5:4 are equally far from 1:1), keeping the painting's orientation;
    the short side is ``image_size / ratio`` rounded to a multiple of ``multiple``
    (at least ``multiple``, at most ``image_size``). Square paintings get
    (image_size, image_size). Deterministic: ties go to the earlier ratio.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"bucket_shape needs a positive size, got {h}x{w}")
    if image_size <= 0 or multiple <= 0:
        raise ValueError(f"image_size and multiple must be positive, got {image_size}, {multiple}")
    values = [_ratio_value(r) for r in ratios]
    if not values:
        raise ValueError("bucket_shape needs at least one ratio")
    aspect = math.log(max(h, w) / min(h, w))
    best = min(values, key=lambda v: abs(math.log(v) - aspect))  # min() keeps the first on ties
    if best == 1.0:  # square stays square even when image_size is not a multiple (e.g. 299)
        return (image_size, image_size)
    short = int(round(image_size / best / multiple)) * multiple
    short = min(max(short, multiple), image_size)
    return (image_size, short) if h >= w else (short, image_size)


def _as_size(shape: Sequence[int]) -> tuple[int, int]:
    hh, ww = (int(shape[0]), int(shape[1]))
    if hh <= 0 or ww <= 0:
        raise ValueError(f"target size must be positive, got {hh}x{ww}")
    return hh, ww


def _default_resample(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Image.Resampling:
    downscale = dst_hw[0] <= src_hw[0] and dst_hw[1] <= src_hw[1]
    return Image.Resampling.LANCZOS if downscale else Image.Resampling.BICUBIC


def resize_uint8(pixels: np.ndarray, shape: Sequence[int], *, resample: Any = None) -> np.ndarray:
    """Resize uint8 H×W×C (C = 1, 3 or 4) or H×W to ``shape`` = (h, w) with Pillow.

    Default filter: LANCZOS when shrinking (the input to a bucket), BICUBIC otherwise.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise TypeError(f"resize_uint8 needs uint8 pixels, got {pixels.dtype}; use resize_float")
    hh, ww = _as_size(shape)
    if pixels.shape[:2] == (hh, ww):
        return pixels.copy()
    resample = _default_resample(pixels.shape[:2], (hh, ww)) if resample is None else resample
    squeeze = pixels.ndim == 3 and pixels.shape[2] == 1
    im = Image.fromarray(pixels[..., 0] if squeeze else pixels)
    out = np.asarray(im.resize((ww, hh), resample=resample))
    return out[..., None] if squeeze else out


def resize_float(arr: np.ndarray, shape: Sequence[int], *, resample: Any = Image.Resampling.BICUBIC) -> np.ndarray:
    """Resize a float H×W or H×W×C array to (h, w), channel by channel in Pillow's "F" mode.

    No clipping: bicubic/Lanczos overshoot is kept (it is what the dream octave loop
    expects of an image resize); returns float32.
    """
    arr = np.asarray(arr, dtype=np.float32)
    hh, ww = _as_size(shape)
    if arr.shape[:2] == (hh, ww):
        return arr.copy()
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(arr, mode="F").resize((ww, hh), resample=resample), dtype=np.float32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(arr[..., c]), mode="F")
                        .resize((ww, hh), resample=resample), dtype=np.float32)
             for c in range(arr.shape[2])]
    return np.stack(chans, axis=-1)


def restored_size(original_size: Sequence[int], long_side: int) -> tuple[int, int]:
    """(w, h) with the painting's aspect ratio and the given long side (each side >= 1)."""
    w, h = int(original_size[0]), int(original_size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"original_size must be positive, got {w}x{h}")
    if w >= h:
        return long_side, max(1, int(round(long_side * h / w)))
    return max(1, int(round(long_side * w / h))), long_side


def squeeze_note(original_size: Sequence[int], bucket: Sequence[int], long_side: int,
                 tolerance: float = 1.1) -> str | None:
    """A note when the bucket distorts the painting by more than ``tolerance`` (the buckets of
    :data:`DEFAULT_RATIOS` stretch at most 8.9 %, so only paintings longer than the widest
    ratio, 2:1, get one): the dream is made on the squeezed bucket and stretched back, which
    a 16:1 scroll at image_size 96 turns into a 96x6 px dream. Says what to do instead."""
    w, h = int(original_size[0]), int(original_size[1])
    bh, bw = int(bucket[0]), int(bucket[1])
    aspect = max(w, h) / min(w, h)
    stretch = aspect / (max(bh, bw) / min(bh, bw))
    if stretch <= tolerance:
        return None
    rw, rh = restored_size((w, h), long_side)
    return (f"aspect {aspect:.2f}:1 is longer than the widest bucket ({max(bh, bw) / min(bh, bw):.2f}:1): "
            f"dreamed squeezed {stretch:.1f}x into {bw}x{bh} px and stretched back to {rw}x{rh} px; "
            f"crop or split the painting into parts of at most 2:1 for an undistorted dream")


def restore_aspect(dream_pixels: np.ndarray, original_size: Sequence[int], long_side: int) -> np.ndarray:
    """Resize a bucket-shaped dream back to the painting's aspect (``original_size`` = (w, h)).

    uint8 in -> uint8 out, float in -> float32 out; BICUBIC (the bucket only stretched
    the painting by a few percent, there is nothing to anti-alias).
    """
    w, h = restored_size(original_size, long_side)
    arr = np.asarray(dream_pixels)
    if arr.dtype == np.uint8:
        return resize_uint8(arr, (h, w), resample=Image.Resampling.BICUBIC)
    return resize_float(arr, (h, w), resample=Image.Resampling.BICUBIC)


def to_uint8(x: Any, rounding: str = "truncate") -> np.ndarray:
    """Float pixels in [0, 255] -> uint8.

    ``rounding="truncate"`` (default) matches the reference Keras notebook (DLwP
    ``deprocess_image``: ``np.clip(img, 0, 255).astype("uint8")``), so results are
    byte-comparable with it; ``"round"`` rounds to nearest, which is unbiased. NaN -> 0.
    """
    arr = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    arr = np.clip(arr, 0, 255)
    if rounding == "round":
        arr = np.rint(arr)
    elif rounding != "truncate":
        raise ValueError(f"rounding must be 'truncate' or 'round', got {rounding!r}")
    return arr.astype(np.uint8)


def _check_uint8_image(pixels: Any, what: str) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise TypeError(f"{what} needs uint8 pixels, got {arr.dtype}; convert with to_uint8() first")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"{what} needs an H×W, H×W×3 or H×W×4 image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def save_png(path: PathLike, pixels: np.ndarray, *, compress_level: int = 6) -> Path:
    buf = io.BytesIO()
    Image.fromarray(_check_uint8_image(pixels, "save_png")).save(buf, format="PNG", compress_level=compress_level)
    return atomic_write_bytes(path, buf.getvalue())


def save_jpeg(path: PathLike, pixels: np.ndarray, quality: int = 90) -> Path:
    arr = _check_uint8_image(pixels, "save_jpeg")
    im = Image.fromarray(arr)
    if im.mode == "RGBA":  # JPEG has no alpha: composite like load_painting does
        im = Image.fromarray(_composite_on_white(arr[..., :3], arr[..., 3]))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)
    return atomic_write_bytes(path, buf.getvalue())


def save_gif(path: PathLike, frames: Sequence[np.ndarray] | Iterable[np.ndarray],
             duration_ms: int | Sequence[int] = 100, loop: int = 0, max_side: int | None = None,
             colors: int = 256) -> Path:
    """Animated GIF of uint8 H×W×3 frames with one adaptive palette shared by all frames.

    One palette (median cut over a sample of every frame) keeps colours from
    flickering between frames and the file small; no dithering (dither noise defeats
    GIF's frame-difference compression). ``max_side`` shrinks frames (LANCZOS) so
    the long side is at most that. ``duration_ms`` is per frame (int or one per frame).
    """
    arrs = [_check_uint8_image(f, "save_gif") for f in frames]
    if not arrs:
        raise ValueError(f"save_gif({os.fspath(path)!r}) got no frames")
    shape = arrs[0].shape[:2]
    rgb = []
    for a in arrs:
        if a.shape[:2] != shape:
            a = resize_uint8(a, shape)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        elif a.shape[2] == 4:
            a = _composite_on_white(a[..., :3], a[..., 3])
        rgb.append(a)
    h, w = shape
    if max_side is not None and max(h, w) > max_side:
        s = max_side / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        rgb = [resize_uint8(a, (nh, nw), resample=Image.Resampling.LANCZOS) for a in rgb]
    palette = _shared_palette(rgb, colors)
    ims = [Image.fromarray(a).quantize(palette=palette, dither=Image.Dither.NONE) for a in rgb]
    durations = list(duration_ms) if isinstance(duration_ms, (list, tuple)) else int(duration_ms)
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=durations,
                loop=loop, optimize=False, disposal=1)
    return atomic_write_bytes(path, buf.getvalue())


def _shared_palette(frames: list[np.ndarray], colors: int) -> Image.Image:
    # Sample every frame into one strip of ~64k pixels in all (median cut's time grows with the
    # strip: 0.5 s a GIF at all pixels of ten 128x192 frames) and quantize it.
    samples = []
    budget = 65536 / len(frames)
    for a in frames:
        step = max(1, math.ceil(math.sqrt(a.shape[0] * a.shape[1] / budget)))
        samples.append(a[::step, ::step].reshape(-1, 3))
    strip = np.ascontiguousarray(np.concatenate(samples, axis=0)[:, None, :])
    return Image.fromarray(strip).quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                                           dither=Image.Dither.NONE)


def original_colors(dream_pixels: np.ndarray, painting_pixels: np.ndarray) -> np.ndarray:
    """neural-dream's ``-original_colors``: the dream's luminance with the painting's chroma (YIQ),
    the painting resized to the dream; uint8 in, uint8 out."""
    h, w = dream_pixels.shape[:2]
    src = painting_pixels if painting_pixels.shape[:2] == (h, w) else resize_uint8(painting_pixels, (h, w))
    to_yiq = np.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
    d = dream_pixels.astype(np.float32) @ to_yiq.T
    p = src.astype(np.float32) @ to_yiq.T
    yiq = np.concatenate([d[..., :1], p[..., 1:]], axis=-1)
    rgb = yiq @ np.linalg.inv(to_yiq).T.astype(np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
