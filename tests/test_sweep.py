"""Sweeps end to end through the real CLI (tiny backbone, small sizes)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dreamjax as dj
from tests.helpers import PAINTINGS, SMALL, THREE, dreamjax  # noqa: F401


@pytest.fixture(scope="module")
def batched_sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("batched")
    paths = ",".join(str(p) for p in THREE)
    dreamjax("-m", "layers=tiny_set1,tiny_set2,tiny_set3,tiny_set4", f"data.paths={paths}", *SMALL,
             f"hydra.sweep.dir={d / 'sw'}", cwd=d)
    return d / "sw"


def test_twelve_cells_one_group_one_program_per_octave(batched_sweep):
    sw = batched_sweep
    stats = json.loads((sw / "run_stats.json").read_text())
    assert stats["cells_done"] == 12 and stats["cells_failed"] == 0
    assert stats["groups"] == 1 and stats["batches"] == 2  # batch_size 8: 8 + 4 (padded to 8)
    assert stats["programs"] == 2  # one compiled dream program per octave shape
    jobs = sorted(p for p in sw.iterdir() if p.name.isdigit())
    assert len(jobs) == 12
    for job in jobs:
        assert (job / ".hydra" / "config.yaml").exists()
        (cell,) = [p for p in job.iterdir() if p.is_dir() and p.name != ".hydra"]
        for f in ("dream.png", "frames.gif", "losses.json", "cell.json", "octave_0.png", "octave_1.png"):
            assert (cell / f).is_file(), f"{cell / f} missing"
        rec = json.loads((cell / "cell.json").read_text())
        assert rec["status"] == "done"
        w, h = Image.open(cell / "dream.png").size
        ow, oh = rec["painting_size"]
        assert max(w, h) == 192 and abs(w / h - ow / oh) < 0.02  # back to the painting's aspect
        gif = Image.open(cell / "frames.gif")
        assert gif.n_frames == 2 * (4 // 2) + 1  # frames every 2 steps in 2 octaves, then the dream
    for f in ("manifest.json", "summary.csv", "index.html", "multirun.yaml", "grids/all_cells.jpg"):
        assert (sw / f).is_file(), f
    manifest = json.loads((sw / "manifest.json").read_text())
    assert manifest["counts"]["done"] == 12
    assert {c["layers"] for c in manifest["cells"]} == {f"tiny_set{i}" for i in range(1, 5)}
    assert all(c["painting"] in {p.stem for p in THREE} for c in manifest["cells"])
    assert len(list((sw / "grids").glob("*.jpg"))) == 4  # one per painting + all cells


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_basic_launcher_gives_the_same_dreams(batched_sweep, tmp_path):
    paths = ",".join(str(p) for p in THREE[:1])
    dreamjax("-m", "hydra/launcher=basic", "layers=tiny_set1,tiny_set3", f"data.paths={paths}", *SMALL,
             f"hydra.sweep.dir={tmp_path / 'basic'}", cwd=tmp_path)
    manifest = json.loads((tmp_path / "basic" / "manifest.json").read_text())
    assert manifest["counts"]["done"] == 2
    ref = {(c["layers"], c["painting"]): c for c in json.loads((batched_sweep / "manifest.json").read_text())["cells"]}
    for c in manifest["cells"]:
        a = np.asarray(Image.open(tmp_path / "basic" / c["outputs"]["dream"]), np.int16)
        b = np.asarray(Image.open(batched_sweep / ref[(c["layers"], c["painting"])]["outputs"]["dream"]), np.int16)
        # Batch invariance is 1e-5 in float; after truncation to uint8 a pixel may flip one level.
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_rerun_skips_complete_cells_and_foreign_sweep_is_refused(batched_sweep, tmp_path):
    paths = ",".join(str(p) for p in THREE)
    sw = batched_sweep
    before = {p: p.stat().st_mtime_ns for p in sw.rglob("dream.png")}
    dreamjax("-m", "layers=tiny_set1,tiny_set2,tiny_set3,tiny_set4", f"data.paths={paths}", *SMALL,
             f"hydra.sweep.dir={sw}", cwd=tmp_path)
    stats = json.loads((sw / "run_stats.json").read_text())
    assert stats["cells_skipped"] == 12 and stats["batches"] == 0
    assert before == {p: p.stat().st_mtime_ns for p in sw.rglob("dream.png")}
    p = dreamjax("-m", "layers=tiny_set1", f"data.paths={paths}", *SMALL, f"hydra.sweep.dir={sw}", cwd=tmp_path,
                 check=False)
    assert p.returncode != 0 and "already holds the results of another sweep" in p.stderr + p.stdout


REFUSED = {"truncated_jpeg": "truncat", "truncated_png": "truncat", "zero_byte": "empty", "text_as_jpg": "not an image",
           "bomb": "pixels", "big_header": "pixels"}


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_bad_paintings_never_stop_the_sweep(tmp_path):
    from tests.make_bad_images import make_all

    bad = make_all(tmp_path / "in")
    p = dreamjax("model=tiny", "layers=tiny_set1", f"data.paths={tmp_path / 'in'}", *SMALL[1:],
                 "data.max_pixels=4000000",
                 "dream.num_octaves=1",  # 2:1 buckets at 192 px are too small for two octaves of the tiny net
                 f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert p.returncode == 3, p.stderr[-3000:]  # finished, some cells failed (README: exit codes)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    cells = {Path(manifest["paintings"][c["painting"]]["path"]).name: c for c in manifest["cells"]}
    assert len(cells) == len(bad), "every fixture must have a cell"
    for kind, path in bad.items():
        c = cells[path.name]
        if kind in REFUSED:
            assert c["status"] == "failed", (kind, c["status"])
            err = c["error"]
            assert "\n" not in err and path.name in err and REFUSED[kind] in err.lower(), (kind, err)
        else:  # converted: CMYK, 16-bit, grayscale, palette+alpha, EXIF-rotated, animated, too small
            assert c["status"] == "done", (kind, c["error"])
            assert (tmp_path / "run" / c["outputs"]["dream"]).is_file()
    notes = {Path(p["path"]).name: " ".join(p["notes"]) for p in manifest["paintings"].values()}
    assert "frame" in notes[bad["animated_gif"].name] and "upscaled" in notes[bad["tiny"].name]


@pytest.mark.parametrize("override, message", [
    ("layers.weights=[1.0,2.0]", "layers.weights has 2 values but layers.taps has 4"),
    ("layers.taps=[conv1,convX,conv3,conv4]", "unknown tap(s) ['convX'] for backbone 'tiny'; allowed: conv1"),
    pytest.param("data.paths=/nonexistent/*.jpg", "data.paths", marks=pytest.mark.slow),
    # the CLI path is checked by the two cases above in the default suite; these run in the slow one
    pytest.param("dream.step_size=0", "dream.step_size: 0 must be > 0", marks=pytest.mark.slow),
    pytest.param("dream.octave_scale=1.0", "dream.octave_scale: 1.0 must be > 1", marks=pytest.mark.slow),
    ("dream.num_octaves=9", "below tiny's minimum input size 16"),
    pytest.param("dream.micro_batch=-1", "dream.micro_batch: -1 must be >= 0", marks=pytest.mark.slow),
])
def test_config_mistakes_fail_before_compute(tmp_path, override, message):
    p = dreamjax("model=tiny", "layers=tiny_set1", *SMALL[1:], override, f"hydra.run.dir={tmp_path / 'r'}",
                 cwd=tmp_path, check=False)
    assert p.returncode != 0
    assert message in p.stderr + p.stdout, p.stderr[-2000:]
    assert not list((tmp_path / "r").rglob("cell.json")), "nothing may be computed"


def test_unknown_group_options_name_the_choices(tmp_path):
    p = dreamjax("dream=nope", cwd=tmp_path, check=False)
    assert p.returncode != 0 and "Could not find 'dream/nope'" in p.stderr and "dlwp" in p.stderr
    p = dreamjax("model=tiny", "layers=set1", *SMALL[1:], f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path, check=False)
    assert "is a set for backbone 'inception_v3' but model='tiny'" in p.stderr


def test_every_experiment_composes():
    from hydra import compose, initialize_config_dir

    from dreamjax.sweep import grid

    exps = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))
    assert {"quickstart", "seed_study", "seed_study_offline"} <= set(exps)
    with initialize_config_dir(dj.config_dir(), version_base="1.3"):
        for e in exps:
            cfg = compose("config", overrides=[f"+experiment={e}"])
            cells = grid.cells_from_config(cfg, ["x.jpg"])
            assert cells[0].backbone == cfg.model.name and cells[0].taps


@pytest.mark.slow
@pytest.mark.parametrize("experiment, extra, cells", [
    ("quickstart", ["data.image_size=96"], 1),
    ("seed_study_offline", ["data.image_size=96"], 4),  # its grid: 4 layer sets
    # InceptionV3's real weights need a download: random weights exercise the same programs.
    ("seed_study", ["model.weights=random", "data.image_size=256"], 4),
])
def test_experiment_runs_at_tiny_size(tmp_path, experiment, extra, cells):
    paths = str(THREE[0])
    dreamjax("-m", f"+experiment={experiment}", f"data.paths={paths}", *extra, "dream.iterations=2",
             "dream.num_octaves=2", f"hydra.sweep.dir={tmp_path / 'sw'}", cwd=tmp_path)
    m = json.loads((tmp_path / "sw" / "manifest.json").read_text())
    assert m["counts"]["done"] == cells and m["counts"]["failed"] == 0


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_layer_sets_in_one_run_dream_what_the_sweep_dreams(batched_sweep, tmp_path):
    """`layer_sets=[a,b]`: several weight sets as one run (one batch) give the sweep's cells."""
    dreamjax("layer_sets=[tiny_set1,tiny_set3]", f"data.paths=[{THREE[0]}]", *SMALL, "analyze=false",
             f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert sorted(c["layers"] for c in manifest["cells"]) == ["tiny_set1", "tiny_set3"]
    stats = json.loads((tmp_path / "run" / "run_stats.json").read_text())
    assert stats["batches"] == 1
    ref = {(c["layers"], c["painting"]): c for c in json.loads((batched_sweep / "manifest.json").read_text())["cells"]}
    for c in manifest["cells"]:
        a = np.asarray(Image.open(tmp_path / "run" / c["outputs"]["dream"]), np.int16)
        b = np.asarray(Image.open(batched_sweep / ref[(c["layers"], c["painting"])]["outputs"]["dream"]), np.int16)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


def _collect(sweep_dir):
    code = "import sys; from dreamjax.cli import collect_main; sys.exit(collect_main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, str(sweep_dir)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_dreamjax_collect_rebuilds_the_report_from_records(batched_sweep, tmp_path):
    import shutil

    sw = tmp_path / "copy"
    shutil.copytree(batched_sweep, sw)
    before = json.loads((sw / "manifest.json").read_text())
    for f in ("manifest.json", "summary.csv", "index.html"):
        (sw / f).unlink()
    p = _collect(sw)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "12 done, 0 failed" in p.stdout
    after = json.loads((sw / "manifest.json").read_text())
    key = lambda m: sorted((c["id"], c["status"], c["fingerprint"]) for c in m["cells"])  # noqa: E731
    assert key(after) == key(before)
    assert (sw / "index.html").is_file() and (sw / "summary.csv").read_text().count("\n") == 13
    empty = tmp_path / "empty"
    empty.mkdir()
    p = _collect(empty)
    assert p.returncode == 2 and "no cell records" in p.stderr


def test_plan_time_and_run_time_share_one_loaded_backbone(monkeypatch):
    """Plan time (jobs.load_weights) and the run (Executor.backbone) ask for the same backbone with
    different spellings of the same arguments: it is loaded once per process, not twice."""
    from dreamjax import config as dj_config
    from dreamjax.sweep import executor

    calls = []
    monkeypatch.setattr(executor, "load_backbone", lambda *a, **k: calls.append((a, k)) or object())
    executor._loaded_backbone.cache_clear()
    try:
        model = dj_config.Model(name="tiny", weights="random")
        from dreamjax.sweep import jobs

        first = jobs.load_weights(model)
        assert executor.loaded_backbone("tiny", "random", False) is first
        assert executor.loaded_backbone("tiny", "random", include_top=False) is first
        assert len(calls) == 1
        executor.loaded_backbone("tiny", "random", True)  # the classifier top is another load
        assert len(calls) == 2
    finally:
        executor._loaded_backbone.cache_clear()
