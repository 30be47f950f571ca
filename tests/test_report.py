"""dreamjax.outputs.report: figures, summary.csv and the static gallery, from a fake sweep on disk."""
from __future__ import annotations

import ast
import csv
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from dreamjax import files
from dreamjax.outputs import images, report

EVIL = 'XLA OOM <script>alert("x")</script> & more'


def _painting(h=60, w=48, seed=0):
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2] = (200, 120, 40)
    a[h // 2:] = (30, 60, 160)
    a[:5, :5] = np.random.default_rng(seed).integers(0, 256, (5, 5, 3))
    return a


def make_sweep(root: Path) -> tuple[dict, dict]:
    """A small finished sweep: 'starry' (3 cells: done, done, failed) and a failed painting."""
    originals = {"starry": _painting(), "wide one": _painting(40, 90, 1)}
    cells = []
    specs = [("starry", "set1", 0.01, "done"), ("starry", "set2", 0.02, "done"), ("starry", "set3", 0.01, "failed"),
             ("wide one", "set1", 0.01, "done"), ("wide one", "set2", 0.02, "pending")]
    for i, (name, layers, step, status) in enumerate(specs):
        job = str(i)
        cell = {"id": f"{i:04d}", "job_dir": job, "painting": name, "layers": layers,
                "label": f"{layers} · step {step}", "overrides": [f"layers={layers}", f"dream.step_size={step}"],
                "hyper": {"step_size": step, "iterations": 20, "octaves": 3},
                "status": status, "error": EVIL if status == "failed" else None,
                "outputs": {"dream": f"{job}/dream.png", "gif": f"{job}/frames.gif",
                            "octaves": [f"{job}/octave_0.png", f"{job}/octave_1.png"],
                            "losses": f"{job}/losses.json", "config": f"{job}/.hydra/config.yaml"},
                "final_losses": {}, "final_loss": None, "seconds": {"compile": 1.5, "run": 2.25 + i}}
        if status == "done":
            dream = 255 - originals[name]
            images.save_png(root / job / "dream.png", dream)
            images.save_gif(root / job / "frames.gif", [originals[name], dream])
            for o in cell["outputs"]["octaves"]:
                images.save_png(root / o, dream)
            files.write_json(root / job / "losses.json", {"total": [1.0, 2.0, 3.0 + i]})
            files.atomic_write_text(root / job / ".hydra" / "config.yaml", f"layers: {layers}\n")
            taps = {"mixed4": 0.5 + i, "mixed5": 1.25} if layers == "set1" else {"mixed6": 2.0 / 3.0}
            cell["final_losses"] = taps
            cell["final_loss"] = sum(taps.values())
            cell["top_classes"] = [["jellyfish <b>", 0.42], ["coral reef", 0.1]]
        cells.append(cell)
    manifest = {
        "dreamjax_version": "0.1.0", "created": "2025-01-01T00:00:00", "backbone": "efficientnet_lite0",
        "weights_id": "ab" * 32,
        "paintings": {
            "starry": {"path": "/nonexistent/starry.jpg", "sha256": "00", "size": [48, 60], "notes": [],
                       "status": "ok", "error": None},
            "wide one": {"path": "/nonexistent/wide.jpg", "sha256": "01", "size": [90, 40],
                         "notes": ["EXIF orientation 6 applied"], "status": "ok", "error": None},
            "broken": {"path": "/nonexistent/broken.jpg", "sha256": None, "size": None, "notes": [],
                       "status": "failed", "error": "broken.jpg: file is truncated <oops>"},
        },
        "cells": cells,
    }
    files.write_json(root / "manifest.json", manifest)
    return manifest, originals


def test_module_is_jax_free_and_matplotlib_lazy():
    tree = ast.parse(Path(report.__file__).read_text())
    top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    top += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert not [n for n in top if n.split(".")[0] in ("jax", "flax", "matplotlib")], top


def test_comparison_grid_layout_and_captions():
    orig = _painting(300, 240)
    cols = [(f"Set ({i})", 255 - orig) for i in range(1, 5)]
    ch = 128
    g = report.comparison_grid(orig, cols, cell_height=ch)
    m, cell_w, n = max(8, ch // 16), round(ch * 240 / 300), 5
    assert g.mode == "RGB" and g.size[0] == 2 * m + n * cell_w + (n - 1) * m
    a = np.asarray(g)
    assert (a[0] == 255).all() and (a[:, 0] == 255).all()  # white margins
    cap = a[m + ch + 2:, :]  # the caption band under the images
    for i in range(n):  # every column has dark caption text
        x0 = m + i * (cell_w + m)
        assert (cap[:, x0:x0 + cell_w] < 100).any(), f"no caption under column {i}"
    # first column holds the original (scaled), the second the dream
    assert np.abs(a[m + ch // 4, m + cell_w // 2].astype(int) - (200, 120, 40)).max() < 10
    assert np.abs(a[m + ch // 4, 2 * m + cell_w + cell_w // 2].astype(int) - (55, 135, 215)).max() < 10
    titled = report.comparison_grid(orig, cols, cell_height=ch, title="Figure: Different weightings")
    assert titled.size[0] == g.size[0] and titled.size[1] > g.size[1]
    assert (np.asarray(titled)[m:m + 10] < 100).any()


def test_comparison_grid_failed_and_missing_cells():
    orig = _painting()
    g = np.asarray(report.comparison_grid(orig, [("a", "failed: boom"), ("b", None), ("c", "pending")],
                                          cell_height=64))
    assert g.shape[2] == 3 and (np.abs(g.astype(int) - report.FAIL_FILL).sum(-1) == 0).sum() > 100


def test_contact_sheet_rows():
    rows = [("starry", [("original", _painting()), ("set1", _painting()), ("set2", "failed: x")]),
            ("wide", [("original", _painting(40, 90)), ("set1", None)])]
    s = report.contact_sheet(rows, cell_height=64, title="all")
    assert s.size[0] > 3 * 64 and s.size[1] > 2 * 64


def test_summary_csv_matches_manifest(tmp_path):
    manifest, _ = make_sweep(tmp_path)
    path = report.write_summary_csv(tmp_path / "summary.csv", manifest["cells"])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [c["id"] for c in manifest["cells"]]
    taps = {t for c in manifest["cells"] for t in c["final_losses"]}
    assert {k[5:] for k in rows[0] if k.startswith("loss.")} == taps
    for r, c in zip(rows, manifest["cells"]):
        assert r["painting"] == c["painting"] and r["status"] == c["status"] and r["label"] == c["label"]
        assert r["overrides"] == " ".join(c["overrides"])
        assert r["error"] == (c["error"] or "")
        for t in taps:
            want = c["final_losses"].get(t)
            assert (r[f"loss.{t}"] == "") if want is None else float(r[f"loss.{t}"]) == want  # exact
        assert (r["final_loss"] == "") if c["final_loss"] is None else float(r["final_loss"]) == c["final_loss"]
        assert float(r["seconds.compile"]) == c["seconds"]["compile"] and float(r["seconds.run"]) == c["seconds"]["run"]
        assert float(r["hyper.step_size"]) == c["hyper"]["step_size"]
        assert r["output.dream"] == c["outputs"]["dream"]
        assert r["output.octaves"].split(";") == c["outputs"]["octaves"]
    assert not list(tmp_path.glob(".*.tmp"))


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.text: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        for k, v in attrs:
            if (tag, k) in (("img", "src"), ("a", "href"), ("link", "href")):
                self.refs.append((tag, v))

    def handle_data(self, data):
        self.text.append(data)


def _parse_gallery(html_path: Path) -> _Links:
    p = _Links()
    p.feed(html_path.read_text(encoding="utf-8"))
    return p


def test_write_sweep_report_and_gallery(tmp_path):
    manifest, originals = make_sweep(tmp_path)
    (tmp_path / "analysis.md").write_text("# notes\n")
    out = report.write_sweep_report(tmp_path, manifest, originals, cell_height=64, sheet_cell_height=48,
                                    analysis={"0000": {"psnr": 12.5}}, analysis_md_path=tmp_path / "analysis.md")
    assert set(out["grids"]) == {"starry", "wide one"}  # the failed painting has no cells, no original
    for p in [*out["grids"].values(), *out["originals"].values(), out["all_cells"], out["summary_csv"],
              out["index_html"]]:
        assert Path(p).is_file(), p
    assert out["grids"]["wide one"].name == "wide_one.jpg"
    grid = Image.open(out["grids"]["starry"])
    ref = report.comparison_grid(originals["starry"], [("x", None)] * 3, title="starry", cell_height=64)
    assert grid.size[0] == ref.size[0]  # original + 3 cells (failed one included)

    parsed = _parse_gallery(out["index_html"])
    assert parsed.scripts == 0  # the error's <script> is text, not a tag
    rel = [(t, v) for t, v in parsed.refs if not urlparse(v).scheme and not v.startswith("#")]
    assert rel and len(rel) == len(parsed.refs)
    for tag, ref in rel:
        assert not ref.startswith("/"), ref
        assert (tmp_path / unquote(ref)).is_file(), f"{tag} -> {ref} does not exist"
    hrefs = {v for _, v in parsed.refs}
    for needed in ["summary.csv", "manifest.json", "grids/starry.jpg", "grids/wide_one.jpg", "grids/all_cells.jpg",
                   "analysis.md", "0/frames.gif", "originals/starry.jpg"]:
        assert needed in hrefs, needed
    text = "".join(parsed.text)
    assert EVIL in text and "file is truncated <oops>" in text and "jellyfish <b>" in text
    raw = out["index_html"].read_text()
    assert "&lt;script&gt;" in raw and "<script>" not in raw
    assert "psnr: 12.5" in text and "42.0%" in text
    assert "efficientnet_lite0" in text and "3 done" in text and "1 failed" in text and "1 pending" in text
    assert "step_size=0.02" in text and "iterations=20" in text  # varying per cell, shared in header
    # the dream links to its GIF
    assert ('a', "0/frames.gif") in parsed.refs and ('img', "0/dream.png") in parsed.refs


def test_gallery_without_originals_or_outputs(tmp_path):
    manifest, _ = make_sweep(tmp_path)
    for c in manifest["cells"]:
        c["outputs"]["gif"] = "missing/frames.gif"
    src = images.save_png(tmp_path / "inputs" / "starry.png", _painting(1000, 800))
    manifest["paintings"]["starry"]["path"] = str(src)
    path = report.write_gallery(tmp_path, manifest)
    parsed = _parse_gallery(path)
    for _, ref in parsed.refs:
        assert (tmp_path / unquote(ref)).is_file(), ref
    assert ("a", "0/dream.png") in parsed.refs  # no GIF: the dream links to itself
    assert ("img", "originals/starry.jpg") in parsed.refs  # thumbnail made from the painting's path
    assert max(Image.open(tmp_path / "originals" / "starry.jpg").size) == report.THUMB_SIDE
    assert not any("wide" in v for t, v in parsed.refs if t == "img" and v.startswith("originals/"))


def test_contact_sheet_stays_viewable_for_big_sweeps():
    h = report._sheet_cell_height([1.5] * 200, ncols=41, nrows=200, wanted=160)
    assert 32 <= h < 160
    assert report._sheet_cell_height([1.0], ncols=5, nrows=3, wanted=160) == 160


def test_plot_losses(tmp_path):
    pytest.importorskip("matplotlib")
    manifest, _ = make_sweep(tmp_path)
    p = report.plot_losses(tmp_path, manifest, tmp_path / "losses.png")
    assert p is not None and Image.open(p).size[0] > 100
    assert report.plot_losses(tmp_path, manifest, tmp_path / "x.png", series="nope") is None
    run_format = {"taps": ["mixed4", "mixed5"], "layer_weights": [1.0, 2.0],
                  "octaves": [{"octave": 0, "shape": [8, 8], "per_tap": [[1.0, 2.0], [2.0, 3.0]]},
                              {"octave": 1, "shape": [12, 12], "per_tap": [[3.0, 4.0]]}]}
    assert report._loss_series(run_format) == {"mixed4": [1.0, 2.0, 3.0], "mixed5": [2.0, 3.0, 4.0],
                                               "total": [5.0, 8.0, 11.0]}


def test_published_study_index_opens_from_the_committed_folder():
    """results/<study>/index.html links only files committed beside it."""
    import re
    from urllib.parse import unquote

    from tests.helpers import REPO

    pages = sorted((REPO / "results").glob("*/index.html"))
    assert {p.parent.name for p in pages} >= {"quickstart", "seed_study_offline"}
    for page in pages:
        links = re.findall(r"(?:src|href)='([^']+)'", page.read_text())
        assert any(link.endswith(".jpg") for link in links), page
        missing = [link for link in links if not (page.parent / unquote(link)).is_file()]
        assert not missing, (page, missing)
