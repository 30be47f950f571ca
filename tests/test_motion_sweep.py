"""Zoom loops and videos through the real engine (tiny backbone, small sizes).

* a zoom loop of 2 cells x 6 frames batched equals each cell rendered alone (1e-5, float frames),
  with one compiled dream program for all frames;
* a 12-frame synthetic video with flow: frame t depends on source frames <= t only, and the
  flow-warped render is more stable than the unwarped one;
* the MP4 decodes to the expected frames and size and keeps the audio; frame ranges;
* bad inputs each fail their own cell with one line naming the file, the others finish.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("av")
pytest.importorskip("cv2")

import dreamjax as dj  # noqa: E402
from dreamjax.outputs import video  # noqa: E402
from dreamjax.sweep import executor, jobs  # noqa: E402
from dreamjax.sweep import motion as msweep  # noqa: E402
from tests import make_bad_videos  # noqa: E402
from tests.conftest import PAINTINGS  # noqa: E402

TINY = ["model=tiny", "layers=tiny_default", "dream=dlwp", "dream.num_octaves=1", "dream.iterations=2",
        "dream.frame_every=0", "dream.border=0", "analyze=false"]


def _cfg(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(dj.config_dir(), version_base="1.3"):
        return jobs._plain(compose("config", overrides=list(overrides)))


def _render(cfg, job_dir, batch_size=8, cells=None):
    """Plan + run in-process; returns (records, {cell id: [float frames]}, executor)."""
    floats: dict[str, list] = {}

    def keep(t, batch, states):
        for c, s in zip(batch, states):
            floats.setdefault(c.id, []).append(np.array(s))

    cells = cells if cells is not None else jobs.plan(cfg, job=0, job_dir=job_dir)
    ex = executor.Executor(executor.RunOptions(batch_size=batch_size, progress=False, gif_max_side=64))
    recs = msweep.MotionRunner(ex, on_frame=keep).run(cells, checkpoint_root=Path(job_dir) / ".checkpoints")
    return recs, floats, ex


def _frames_of(rec) -> list[np.ndarray]:
    return [np.asarray(Image.open(Path(rec["job_dir"]) / f)) for f in rec["outputs"]["frames"]]


# ----------------------------------------------------------------------------------------------
# Zoom loop
# ----------------------------------------------------------------------------------------------
def test_zoom_loop_batched_equals_each_cell_alone(tmp_path):
    cfg = _cfg(TINY + ["motion=zoom", "motion.frames=6", "data.image_size=64", "layer_sets=[tiny_set1,tiny_set2]",
                       f"data.paths=[{PAINTINGS / 'munch_the_scream.jpg'}]"])
    cells = jobs.plan(cfg, job=0, job_dir=tmp_path / "a")
    assert len(cells) == 2
    # per-cell motion: the second chain zooms more and turns
    m = dict(cells[1].motion) | {"zoom": 1.12, "angle": 4.0, "shift": (1.0, -2.0)}
    cells[1] = dataclasses.replace(cells[1], motion=tuple(sorted(m.items())))

    recs, batched, ex = _render(cfg, tmp_path / "a", cells=cells)
    assert [r["status"] for r in recs] == ["done", "done"]
    assert ex.stats["batches"] == 1 and ex.stats["programs"] == 1  # one dream program for all 6 frames
    alone = {}
    for c in cells:
        single = dataclasses.replace(c, job_dir=str(tmp_path / "b"))
        _, fl, _ = _render(cfg, tmp_path / "b", batch_size=1, cells=[single])
        alone.update(fl)
    for cid in batched:
        assert len(batched[cid]) == len(alone[cid]) == 6
        for t, (x, y) in enumerate(zip(batched[cid], alone[cid])):
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=f"{cid} frame {t}")
    # the two chains really differ (their own zoom), and the frames move
    a, b = (batched[c.id] for c in cells)
    assert np.abs(a[-1] - b[-1]).mean() > 1e-2 and np.abs(a[-1] - a[0]).mean() > 1e-2
    for r in recs:
        out = Path(r["job_dir"])
        assert len(r["outputs"]["frames"]) == 6 and (out / r["outputs"]["video"]).is_file()
        assert (out / r["outputs"]["gif"]).is_file() and (out / r["outputs"]["stability"]).is_file()
        assert Image.open(out / r["outputs"]["gif"]).n_frames == 6
    assert all(executor.is_complete(c) for c in cells)  # records + every output's hash
    assert not (tmp_path / "a" / ".checkpoints").exists() or not any((tmp_path / "a" / ".checkpoints").iterdir())
    # rerun: complete cells are skipped, nothing recomputed
    recs2, fl2, ex2 = _render(cfg, tmp_path / "a", cells=cells)
    assert all(r.get("skipped") for r in recs2) and not fl2


# ----------------------------------------------------------------------------------------------
# Video
# ----------------------------------------------------------------------------------------------
VSIZE = (96, 128)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two lossless 12-frame videos equal up to frame 6, different after; and an H.264 one."""
    d = tmp_path_factory.mktemp("videos")
    a = video.synthetic_frames(12, *VSIZE)
    b = a[:7] + video.synthetic_frames(5, *VSIZE, seed=5, speed=-2)
    assert not np.array_equal(a[8], b[8])
    return {"a": video.write_synthetic_video(d / "a.mkv", frames=a, codec="ffv1"),
            "b": video.write_synthetic_video(d / "b.mkv", frames=b, codec="ffv1"),
            "h264": video.write_synthetic_video(d / "clip.mp4", 12, *VSIZE)}


def _video_cfg(path, *extra):
    return _cfg(TINY + [f"data.video={path}", "data.image_size=96", "dream.step_size=0.5", *extra])


@pytest.fixture(scope="module")
def video_renders(videos, tmp_path_factory):
    d = tmp_path_factory.mktemp("renders")
    out = {}
    for name, src, flow in (("a_dis", "a", "dis"), ("b_dis", "b", "dis"), ("a_none", "a", "none")):
        recs, fl, _ = _render(_video_cfg(videos[src], f"video.flow={flow}"), d / name)
        assert [r["status"] for r in recs] == ["done"], recs[0].get("error")
        out[name] = (recs[0], next(iter(fl.values())))
    return out


def test_video_frame_depends_only_on_frames_up_to_it(video_renders):
    (ra, fa), (rb, fb) = video_renders["a_dis"], video_renders["b_dis"]
    pa, pb = _frames_of(ra), _frames_of(rb)
    assert len(fa) == len(fb) == 12
    for t in range(7):  # sources equal up to 6: so are the dreams, float and bytes
        np.testing.assert_array_equal(fa[t], fb[t], err_msg=f"frame {t}")
        np.testing.assert_array_equal(pa[t], pb[t])
    for t in range(8, 12):  # and they do follow their own sources afterwards
        assert np.abs(fa[t] - fb[t]).mean() > 1e-3, t


def test_flow_makes_the_video_more_stable(video_renders):
    with_flow = video_renders["a_dis"][0]["stability"]["with_flow"]
    without = video_renders["a_none"][0]["stability"]["with_flow"]  # same measure, render without flow
    assert with_flow < without, (with_flow, without)
    rec = json.loads((Path(video_renders["a_dis"][0]["job_dir"]) / "a" / "frames.json").read_text())
    assert len(rec["frames"]) == 12 and all("stability" in f for f in rec["frames"][1:])


def test_mp4_has_the_frames_the_size_and_the_audio(videos, tmp_path):
    recs, _, _ = _render(_video_cfg(videos["h264"]), tmp_path)
    (r,) = recs
    assert r["status"] == "done", r.get("error")
    mp4 = Path(r["job_dir"]) / r["outputs"]["video"]
    info = video.probe(mp4)
    assert info.codec == "h264" and info.has_audio
    frames = video.decode_all(mp4)
    assert len(frames) == 12 and frames[0].shape == (72, 96, 3)  # 128x96 source at long side 96
    a = video.audio_info(mp4)
    assert a["codec"] == "aac" and abs(a["seconds"] - 1.0) < 0.1  # 12 frames at 12 fps
    # the decoded MP4 is close to the frame PNGs (lossy, but the same pictures)
    pngs = _frames_of(r)
    assert np.abs(frames[5].astype(int) - pngs[5].astype(int)).mean() < 6


def test_frame_range_and_every_kth(videos, tmp_path):
    recs, fl, _ = _render(_video_cfg(videos["h264"], "video.start=2", "video.end=10", "video.every=2"), tmp_path)
    (r,) = recs
    frames = json.loads((Path(r["job_dir"]) / "clip" / "frames.json").read_text())["frames"]
    assert [f["source_index"] for f in frames] == [2, 4, 6, 8]
    mp4 = Path(r["job_dir"]) / r["outputs"]["video"]
    assert len(video.decode_all(mp4)) == 4
    assert abs(video.audio_info(mp4)["seconds"] - 8 / 12) < 0.1  # source frames 2..9 at 12 fps


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------
BAD = {
    "truncated": r"truncated\.mp4: not a readable video container .*perhaps truncated; re-export",
    "zero_length": r"empty\.mp4: zero-length file; re-export",
    "audio_only": r"audio_only\.m4a: has no video stream \(it holds audio\)",
    "unknown_codec": r"unknown_codec\.mp4: .*unsupported codec\); re-encode it",
    "size_change": r"size_change\.ts: frame 6 is 96x72 but the frames before it are 128x96 .*re-encode it at one size",
    "image_as_video": r"still\.mp4: is an image, not a video; pass images as data\.paths",
}


def test_bad_videos_fail_alone_with_one_clear_line(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    made = [make(folder) for make in make_bad_videos.ALL.values()]
    video.write_synthetic_video(folder / "good.mp4", 4, *VSIZE)
    # a folder is scanned by video extension (.m4a is not one): the audio file is named explicitly
    recs, _, _ = _render(_video_cfg(f"[{folder},{made[2]}]"), tmp_path / "out")
    by = {r["painting"]: r for r in recs}
    assert by["good"]["status"] == "done"
    assert len(recs) == 7

    for kind, pattern in BAD.items():
        (r,) = [r for r in recs if re.search(pattern.split(":")[0], r["painting_path"] + ":")]
        assert r["status"] == "failed", kind
        err = r["error"]
        assert "\n" not in err and str(folder) in err, err
        assert re.search(pattern, err), f"{kind}: {err}"


def test_video_passed_as_painting_and_missing_video(tmp_path):
    clip = video.write_synthetic_video(tmp_path / "clip.mp4", 4, *VSIZE)
    cfg = _cfg(TINY + ["motion=zoom", "motion.frames=2", "data.image_size=64",
                       f"data.paths=[{clip},{PAINTINGS / 'munch_the_scream.jpg'}]"])
    recs, _, _ = _render(cfg, tmp_path / "out")
    by = {r["painting"]: r for r in recs}
    assert by["munch_the_scream"]["status"] == "done"
    assert by["clip"]["status"] == "failed"
    assert by["clip"]["error"] == (f"ImageError: {clip}: is a video, not a painting; pass videos as "
                                   "data.video=PATH (dreamed frame by frame)")
    from dreamjax.sweep import grid

    with pytest.raises(grid.ConfigError, match=r"data.video: .*nope.mp4: no such file or folder; check data.video"):
        jobs.plan(_video_cfg(tmp_path / "nope.mp4"), job=0, job_dir=tmp_path)


def test_motion_settings_are_checked_before_compute():
    from dreamjax.sweep import grid

    for bad, msg in ((["video.flow=raft"], "video.flow: 'raft' is not allowed"),
                     (["video.blend=1.5"], "video.blend: 1.5 must be in [0, 1]"),
                     (["motion=zoom", "motion.border=wrap"], "motion.border: 'wrap' is not allowed")):
        cfg = _cfg(TINY + (["data.video=x.mp4"] if "video" in bad[0] else []) + bad)
        with pytest.raises(grid.ConfigError, match=re.escape(msg)):
            msweep.settings(cfg)
    assert msweep.settings(_cfg(TINY)) is None


# ----------------------------------------------------------------------------------------------
# SIGKILL mid-render (the real CLI)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kill_at, resumed", [("frame:4", "resuming 1 chains at frame 3"),
                                              ("finish:1", "resuming 2 chains at frame 8")])
def test_killed_video_render_resumes_to_the_same_bytes(tmp_path, kill_at, resumed):
    """frame:4 = frame 3 written, its checkpoint not; finish:1 = two chains (two weight sets), the
    first one's MP4 and record written, the second's not."""
    import os
    import subprocess
    import sys

    clip = video.write_synthetic_video(tmp_path / "clip.mp4", 8, *VSIZE)
    args = [f"data.video={clip}", "data.image_size=96", "dream.step_size=0.5", *TINY]
    if kill_at.startswith("finish"):
        args.append("layer_sets=[tiny_set1,tiny_set2]")

    def run(out, env=None):
        return subprocess.run([sys.executable, "-m", "dreamjax.cli", *args, f"hydra.run.dir={out}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, **(env or {})))

    ref = run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run(tmp_path / "run", {"DREAMJAX_TEST_KILL_AT": kill_at})
    assert killed.returncode == -9, killed.stderr[-3000:]
    cells = sorted(p.parent for p in (tmp_path / "ref").rglob("clip/frames.json"))
    assert len(cells) == (2 if kill_at.startswith("finish") else 1)
    first = tmp_path / "run" / cells[-1].relative_to(tmp_path / "ref")
    assert not (first / "cell.json").exists() and not (first / "video.mp4").exists()
    if kill_at.startswith("frame"):
        assert len(list((first / "frames").glob("*.png"))) == 4
    again = run(tmp_path / "run")
    assert again.returncode == 0, again.stderr[-3000:]
    assert resumed in again.stdout + again.stderr
    for ref_cell in cells:
        cell = tmp_path / "run" / ref_cell.relative_to(tmp_path / "ref")
        a = video.decode_all(ref_cell / "video.mp4")
        b = video.decode_all(cell / "video.mp4")
        assert len(a) == len(b) == 8
        for t, (x, y) in enumerate(zip(a, b)):
            assert np.array_equal(x, y), f"{cell}: decoded frame {t} differs"
        for t in range(8):
            f = f"frames/{t:05d}.png"
            assert (cell / f).read_bytes() == (ref_cell / f).read_bytes(), f
    leftovers = [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp") or ".checkpoints" in p.parts
                 and p.is_file()]
    assert not leftovers, leftovers
    recs = [json.loads(p.read_text()) for p in (tmp_path / "run").rglob("clip/cell.json")]
    assert len(recs) == len(cells) and all(r["status"] == "done" for r in recs)


@pytest.mark.slow
def test_multirun_per_cell_zoom_is_one_batch(tmp_path):
    """``-m motion.zoom=a,b``: two Hydra jobs, one batch of two chains, one dream program."""
    import subprocess
    import sys

    painting = PAINTINGS / "munch_the_scream.jpg"
    p = subprocess.run([sys.executable, "-m", "dreamjax.cli", "-m", "+experiment=zoom", "layer_sets=null", *TINY,
                        "motion.zoom=1.02,1.15", "motion.frames=3", "data.image_size=64",
                        f"data.paths=[{painting}]", f"hydra.sweep.dir={tmp_path / 'sw'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    stats = json.loads((tmp_path / "sw" / "run_stats.json").read_text())
    assert stats["cells_done"] == 2 and stats["batches"] == 1 and stats["programs"] == 1, stats
    a, b = (np.asarray(Image.open(tmp_path / "sw" / j / "munch_the_scream" / "frames" / "00002.png"))
            for j in ("0", "1"))
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() > 2  # their own zoom
    m = json.loads((tmp_path / "sw" / "manifest.json").read_text())
    assert sorted(c["motion"]["zoom"] for c in m["cells"]) == [1.02, 1.15]
