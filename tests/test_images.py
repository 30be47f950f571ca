"""dreamjax.outputs.images: every awkward input is either decoded right or refused with one line."""
from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dreamjax import files
from dreamjax.outputs import images
from dreamjax.outputs.images import ImageError, bucket_shape, load_painting
from tests import make_bad_images as bad


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return bad.make_all(tmp_path_factory.mktemp("bad_images"))


def test_module_has_no_jax_import():
    tree = ast.parse(Path(images.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] in ("jax", "jaxlib", "flax")], names


def _one_line_error(path, match, **kw) -> str:
    with pytest.raises(ImageError, match=match) as ei:
        load_painting(path, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert "; " in msg, f"message should say what to do: {msg}"
    return msg


# --- refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["truncated_jpeg", "truncated_png"])
def test_truncated_is_refused_not_grey(fixtures, kind):
    _one_line_error(fixtures[kind], "truncated")


def test_truncated_refused_even_if_pillow_told_to_load_truncated(fixtures, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _one_line_error(fixtures["truncated_jpeg"], "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is restored


def test_zero_byte(fixtures):
    _one_line_error(fixtures["zero_byte"], "zero-byte")


def test_text_named_jpg(fixtures):
    _one_line_error(fixtures["text_as_jpg"], "not an image")


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.jpg", "not found")


def test_bomb_header_refused_before_decoding(fixtures):
    _one_line_error(fixtures["bomb"], "decompression bomb")  # Pillow's hard limit
    _one_line_error(fixtures["big_header"], "max_pixels")  # ours: 72M > 64M, header only


def test_max_pixels_is_checked_on_a_real_image(fixtures):
    msg = _one_line_error(fixtures["good_png"], "max_pixels", max_pixels=1000)
    assert "64x48" in msg
    assert load_painting(fixtures["good_png"], max_pixels=64 * 48).size == (64, 48)


def test_tiny_refused_when_upscale_disabled(fixtures):
    _one_line_error(fixtures["tiny"], "smaller than the backbone's minimum side 32",
                    min_size=32, upscale_small=False)


# --- conversions -----------------------------------------------------------------------------

def test_good_png_roundtrip(fixtures):
    p = load_painting(fixtures["good_png"])
    assert p.pixels.dtype == np.uint8 and p.pixels.shape == (48, 64, 3)
    assert p.name == "good" and p.original_size == (64, 48) and p.notes == ()
    assert p.sha256 == files.file_sha256(fixtures["good_png"])
    assert tuple(p.pixels[0, 0]) == (200, 120, 40) and tuple(p.pixels[0, -1]) == (30, 60, 160)
    assert not p.pixels.flags.writeable


def test_cmyk_jpeg(fixtures):
    p = load_painting(fixtures["cmyk_jpeg"])
    assert "CMYK converted to RGB" in p.notes
    assert np.abs(p.pixels.astype(int) - bad.RED).max() <= 3


def test_png16_scaled_not_clipped(fixtures):
    p = load_painting(fixtures["png16"])
    assert "16-bit scaled to 8-bit" in p.notes and "grayscale expanded to RGB" in p.notes
    assert [int(p.pixels[0, i * 10 + 5, 0]) for i in range(3)] == [0, 128, 255]
    assert (p.pixels[..., 0] == p.pixels[..., 2]).all()


def test_png16_rgb(fixtures):
    p = load_painting(fixtures["png16_rgb"])
    assert tuple(p.pixels[0, 0]) == (255, 128, 0)


def test_grayscale(fixtures):
    p = load_painting(fixtures["grayscale"])
    assert p.notes == ("grayscale expanded to RGB",)
    assert [int(v) for v in p.pixels[0, ::4, 1]] == list(bad.GRAY8_VALUES)


def test_grayscale_alpha_on_white(fixtures):
    p = load_painting(fixtures["grayscale_alpha"])
    assert "transparency composited on white" in p.notes
    assert (p.pixels[:, :4] == 255).all() and (p.pixels[:, 4:] == 50).all()


def test_palette_with_transparency_on_white(fixtures):
    p = load_painting(fixtures["palette_transparency"])
    assert "transparency composited on white" in p.notes
    assert (p.pixels[:, :3] == bad.RED).all()
    assert (p.pixels[:, 3:6] == bad.GREEN).all()
    assert (p.pixels[:, 6:] == bad.WHITE).all()  # transparent index -> white, not black


def test_rgba_composited(fixtures):
    p = load_painting(fixtures["rgba"])
    assert (p.pixels[:, :4] == bad.RED).all()
    assert np.abs(p.pixels[:, 4:].astype(int) - 127).max() <= 1  # black at alpha 128 over white


def test_exif_orientation_applied(fixtures):
    p = load_painting(fixtures["exif_rotated"])
    assert "EXIF orientation 6 applied" in p.notes
    assert p.pixels.shape[:2] == bad.EXIF_UPRIGHT_HW  # portrait, as viewed
    assert p.original_size == (bad.EXIF_UPRIGHT_HW[1], bad.EXIF_UPRIGHT_HW[0])
    diff = np.abs(p.pixels.astype(int) - bad.exif_upright().astype(int))
    inner = np.ones(bad.EXIF_UPRIGHT_HW, bool)  # ignore JPEG ringing at colour edges
    inner[6:10, :] = inner[:, 6:10] = inner[18:22, :] = False
    assert diff[inner].max() < 40, "pixels do not match the upright image"
    assert p.pixels[2, 2, 1] > 200 and p.pixels[2, -3, 0] > 200 and p.pixels[-3, -3, 2] > 200


@pytest.mark.parametrize("kind,fmt", [("animated_gif", "GIF"), ("animated_png", "PNG")])
def test_animation_first_frame(fixtures, kind, fmt):
    p = load_painting(fixtures[kind])
    assert f"animated {fmt}: used frame 1 of 3" in p.notes
    assert (p.pixels == bad.ANIMATION_COLORS[0]).all()


def test_tiny_upscaled_with_note(fixtures):
    p = load_painting(fixtures["tiny"], min_size=32)
    assert p.pixels.shape == (32, 40, 3) and p.original_size == bad.TINY_WH
    assert p.notes == ("upscaled from 10x8 to 40x32 (short side below min_size 32)",)
    assert load_painting(fixtures["tiny"], min_size=8).pixels.shape == (8, 10, 3)


# --- find_paintings --------------------------------------------------------------------------

def test_find_paintings(tmp_path):
    for name in ["b.JPG", "a.png", "c.tiff", "notes.txt", ".hidden.png", "sub/d.webp"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    names = lambda ps: [p.name for p in ps]  # noqa: E731
    assert names(images.find_paintings(tmp_path)) == ["a.png", "b.JPG", "c.tiff"]
    assert names(images.find_paintings(str(tmp_path / "**" / "*.webp"))) == ["d.webp"]
    both = images.find_paintings([tmp_path, tmp_path / "a.png", str(tmp_path / "*.png")])
    assert names(both) == ["a.png", "b.JPG", "c.tiff"]  # deduplicated, sorted
    with pytest.raises(ValueError, match=r"\*\.gif"):
        images.find_paintings([tmp_path, str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder has no images"):
        images.find_paintings(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty list"):
        images.find_paintings([])


# --- buckets and resizing --------------------------------------------------------------------

def test_bucket_shapes_are_few_and_well_formed():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(10, 5000, (2000, 2))]
    sizes += [(100, 100), (1, 1000), (1000, 1), (3, 4), (4, 3), (1080, 1920)]
    logs = sorted(math.log(a / b) for a, b in images.DEFAULT_RATIOS)
    half_gap = max(b - a for a, b in zip(logs, logs[1:])) / 2
    assert math.exp(half_gap) < 1.09  # the documented worst stretch
    for image_size in (224, 299, 512, 300):
        shapes = set()
        for h, w in sizes:
            bh, bw = bucket_shape(h, w, image_size)
            shapes.add((bh, bw))
            assert max(bh, bw) == image_size
            short = min(bh, bw)
            assert short == image_size or short % 8 == 0
            assert 8 <= short <= image_size
            assert (bh >= bw) == (h >= w) or bh == bw  # orientation kept
            # stretch <= half the widest gap between neighbouring ratios (+ rounding to 8 px)
            err = abs(math.log(max(bh, bw) / min(bh, bw)) - math.log(min(max(h, w) / min(h, w), 2.0)))
            assert err <= half_gap + math.log((short + 4) / short), (h, w, bh, bw)
        assert len(shapes) <= 2 * len(images.DEFAULT_RATIOS) - 1
    assert bucket_shape(512, 512, 384) == (384, 384)
    assert bucket_shape(1080, 1920, 512) == (288, 512)  # 16:9
    assert bucket_shape(1920, 1080, 512) == (512, 288)
    assert bucket_shape(800, 640, 320, multiple=16) == (320, 256)  # 5:4
    assert bucket_shape(300, 400, 299, ratios=[1.0]) == (299, 299)


def test_resize_and_restore_aspect():
    a = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    small = images.resize_uint8(a, (30, 45))
    assert small.shape == (30, 45, 3) and small.dtype == np.uint8
    f = images.resize_float(a.astype(np.float32), (120, 80))
    assert f.shape == (120, 80, 3) and f.dtype == np.float32
    flat = images.resize_float(np.full((10, 10, 3), 7.5, np.float32), (23, 17))
    assert np.allclose(flat, 7.5)
    assert images.restore_aspect(small, (900, 600), 300).shape == (200, 300, 3)
    assert images.restore_aspect(f, (600, 900), 300).shape == (300, 200, 3)
    assert images.restore_aspect(f, (600, 900), 300).dtype == np.float32
    with pytest.raises(TypeError):
        images.resize_uint8(f, (4, 4))


def test_to_uint8_matches_reference_truncation():
    x = np.array([-3.0, 0.4, 0.6, 127.99, 254.5, 300.0, np.nan])
    assert images.to_uint8(x).tolist() == [0, 0, 0, 127, 254, 255, 0]
    assert images.to_uint8(x, rounding="round").tolist() == [0, 0, 1, 128, 254, 255, 0]  # rint: half to even
    ref = np.random.default_rng(1).uniform(-20, 280, (8, 8, 3))
    np.testing.assert_array_equal(images.to_uint8(ref), np.clip(ref, 0, 255).astype("uint8"))
    with pytest.raises(ValueError):
        images.to_uint8(x, rounding="floor")


# --- writers ---------------------------------------------------------------------------------

def _leftovers(d: Path):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_writers_roundtrip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    images.save_png(tmp_path / "x.png", a)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), a)
    images.save_jpeg(tmp_path / "sub" / "x.jpg", a, quality=95)
    assert Image.open(tmp_path / "sub" / "x.jpg").size == (30, 20)
    files.write_json(tmp_path / "m.json", {"b": np.float32(1.5), "a": [np.int64(2)], "p": tmp_path})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": [2], "b": 1.5, "p": str(tmp_path)} and text.index('"a"') < text.index('"b"')
    with pytest.raises(TypeError):
        images.save_png(tmp_path / "f.png", a.astype(np.float32))
    assert _leftovers(tmp_path) == []
    assert oct(os.stat(tmp_path / "x.png").st_mode & 0o777) == "0o644"


def test_gif_frames_and_size(tmp_path):
    frames = [np.full((40, 60, 3), c, np.uint8) for c in bad.ANIMATION_COLORS]
    frames[1][10:20, 10:20] = (255, 255, 0)
    images.save_gif(tmp_path / "f.gif", frames, duration_ms=80, max_side=30)
    im = Image.open(tmp_path / "f.gif")
    assert im.n_frames == 3 and im.size == (30, 20) and im.info.get("loop") == 0
    got = []
    for i in range(3):
        im.seek(i)
        got.append(np.asarray(im.convert("RGB")))
    for i, c in enumerate(bad.ANIMATION_COLORS):
        assert np.abs(got[i][-1, -1].astype(int) - c).max() <= 8
    assert np.abs(got[1][7, 7].astype(int) - (255, 255, 0)).max() <= 8
    with pytest.raises(ValueError):
        images.save_gif(tmp_path / "none.gif", [])


@pytest.mark.parametrize("fail_at", ["write", "replace"])
def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch, fail_at):
    target = tmp_path / "out.png"
    target.write_bytes(b"old contents")
    a = np.zeros((8, 8, 3), np.uint8)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if fail_at == "replace":
        monkeypatch.setattr(images.os, "replace", boom)
    else:
        class Exploding:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])  # a partial write reaches the disk ...
                boom()  # ... then the process dies

        real_fdopen = os.fdopen
        monkeypatch.setattr(images.os, "fdopen", lambda *a, **k: Exploding(real_fdopen(*a, **k)))
    for write in (lambda: images.save_png(target, a), lambda: files.write_json(target, {"a": 1}),
                  lambda: files.atomic_write_text(target, "new")):
        with pytest.raises(OSError, match="simulated"):
            write()
        assert target.read_bytes() == b"old contents"
        assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    files.atomic_write_text(tmp_path / "fresh.txt", "ok")
    assert (tmp_path / "fresh.txt").read_text() == "ok" and _leftovers(tmp_path) == []


def test_atomic_write_new_file_failure_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(images.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError):
        files.write_json(tmp_path / "new.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_bundled_paintings_load(paintings_dir):
    for path in images.find_paintings(paintings_dir):
        p = load_painting(path, min_size=224)
        assert p.pixels.ndim == 3 and p.pixels.shape[2] == 3 and min(p.pixels.shape[:2]) >= 224
        assert p.sha256 == files.file_sha256(path)
