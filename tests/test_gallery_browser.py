"""The analysed gallery (index.html) in a real headless Chromium, from disk (file://).

Checks that every image renders (the gallery's inline self-check script reports, after load,
``<body data-images=N data-broken=K>``; read with ``--dump-dom``), that the check does catch
a broken image, that every relative link exists on disk, and that a screenshot is not blank.
Skipped when no Chromium is installed (CI installs it with ``apt-get install chromium``).
"""
from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamjax.outputs import analysis, report
from tests import fake_sweep

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    why = (f"chromium not installed: none of {', '.join(BROWSERS)} is on PATH "
           "(install it with `apt-get install -y chromium` to run the gallery browser test)")
    if os.environ.get("DREAMJAX_CI"):  # CI installs it (.ci/run): there, a missing browser is a failure
        pytest.fail(why)
    pytest.skip(why)


def _chrome(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'chrome-profile'}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish in 90 s: {' '.join(cmd)}")


def _body_data(dom: str) -> dict:
    m = re.search(r"<body([^>]*)>", dom)
    assert m, f"no <body> in the dumped DOM: {dom[:300]!r}"
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(1)))


def _self_check(browser: str, tmp: Path, page: Path) -> dict:
    r = _chrome(browser, tmp, "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri() + "#selfcheck")
    assert r.returncode == 0, r.stderr[-2000:]
    data = _body_data(r.stdout)
    assert "broken" in data, f"the gallery's self-check did not run: body {data}"
    return data


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src") and v:
                self.links.append(v)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    clf = fake_sweep.FakeClassifier()
    manifest = fake_sweep.build_sweep(root, clf)
    sweep_dir = root / "sweep"
    report.write_sweep_report(sweep_dir, manifest, {})
    analysis.analyze(sweep_dir, classifier=clf)
    return sweep_dir


def test_every_relative_link_exists(gallery):
    p = _Links()
    p.feed((gallery / "index.html").read_text())
    rel = [u for u in p.links if not urllib.parse.urlparse(u).scheme and not u.startswith("#")]
    assert len(rel) > 20
    missing = [u for u in rel if not (gallery / urllib.parse.unquote(u.split("#")[0])).is_file()]
    assert not missing, f"links to missing files: {missing}"
    for needed in ("analysis.md", "analysis/loss_curves.png", "analysis/families.png", "analysis/change.png",
                   "0/alpha/frames.gif", "originals/alpha.jpg"):
        assert needed in rel, needed


def test_every_image_renders_in_chromium(gallery, tmp_path):
    browser = _browser()
    data = _self_check(browser, tmp_path, gallery / "index.html")
    # 3 originals + 5 finished dreams (the failed cell is a red box, not an image)
    assert data["images"] == "8", data
    assert data["broken"] == "0", f"images that did not render: {data.get('broken-src')}"

    # The check itself catches a broken image: same page, one dream pointing at a missing file.
    text = (gallery / "index.html").read_text()
    assert 'src="0/beta/dream.png"' in text
    bad = gallery / "broken_check.html"
    bad.write_text(text.replace('src="0/beta/dream.png"', 'src="0/beta/no_such_dream.png"', 1))
    try:
        data = _self_check(browser, tmp_path, bad)
    finally:
        bad.unlink()
    assert data["broken"] == "1" and data["broken-src"] == "0/beta/no_such_dream.png", data


def test_screenshot_is_not_blank(gallery, tmp_path):
    browser = _browser()
    shot = tmp_path / "gallery.png"
    r = _chrome(browser, tmp_path, "--window-size=1280,2000", "--virtual-time-budget=10000",
                f"--screenshot={shot}", (gallery / "index.html").resolve().as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    keep = os.environ.get("DREAMJAX_TEST_ARTIFACTS")  # CI can keep the screenshot to look at
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "gallery_screenshot.png")
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        px = np.asarray(im.convert("RGB")).astype(np.float64)
    assert px.std() > 20, "screenshot is (nearly) uniform"
    non_white = (px.min(axis=2) < 235).mean()
    assert non_white > 0.05, f"screenshot is almost all background ({non_white:.1%} drawn)"
    # the first dream row is drawn where the gallery puts it: image content, not background
    top = px[:700]
    assert (top.std(axis=2) > 10).mean() > 0.02, "no coloured image content near the top"
