"""A motion sweep's gallery in headless Chromium: each cell's MP4 is a <video> that plays
(its currentTime advances), and the summary lists frames and stability. Skipped without
Chromium, PyAV or OpenCV."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("cv2")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_dreamjax_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WRAPPER = """<html><body onload="var b=frames[0].document.body;
for (var k in b.dataset) document.body.dataset[k]=b.dataset[k];">
<iframe src="index.html" width="800" height="600"></iframe><img src="/__slow__.gif"></body></html>"""


def _played(browser_test, browser, tmp_path, page: Path) -> dict:
    """Serve the gallery over HTTP inside a wrapper page whose load event waits ~3 s of real time
    (a slow image), so the gallery's video check has sampled ``currentTime`` twice in real time
    before ``--dump-dom`` (virtual time does not move a media clock); the wrapper copies the
    gallery's ``<body data-*>`` onto its own body."""
    import functools
    import http.server
    import threading
    import time

    (page.parent / "_wrapper.html").write_text(WRAPPER)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/__slow__"):
                time.sleep(3.0)
                body = bytes.fromhex("47494638396101000100800000000000ffffff21f904010000000"
                                     "02c00000000010001000002024401003b")  # a 1x1 GIF
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(page.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/_wrapper.html"
        r = browser_test._chrome(browser, tmp_path, "--autoplay-policy=no-user-gesture-required", "--dump-dom", url)
    finally:
        server.shutdown()
        (page.parent / "_wrapper.html").unlink()
    assert r.returncode == 0, r.stderr[-2000:]
    return browser_test._body_data(r.stdout)


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_gallery_video_plays_in_chromium(tmp_path):
    browser_test = _load("test_gallery_browser")
    browser = browser_test._browser()
    ms = _load("test_motion_sweep")
    from dreamjax.outputs import video
    from dreamjax.sweep import jobs

    clip = video.write_synthetic_video(tmp_path / "clip.mp4", 24, 96, 128)
    recs, _, _ = ms._render(ms._video_cfg(clip, "video.flow=dis"), tmp_path / "run")
    assert recs[0]["status"] == "done", recs[0].get("error")
    jobs.collect(tmp_path / "run", analyze=False)
    page = tmp_path / "run" / "index.html"
    html = page.read_text()
    assert '<video src="clip/video.mp4"' in html and "24 frames" in html
    data = _played(browser_test, browser, tmp_path, page)
    assert data.get("videos") == "1", data
    t1, t2 = float(data["video-first"]), float(data["video-second"])
    assert data.get("videos-playing") == "1" and t2 > t1 >= 0 and t2 > 0, data
    with open(tmp_path / "run" / "summary.csv") as f:
        row = next(csv.DictReader(f))
    assert row["frames"] == "24" and float(row["stability.with_flow"]) > 0
