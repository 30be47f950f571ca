"""Paintings longer than the widest bucket (2:1) get a note, never a silent squeeze; the
decompression-bomb hint says what really admits a larger painting."""
import json

import numpy as np
import pytest
from PIL import Image

from dreamjax.outputs import images
from dreamjax.outputs.images import ImageError, bucket_shape, load_painting, squeeze_note


def test_only_paintings_beyond_the_widest_bucket_get_a_note():
    for w in range(100, 201):  # every aspect from 1:1 to 2:1 fits a bucket within 8.9 %
        for h, ww in ((100, w), (w, 100)):
            assert squeeze_note((ww, h), bucket_shape(h, ww, 96), 96) is None, (ww, h)
    note = squeeze_note((1600, 100), bucket_shape(100, 1600, 96), 96)  # a 16:1 scroll
    assert note is not None
    assert "16.00:1" in note and "2.00:1" in note and "8.0x" in note, note
    assert "96x48" in note and "96x6" in note and "crop or split" in note, note
    assert squeeze_note((100, 300), bucket_shape(300, 100, 96), 96).startswith("aspect 3.00:1")  # portrait too


@pytest.mark.slow  # a long test (a CLI run or a full forward): the slow suite, which CI runs
def test_a_squeezed_painting_is_noted_in_its_record(tmp_path):
    from hydra import compose, initialize_config_dir

    import dreamjax
    from dreamjax.sweep import grid
    from dreamjax.sweep.executor import Executor, RunOptions

    scroll = tmp_path / "scroll.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 640, 3), np.uint8)).save(scroll)
    with initialize_config_dir(dreamjax.config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "layers=tiny_set1", "dream=dlwp", "dream.iterations=1",
                                           "dream.num_octaves=1", "dream.border=0", "data.image_size=64",
                                           "checkpoint.enabled=false", "outputs.gif=false",
                                           "outputs.octave_images=false"])
    cells = grid.cells_from_config(cfg, [scroll], job_dir=tmp_path / "run")
    (rec,) = Executor(RunOptions.from_config(cfg)).run(cells)
    assert rec["status"] == "done", rec
    note = [n for n in rec["painting_notes"] if "widest bucket" in n]
    assert note and "16.00:1" in note[0] and "64x32" in note[0] and "64x4" in note[0], rec["painting_notes"]
    assert json.loads((cells[0].out_dir / "cell.json").read_text())["painting_notes"] == rec["painting_notes"]


def test_raising_max_pixels_lifts_pillows_own_limit(tmp_path, monkeypatch):
    """Pillow refuses images above 2 * MAX_IMAGE_PIXELS by itself; with data.max_pixels above
    the painting's size the painting loads (dreamjax's header check governs), and the bomb hint
    says so."""
    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 3072-pixel image is now a "bomb" to Pillow
    with pytest.raises(ImageError) as e:
        load_painting(p, max_pixels=1500)
    assert "decompression bomb" in str(e.value) and "raise data.max_pixels" in str(e.value)
    assert "lifts Pillow's own limit" in str(e.value)
    assert load_painting(p, max_pixels=4000).size == (64, 48)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    with pytest.raises(ImageError, match="exceeds max_pixels=3,000.*raise data.max_pixels"):
        load_painting(p, max_pixels=3000)
    assert images._BOMB_FIX in str(e.value)
