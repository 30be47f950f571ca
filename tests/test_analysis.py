"""dreamjax.outputs.analysis against a hand-built sweep whose every number the test knows.

The sweep has the real on-disk layout (cell records -> sweep.build_manifest -> manifest.json,
dream.png, losses.json, frames.gif under ``<job>/<painting>/``). The classifier is injected: it
looks every image up by its exact bytes, so the analysis must feed it exactly the dream and the
painting resized to the dream's size, and the expected classes are fixed by the test.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from dreamjax.outputs import analysis, images, report
from dreamjax.sweep import jobs as sweep
from tests.fake_sweep import (  # noqa: F401
    DREAM_TOP,
    LABELS,
    LONG_SIDE,
    ORIG_TOP,
    SHAPES,
    TAPS,
    WEIGHTS,
    FakeClassifier,
    _key,
    _losses,
    _probs,
    build_sweep,
)


@pytest.fixture()
def fake(tmp_path):
    clf = FakeClassifier()
    manifest = build_sweep(tmp_path, clf)
    sweep_dir = tmp_path / "sweep"
    report.write_sweep_report(sweep_dir, manifest, {})  # the sweep's own report, before any analysis
    return sweep_dir, manifest, clf


def _top5(p):
    return [int(i) for i in np.argsort(-p, kind="stable")[:5]]


def _expected(sweep_dir, manifest, clf):
    """Everything recomputed here from the files and the fake's table, independently."""
    cells = {}
    for c in manifest["cells"]:
        if c["status"] != "done":
            continue
        with Image.open(sweep_dir / c["outputs"]["dream"]) as im:
            dream = np.asarray(im.convert("RGB"))
        pix = images.load_painting(manifest["paintings"][c["painting"]]["path"]).pixels
        orig = images.resize_uint8(pix, dream.shape[:2])
        pd, po = clf.table[_key(dream)], clf.table[_key(orig)]
        lj = json.loads((sweep_dir / c["outputs"]["losses"]).read_text())
        first = lj["octaves"][0]["per_tap"][0]
        last = [r for r in lj["octaves"][-1]["per_tap"] if r is not None][-1]
        fm, fd = orig.reshape(-1, 3).mean(0), dream.reshape(-1, 3).mean(0)
        cells[c["id"]] = {
            "layers": c["layers"], "painting": c["painting"],
            "pixel": np.abs(dream.astype(float) - orig.astype(float)).mean(),
            "perceptual": 1 - fm @ fd / (np.linalg.norm(fm) * np.linalg.norm(fd)),
            "ratio": {t: last[j] / first[j] for j, t in enumerate(lj["taps"])},
            "hall": [i for i in _top5(pd) if i not in set(_top5(po))], "pd": pd,
        }
    return cells


def test_family_ranges():
    fam = analysis.family_of
    assert [fam(i) for i in (151, 207, 268)] == ["dogs"] * 3
    assert [fam(i) for i in (269, 280, 0, 6, 25, 68, 300, 326, 397)] == ["other animals"] * 9
    assert [fam(i) for i in (281, 285, 286, 293)] == ["cats"] * 4
    assert [fam(i) for i in (7, 24, 80, 100, 127, 146)] == ["birds"] * 6
    assert [fam(i) for i in (398, 500, 923, 999)] == ["objects"] * 4
    assert [fam(i) for i in (924, 969, 980, 998)] == ["food, plants & scenes"] * 4
    assert LABELS[281] == "tabby" and LABELS[151] == "Chihuahua" and LABELS[924] == "guacamole"
    # ranges are disjoint and cover 0..999 exactly once
    cover = [i for rs in analysis.FAMILY_RANGES.values() for a, b in rs for i in range(a, b + 1)]
    assert sorted(cover) == list(range(1000))


def test_analysis_numbers_match_the_sweep(fake):
    sweep_dir, manifest, clf = fake
    res = analysis.analyze(sweep_dir, classifier=clf)
    exp = _expected(sweep_dir, manifest, clf)
    on_disk = json.loads((sweep_dir / "analysis.json").read_text())
    assert set(on_disk["cells"]) == set(exp) == {"0/alpha", "0/beta", "0/gamma", "1/alpha", "1/beta"}
    assert on_disk["skipped"] == {"1/gamma": "status failed"}
    # one batched call: 3 originals (deduplicated per painting) + 5 dreams
    assert clf.calls == 1 and clf.seen == 8

    for cid, e in exp.items():
        r = on_disk["cells"][cid]
        assert r["pixel_change"] == pytest.approx(e["pixel"], rel=1e-12)
        assert r["perceptual_change"] == pytest.approx(e["perceptual"], rel=1e-9, abs=1e-12)
        assert r["energy_ratio"] == pytest.approx(e["ratio"], rel=1e-12)
        assert [i for _, _, i in r["hallucinated"]] == e["hall"]
        assert [lab for lab, _, _ in r["hallucinated"]] == [LABELS[i] for i in e["hall"]]
        assert sum(r["dream_families"].values()) == pytest.approx(1.0)
    assert exp["1/beta"]["hall"] == []  # dream kept the original's top-5

    setA, setB = on_disk["sets"]["setA"], on_disk["sets"]["setB"]
    counts = {h["label"]: (h["paintings"], h["of"]) for h in setA["hallucinated"]}
    # Egyptian cat is new on alpha and beta, but already in gamma's original top-5
    assert counts == {"Egyptian_cat": (2, 3), "golden_retriever": (3, 3), "goldfinch": (1, 3), "timber_wolf": (1, 3)}
    assert setA["hallucinated"][0]["label"] == "golden_retriever"
    assert {h["label"]: h["paintings"] for h in setB["hallucinated"]} == {"volcano": 1}
    assert setB["hallucinated"][0]["of"] == 2 and setB["hallucinated"][0]["family"] == "food, plants & scenes"

    for name, s in on_disk["sets"].items():
        ids = [cid for cid, e in exp.items() if e["layers"] == name]
        assert s["cells"] == len(ids)
        assert s["pixel_change"] == pytest.approx(np.mean([exp[i]["pixel"] for i in ids]))
        for t in TAPS[name]:
            assert s["energy_ratio"][t] == pytest.approx(np.mean([exp[i]["ratio"][t] for i in ids]))
        # family share: top-5 mass per family / top-5 mass, mean over the set's dreams
        for fam in analysis.FAMILIES:
            want = np.mean([sum(exp[i]["pd"][k] for k in _top5(exp[i]["pd"]) if analysis.family_of(k) == fam)
                            / sum(exp[i]["pd"][k] for k in _top5(exp[i]["pd"])) for i in ids])
            assert s["dream_families"][fam] == pytest.approx(want)
    assert setA["dream_families"]["cats"] == pytest.approx(np.mean([0.35 / 0.74, 0.30 / 0.71, 0.50 / 0.76]))

    # mean loss curves: octave 0 has 4 steps, octave 1 3 (frozen steps dropped)
    lc = setA["loss_curves"]
    assert [len(o["t1"]) for o in lc["octaves"]] == [4, 3]
    l0 = [json.loads((sweep_dir / f"0/{p}/losses.json").read_text())["octaves"][1]["per_tap"][2][0]
          for p in ("alpha", "beta", "gamma")]
    assert lc["octaves"][1]["t1"][2] == pytest.approx(np.mean(l0))
    assert res["sets"].keys() == on_disk["sets"].keys()

    md = (sweep_dir / "analysis.md").read_text()
    assert ("- **setA** → 'golden_retriever' (3 of 3 paintings), 'Egyptian_cat' (2 of 3 paintings), "
            "'timber_wolf' (1 of 3 paintings), 'goldfinch' (1 of 3 paintings)") in md
    assert "- **setB** → 'volcano' (1 of 2 paintings)" in md
    assert f"| setA | 3 | {np.mean([exp[i]['pixel'] for i in ('0/alpha', '0/beta', '0/gamma')]):.1f} |" in md
    for png in ("loss_curves.png", "families.png", "change.png"):
        assert f"](analysis/{png})" in md
        with open(sweep_dir / "analysis" / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_gallery_rewritten_with_analysis(fake):
    sweep_dir, manifest, clf = fake
    before = (sweep_dir / "index.html").read_text()
    assert "new in top-5" not in before and 'href="analysis.md"' not in before
    analysis.analyze(sweep_dir, classifier=clf)
    html = (sweep_dir / "index.html").read_text()
    assert 'href="analysis.md"' in html and 'href="analysis/loss_curves.png"' in html
    fig = html.split('id="cell-0/alpha"')[1].split("</figure>")[0]
    assert "new in top-5" in fig and "Egyptian_cat" in fig and "golden_retriever" in fig
    assert 'href="0/alpha/frames.gif"' in fig  # a click opens the iteration GIF
    fig_b = html.split('id="cell-1/beta"')[1].split("</figure>")[0]
    assert "same top-5 as the original" in fig_b
    # original's own top classes under the original
    orig_fig = html.split('id="p-alpha"')[1].split("</figure>")[0]
    assert LABELS[400] in orig_fig
    # a later collect-style report without analysis, then analysis again: analysis is back
    report.write_sweep_report(sweep_dir, manifest, {})
    assert "new in top-5" not in (sweep_dir / "index.html").read_text()
    analysis.analyze(sweep_dir, classifier=clf)
    assert "new in top-5" in (sweep_dir / "index.html").read_text()


def test_energy_stats_and_change_helpers():
    lj = {"taps": ["a", "b"], "layer_weights": [1.0, 3.0],
          "octaves": [{"per_tap": [[1.0, 2.0], [2.0, 3.0]]}, {"per_tap": [[4.0, 1.0], [8.0, 2.0], None]}]}
    e = analysis.energy_stats(lj)
    assert e["energy_ratio"] == {"a": 8.0, "b": 1.0}
    assert e["octave_energy_ratios"] == {"a": [2.0, 2.0], "b": [1.5, 2.0]}
    assert e["final_share"] == pytest.approx({"a": 8 / 14, "b": 6 / 14})
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 10, np.uint8)
    assert analysis.pixel_change(a, b) == 10.0
    assert analysis.cosine_distance([1, 0], [0, 2]) == pytest.approx(1.0)
    assert math.isnan(analysis.cosine_distance([0, 0], [1, 1]))


def test_backbone_classifier_batched_per_bucket(tiny_backbone):
    """The real classifier path on the tiny backbone: one program per aspect bucket, and the
    same probabilities as running each bucket-resized image alone."""
    import jax

    clf = analysis.BackboneClassifier("tiny", "random", batch_size=4)
    assert len(clf.labels) == 10 and not clf.imagenet
    rng = np.random.default_rng(1)
    shapes = [(64, 64), (80, 40), (64, 64), (40, 80), (70, 72), (81, 40), (64, 64), (64, 64), (65, 66)]
    imgs = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    probs, feats = clf.predict(imgs)
    assert probs.shape == (9, 10) and feats.shape == (9, 32)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    buckets = {images.bucket_shape(h, w, 64) for h, w in shapes}
    assert clf.compilations == len(buckets) == 3
    for im, p in zip(imgs[:3], probs[:3]):
        x = images.resize_uint8(im, images.bucket_shape(*im.shape[:2], 64))[None]
        want = jax.nn.softmax(tiny_backbone.logits(tiny_backbone.preprocess(x)))[0]
        np.testing.assert_allclose(p, np.asarray(want), rtol=1e-4, atol=1e-6)


def test_collect_runs_the_analysis_on_the_real_tiny_top(tmp_path, monkeypatch):
    """sweep.collect -> analysis with the default classifier (the tiny backbone's random top)."""
    monkeypatch.delenv("DREAMJAX_ANALYZE", raising=False)
    build_sweep(tmp_path)
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "manifest.json").unlink()
    sweep.collect(sweep_dir)
    res = json.loads((sweep_dir / "analysis.json").read_text())
    assert len(res["cells"]) == 5 and res["classifiers"]["tiny:auto"]["classes"] == 10
    assert all(len(c["dream_top"]) == 5 and c["dream_top"][0][0].startswith("tiny_class_")
               for c in res["cells"].values())
    assert "new in top-5" in (sweep_dir / "index.html").read_text()
    # analyze=false in the sweep's overrides: collect skips it; a broken sweep never raises
    assert analysis.analyze_after_collect(sweep_dir, {"analyze": False, "cells": []}) is None
    assert analysis.analyze_after_collect(sweep_dir, {"cells": [{"config": {"analyze": False}}]}) is None
    assert analysis.analyze_after_collect(tmp_path / "nowhere") is None


def test_a_classifier_prepared_during_the_sweep_is_taken_and_changes_nothing(tmp_path, monkeypatch):
    """analysis.prepare (started by a single run before it dreams) builds the default classifier and
    compiles its buckets in a thread; the analysis takes that one (no second build) and its
    numbers are those of a classifier built at the end."""
    monkeypatch.delenv("DREAMJAX_ANALYZE", raising=False)
    build_sweep(tmp_path)
    sweep_dir = tmp_path / "sweep"
    sweep.collect(sweep_dir)
    plain = json.loads((sweep_dir / "analysis.json").read_text())
    paintings = [p["path"] for p in json.loads((sweep_dir / "manifest.json").read_text())["paintings"].values()
                 if p.get("path")]
    analysis.prepare([("tiny", "auto")], paintings).join()
    prepared = analysis._PREPARED[("tiny", "auto")]
    assert prepared.compilations >= 1  # its bucket programs were compiled in the thread
    built = []
    monkeypatch.setattr(analysis, "BackboneClassifier", lambda *a, **k: built.append(a))
    again = analysis.analyze(sweep_dir, plots=False)
    assert not built and ("tiny", "auto") not in analysis._PREPARED
    for cid, cell in plain["cells"].items():
        assert again["cells"][cid]["dream_top"] == cell["dream_top"], cid


def test_cli(fake, monkeypatch, capsys):
    sweep_dir, _, clf = fake
    monkeypatch.setattr(analysis, "BackboneClassifier", lambda b, w: clf(b, w))
    assert analysis.main([str(sweep_dir), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "setA** → 'golden_retriever' (3 of 3 paintings)" in out
    assert analysis.main([str(sweep_dir / "missing")]) == 2


def test_chunked_reading_gives_the_same_numbers(fake):
    sweep_dir, _, clf = fake
    whole = analysis.analyze(sweep_dir, classifier=clf, plots=False, gallery=False)
    clf.calls = clf.seen = 0
    chunked = analysis.analyze(sweep_dir, classifier=clf, plots=False, gallery=False, chunk_size=2)
    assert clf.calls == 3 and clf.seen == 8  # each original still classified once
    assert chunked["cells"] == whole["cells"] and chunked["sets"] == whole["sets"]


def test_without_matplotlib_no_plots_but_everything_else(fake, monkeypatch):
    import sys

    sweep_dir, _, clf = fake
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = analysis.analyze(sweep_dir, classifier=clf)
    assert res["paths"]["plots"] == {} and not (sweep_dir / "analysis").exists()
    md = (sweep_dir / "analysis.md").read_text()
    assert "![" not in md and "'golden_retriever' (3 of 3 paintings)" in md
    assert "new in top-5" in (sweep_dir / "index.html").read_text()
