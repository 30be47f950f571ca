"""Generate every awkward input a painting folder can hold, into a temp dir, at test time.

``make_all(directory) -> {kind: path}`` is reused by the sweep tests; keep it stable.
Each fixture has known content so a test can assert pixels, not just "no crash";
the expected values are the module-level constants below.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Upright content of the EXIF fixture (what a viewer shows): 24 wide x 40 tall,
# top half red, bottom half blue, a green 8x8 block in the top-left corner.
EXIF_UPRIGHT_HW = (40, 24)
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
ANIMATION_COLORS = (RED, GREEN, BLUE)  # frame 1, 2, 3
GRAY16_VALUES = (0, 128 * 257, 65535)  # 16-bit columns -> 8-bit 0, 128, 255
GRAY8_VALUES = (0, 77, 200, 255)
TINY_WH = (10, 8)
BOMB_WH = (100_000, 100_000)  # header only: 10 G pixels, beyond Pillow's own hard limit
BIG_HEADER_WH = (9_000, 8_000)  # 72 M pixels: above our default max_pixels, below Pillow's warning


def exif_upright() -> np.ndarray:
    h, w = EXIF_UPRIGHT_HW
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = RED
    a[h // 2:] = BLUE
    a[:8, :8] = GREEN
    return a


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG claiming width x height, with (far too little) pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_rgb16(arr16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write 48-bit PNG)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
            + _png_chunk(b"IEND", b""))


def make_all(directory) -> dict[str, Path]:
    """Write every fixture into ``directory``; returns {kind: path}."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def put(kind: str, name: str, data: bytes) -> None:
        (d / name).write_bytes(data)
        out[kind] = d / name

    def pil(im: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    # A good painting, for contrast (and for sweep tests).
    good = np.zeros((48, 64, 3), np.uint8)
    good[:, :32] = (200, 120, 40)
    good[:, 32:] = (30, 60, 160)
    put("good_png", "good.png", pil(Image.fromarray(good), "PNG"))

    # Truncated files: cut well inside the pixel data.
    jpeg = pil(Image.fromarray(_noise(96, 96)), "JPEG", quality=95)
    put("truncated_jpeg", "truncated.jpg", jpeg[: len(jpeg) * 6 // 10])
    png = pil(Image.fromarray(_noise(96, 96, 1)), "PNG")
    put("truncated_png", "truncated.png", png[: len(png) * 6 // 10])

    put("zero_byte", "empty.jpg", b"")
    put("text_as_jpg", "notes.jpg", b"This is not a picture, it is a shopping list.\nmilk\neggs\n")

    # CMYK JPEG of pure red (C=0, M=255, Y=255, K=0).
    put("cmyk_jpeg", "cmyk.jpg", pil(Image.new("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG", quality=95))

    # 16-bit grayscale PNG: three vertical bands.
    g16 = np.zeros((12, 30), np.uint16)
    for i, v in enumerate(GRAY16_VALUES):
        g16[:, i * 10:(i + 1) * 10] = v
    put("png16", "gray16.png", pil(Image.fromarray(g16), "PNG"))
    # 16-bit RGB PNG: red at full, green at half, blue at zero.
    rgb16 = np.zeros((8, 8, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1] = 65535, 128 * 257
    put("png16_rgb", "rgb16.png", png_rgb16(rgb16))

    # Grayscale L, and LA with a transparent left half.
    g8 = np.repeat(np.array(GRAY8_VALUES, np.uint8)[None, :], 5, axis=0).repeat(4, axis=1)  # 5 x 16
    put("grayscale", "gray.png", pil(Image.fromarray(g8), "PNG"))
    la = np.zeros((6, 8, 2), np.uint8)
    la[..., 0], la[..., 1] = 50, 255
    la[:, :4, 1] = 0
    put("grayscale_alpha", "gray_alpha.png", pil(Image.fromarray(la, "LA"), "PNG"))

    # Palette + tRNS: index 0 red, 1 green, 2 fully transparent (left column block).
    p = Image.new("P", (9, 6), 0)
    p.putpalette(list(RED + GREEN + (0, 0, 0)) + [0] * (256 - 3) * 3)
    pa = np.zeros((6, 9), np.uint8)
    pa[:, 3:6], pa[:, 6:] = 1, 2
    p.putdata(pa.ravel().tolist())
    put("palette_transparency", "palette_trns.png", pil(p, "PNG", transparency=2))

    # RGBA: opaque red left half, half-transparent black right half (-> grey 127).
    rgba = np.zeros((4, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)
    rgba[:, 4:] = (0, 0, 0, 128)
    put("rgba", "rgba.png", pil(Image.fromarray(rgba, "RGBA"), "PNG"))

    # EXIF orientation 6 ("rotate 90 CW to view"): store the upright image rotated 90 CCW.
    stored = Image.fromarray(exif_upright()).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif_rotated", "exif6.jpg", pil(stored, "JPEG", quality=95, exif=exif.tobytes()))

    # Animated GIF and APNG, 3 distinct frames.
    frames = [Image.new("RGB", (16, 12), c) for c in ANIMATION_COLORS]
    put("animated_gif", "anim.gif", pil(frames[0], "GIF", save_all=True, append_images=frames[1:],
                                        duration=100, loop=0))
    put("animated_png", "anim.png", pil(frames[0], "PNG", save_all=True, append_images=frames[1:],
                                        duration=100, loop=0))

    tw, th = TINY_WH
    put("tiny", "tiny.png", pil(Image.fromarray(_noise(th, tw, 2)), "PNG"))

    bw, bh = BOMB_WH
    put("bomb", "bomb.png", png_header_only(bw, bh))
    gw, gh = BIG_HEADER_WH
    put("big_header", "big_header.png", png_header_only(gw, gh))
    return out


if __name__ == "__main__":  # python tests/make_bad_images.py OUTDIR
    import sys

    for kind, path in make_all(sys.argv[1] if len(sys.argv) > 1 else "bad_images").items():
        print(f"{kind:22s} {path}")
