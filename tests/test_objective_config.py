"""Objective config: unit addressing, bad settings failing before compute, a tiny atlas end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dreamjax
from dreamjax.sweep import grid, jobs, units
from dreamjax.sweep.executor import Executor, RunOptions
from tests.conftest import PAINTINGS

PAINTING = str(PAINTINGS / "van_gogh_starry_night.jpg")
TINY = ["model=tiny", "layers=tiny_set1", "dream=dlwp", "dream.num_octaves=1", "dream.iterations=3",
        "dream.border=0", "data.image_size=48", f"data.paths=[{PAINTING}]"]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(dreamjax.config_dir()), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def _plan(tmp_path, *overrides):
    return jobs.plan(_cfg(*TINY, *overrides), job=0, job_dir=tmp_path)


def test_units_as_people_write_them():
    assert units.parse_unit("mixed4:97") == ("channel", "mixed4", (97,))
    assert units.parse_unit("block9:[3,17]") == ("channel", "block9", (3, 17))
    assert units.parse_unit("block9:0-3") == ("channel", "block9", (0, 1, 2, 3))
    assert units.parse_unit("class:1") == ("class", "", (1,))
    assert units.parse_unit("class:goldfish") == ("class", "", (1,))
    assert units.parse_unit("class:Great White Shark") == ("class", "", (2,))
    with pytest.raises(units.UnitError, match=r"unknown class name 'goldfsh'.*did you mean 'goldfish'"):
        units.parse_unit("class:goldfsh")
    with pytest.raises(units.UnitError, match="write TAP:CHANNEL"):
        units.parse_unit("block9")


def test_default_objective_leaves_cells_as_before(tmp_path):
    (cell,) = _plan(tmp_path)
    assert cell.objective == () and cell.objective_static == () and cell.start == "painting"
    fields = {k for k in json.loads(json.dumps(cell.fingerprint()))}
    assert fields  # a fingerprint; the default objective adds nothing to it
    legacy = grid.Cell(**{k: getattr(cell, k) for k in grid.Cell.__dataclass_fields__
                          if k not in grid._OBJECTIVE_FIELDS})
    assert legacy.fingerprint() == cell.fingerprint()


def test_atlas_cells_terms_and_taps(tmp_path):
    cells = _plan(tmp_path, "objective=lucid", "objective.atlas={tap:conv3,channels:0-3}",
                  "objective.terms=['conv2:[1,2]','class:3']", "objective.tv=0.5", "layers.taps=[conv1]",
                  "layers.weights=[1.0]")
    assert [c.unit for c in cells] == [f"conv3_{i:04d}" for i in range(4)]
    c = cells[2]
    assert c.taps == ("conv1", "conv2", "conv3")  # the layer set's taps + the term taps (weight 0)
    assert c.layer_weights[-1] == 0.0 and all(w == 0.0 for w in c.layer_weights)  # lucid: layer 0
    kinds = [(e.kind, e.tap, e.index) for e in c.objective]
    assert ("channel", "conv3", (2,)) in kinds and ("class", "", (3,)) in kinds and ("tv", "", ()) in kinds
    assert len({x.key_seed() for x in cells}) == 4  # each atlas cell draws its own noise
    assert len(grid.group_cells((x, (48, 48)) for x in cells)) == 1  # one program for the atlas


def test_class_atlas_one_class_per_cell(tmp_path):
    """objective.atlas.tap=logits: cell c dreams class c (by index, a range or names)."""
    cells = _plan(tmp_path, "objective.atlas={tap:logits,channels:[goldfish,tench,'great white shark']}")
    assert [c.unit for c in cells] == ["logits_0001", "logits_0000", "logits_0002"]
    assert [[(e.kind, e.index) for e in c.objective] for c in cells] == [[("class", (1,))], [("class", (0,))],
                                                                          [("class", (2,))]]
    assert len(grid.group_cells((x, (48, 48)) for x in cells)) == 1  # one program for every class
    assert [c.unit for c in _plan(tmp_path / "r", "objective.atlas={tap:logits,channels:3-4}")] == [
        "logits_0003", "logits_0004"]
    with pytest.raises(grid.ConfigError, match="class 12 is out of range: tiny has 10 classes"):
        _plan(tmp_path / "x", "objective.atlas={tap:logits,channels:[3,12]}")
    with pytest.raises(grid.ConfigError, match="did you mean 'goldfish'"):
        _plan(tmp_path / "y", "objective.atlas={tap:logits,channels:[goldfsh]}")


def test_atlas_tiles_say_channel_and_class(tmp_path, monkeypatch):
    """Each tile of a contact sheet is captioned with its channel index; a logits (class) atlas names
    the class of the index from the bundled labels, and the classifier's top class where recorded."""
    from dreamjax.outputs import images, report

    assert report.atlas_tile_label("block9", 7, {}) == "7"
    assert report.atlas_tile_label("logits", 1, {}) == "1 goldfish"
    assert report.atlas_tile_label("logits", 388, {}) == "388 giant_panda"
    assert report.atlas_tile_label("logits", 1, {"top_classes": [["tench", 0.6]]}) == "1 goldfish (top: tench)"
    assert report.atlas_tile_label("logits", 1, {"top_classes": [["goldfish", 0.9]]}) == "1 goldfish"
    assert report.atlas_tile_label("block9", 7, {"top_classes": [{"label": "tench"}]}) == "7 tench"
    images.save_png(tmp_path / "d.png", np.zeros((16, 16, 3), np.uint8))
    cells = [{"unit": f"logits_{i:04d}", "status": "done", "outputs": {"dream": "d.png"}} for i in (2, 1)]
    seen = {}
    real = report.contact_sheet
    monkeypatch.setattr(report, "contact_sheet", lambda rows, **kw: seen.setdefault("rows", rows) and real(rows, **kw))
    out = report.write_atlas_sheets(tmp_path, cells)
    assert out["logits"] == tmp_path / "grids" / "atlas_logits.jpg" and out["logits"].is_file()
    ((row_label, tiles),) = seen["rows"]
    assert row_label == "logits 1-2" and [t for t, _ in tiles] == ["1 goldfish", "2 great_white_shark"]


@pytest.mark.parametrize("overrides,message", [
    (["objective.terms=['conv3:40']"], r"channel 40 of conv3 is out of range: conv3 has 16 channels \(0-15\)"),
    (["objective.terms=['class:goldfsh']"], r"did you mean 'goldfish'"),
    (["objective.terms=['class:3']", "+model.include_top=false"], "needs the classifier top"),
    (["objective.terms=[{guide:'/nonexistent/guide.jpg',tap:conv2}]"],
     "guide image '/nonexistent/guide.jpg' cannot be read"),
    (["objective.terms=[{unit:'conv2:1',mask:'BAD'}]"], "cannot be resized to a tap"),
    (["objective.terms=['nope:1']"], "unknown tap 'nope'"),
    (["objective.start=paint"], "objective.start='paint'; choose one of: painting, noise, grey"),
    (["objective.lapnorm=4", "objective.param=fourier"],
     r"^objective.lapnorm=4 cannot be combined with objective.param=fourier: .*1/f; set objective.lapnorm=0 to keep "
     r"fourier, or objective.param=pixels to keep lapnorm$"),
    (["objective=lucid", "objective.lapnorm=3"], r"objective.lapnorm=3 cannot be combined with "
     r"objective.param=fourier_decorrelated"),
    (["objective.param=fourrier"], "objective.param='fourrier'; choose one of: pixels, fourier"),
    (["+augment={target:goldfsh}"], r"augment.target: unknown class name 'goldfsh'.*did you mean 'goldfish'"),
    (["+augment={target:goldfish,second:lite9}"], "augment.second: unknown backbone 'lite9'"),
    (["+augment={target:goldfish,tagret:1}"], r"augment: unknown key\(s\) \['tagret'\]"),
])
def test_bad_settings_fail_before_compute(tmp_path, overrides, message):
    for i, o in enumerate(overrides):
        if "BAD" in o:
            bad = tmp_path / "mask.npy"
            np.save(bad, np.zeros((2, 3, 4, 5), np.float32))
            overrides[i] = o.replace("BAD", str(bad))
    with pytest.raises(grid.ConfigError, match=message):
        _plan(tmp_path, *overrides)


@pytest.fixture(scope="module")
def tiny_atlas(tmp_path_factory):
    d = tmp_path_factory.mktemp("atlas")
    over = ["objective=lucid", "objective.atlas={tap:conv3,channels:0-3}", "objective.param=pixels",
            "objective.transforms.rotate=0", "dream.step_size=0.05", "dream.optimizer=adam"]
    out = []
    for run in ("a", "b"):
        cells = _plan(d / run, *over)
        recs = Executor(RunOptions(batch_size=4, gif=False, octave_images=False, checkpoint=False,
                                   progress=False)).run(cells)
        out.append((cells, recs))
    return out


def test_tiny_atlas_end_to_end_and_byte_identical(tiny_atlas):
    (cells, recs), (cells_b, recs_b) = tiny_atlas
    assert [r["status"] for r in recs] == ["done"] * 4
    for c, r, rb in zip(cells, recs, recs_b):
        assert r["unit"] == c.unit and r["start"] == "noise"
        assert set(r["final_terms"]) == {"channel:conv3"}
        a = (Path(c.job_dir) / r["outputs"]["dream"]).read_bytes()
        b = (Path(cells_b[0].job_dir) / rb["outputs"]["dream"]).read_bytes()
        assert a == b, f"{c.unit}: rerun differs"


def test_tiny_atlas_contact_sheet(tiny_atlas):
    (cells, _), _ = tiny_atlas
    out = jobs.collect(cells[0].job_dir, analyze=False)
    sheet = Path(cells[0].job_dir) / "grids" / "atlas_conv3.jpg"
    assert out["paths"]["atlases"]["conv3"] == sheet and sheet.is_file()
    manifest = json.loads((Path(cells[0].job_dir) / "manifest.json").read_text())
    assert sorted(c["unit"] for c in manifest["cells"]) == [f"conv3_{i:04d}" for i in range(4)]
    assert "conv3_0002" in (Path(cells[0].job_dir) / "index.html").read_text()  # in the gallery


def test_layer_atlas_picks_the_paintings_strongest_channels(tmp_path, tiny_backbone):
    import jax.numpy as jnp

    from dreamjax.sweep import objective

    cells = _plan(tmp_path, "objective.layer=0", "objective.layer_atlas={taps:[conv2,conv3],mode:strong,k:3}")
    assert [c.unit for c in cells] == ["conv2_strong3", "conv3_strong3"]
    x = np.asarray(tiny_backbone.preprocess(np.random.default_rng(0).uniform(0, 255, (1, 48, 48, 3))))
    terms = objective.group_terms(cells[1], tiny_backbone, (48, 48))[0]
    values = objective.cell_values(cells[1:], terms, tiny_backbone, x)
    energy = np.asarray(jnp.mean(jnp.square(tiny_backbone.features(jnp.asarray(x), ("conv3",))["conv3"]), axis=(1, 2)))
    assert set(np.nonzero(values["channel:conv3"][0])[0]) == set(np.argsort(-energy[0])[:3])
    picked = []
    objective.cell_values(cells[1:], terms, tiny_backbone, x, picked=picked)
    assert picked == [{"conv3": [int(i) for i in np.argsort(-energy[0])[:3]]}]  # strongest first, for the record
    weak = objective.cell_values([cells[1].__class__(**{**cells[1].__dict__, "objective": (
        objective.Entry("pick", "conv3", ("weak", 2), 1.0),)})], terms, tiny_backbone, x)
    assert set(np.nonzero(weak["channel:conv3"][0])[0]) == set(np.argsort(energy[0])[:2])


def test_layer_atlas_sheet_names_taps_and_picked_channels(tmp_path):
    """A tiny layer atlas end to end: each record says which channels its pick chose, and the sheet
    grids/layer_atlas_<painting>.jpg captions every tile with its tap and those channels."""
    from dreamjax.outputs import report

    cells = _plan(tmp_path, "objective.layer=0", "objective.layer_atlas={taps:[conv2,conv3],mode:strong,k:2}")
    recs = Executor(RunOptions(batch_size=2, gif=False, octave_images=False, checkpoint=False,
                               progress=False)).run(cells)
    assert [sorted(r["picked"]) for r in recs] == [["conv2"], ["conv3"]]
    assert all(len(r["picked"][t]) == 2 for r, t in zip(recs, ("conv2", "conv3")))
    ch = recs[1]["picked"]["conv3"]
    assert report.layer_atlas_tile_label(recs[1]) == f"conv3 · ch {ch[0]}, {ch[1]}"
    out = jobs.collect(cells[0].job_dir, analyze=False)
    sheet = Path(cells[0].job_dir) / "grids" / "layer_atlas_van_gogh_starry_night.jpg"
    assert out["paths"]["layer_atlases"]["van_gogh_starry_night"] == sheet and sheet.is_file()


def test_original_colors_keeps_luminance_takes_chroma():
    from dreamjax.outputs import images

    rng = np.random.default_rng(0)
    dream_px = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    painting = np.zeros((16, 16, 3), np.uint8)
    painting[..., 0] = 200  # red painting
    out = images.original_colors(dream_px, painting).astype(np.float32)
    lum = lambda p: p.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)  # noqa: E731
    inside = (lum(dream_px) > 60) & (lum(dream_px) < 100)  # away from the clip
    np.testing.assert_allclose(lum(out)[inside], lum(dream_px)[inside], atol=1.0)
    assert (out[..., 0] > out[..., 2])[inside].all()  # the painting's red chroma


def test_augment_writes_an_imagefolder_dataset_with_success_rate(tiny_atlas):
    from dreamjax.outputs.analysis import Classifier
    from dreamjax.sweep import augment

    (cells, _), _ = tiny_atlas
    run_dir = Path(cells[0].job_dir)
    jobs.collect(run_dir, analyze=False)
    labels = list(units.class_names())

    def predict(imgs):  # the dreams (noise starts) look like "goldfish" to this fake classifier
        p = np.full((len(imgs), 1000), 1e-4, np.float32)
        p[:, 1 if predict.calls else 0] = 0.9
        predict.calls += 1
        return p, np.zeros((len(imgs), 4), np.float32)

    def second(imgs):  # a second network: goldfish 3rd before, 2nd after (in its top-5, not its top-1)
        p = np.full((len(imgs), 1000), 1e-4, np.float32)
        p[:, [5, 6]] = 0.3
        p[:, 1] = 0.2 if second.calls else 0.1
        p[:, 6] = 0.1 if second.calls else 0.3
        second.calls += 1
        return p, np.zeros((len(imgs), 4), np.float32)

    predict.calls = second.calls = 0
    result = augment.write_dataset(run_dir, {"target": "goldfish", "out": "ds"},
                                   classifier=Classifier(labels=labels, predict=predict, name="fake"),
                                   second=Classifier(labels=labels, predict=second, name="fake2"))
    assert result["success_rate_top1"] == 1.0 and result["images"] == 4
    assert result["second_classifier"] == "fake2" and result["second_success_rate_top5"] == 1.0
    assert result["second_success_rate_top1"] == 0.0
    assert [(r["second_rank_before"], r["second_rank_after"]) for r in result["items"]] == [(3, 2)] * 4
    assert len(list((run_dir / "ds" / "goldfish").glob("van_gogh_starry_night_conv3_*.png"))) == 4
    m = json.loads((run_dir / "ds" / "manifest.json").read_text())
    assert m["items"][0]["p_target_before"] < 0.01 < 0.5 < m["items"][0]["p_target_after"]
