"""Issue 12: nothing wrong (every mistake before compute), nothing mixed (a run lock, content-addressed
cells), nothing lost (bad files fail alone), honest exit codes. Tiny backbone, tiny sizes."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import dreamjax as dj
from dreamjax import config, files
from dreamjax.config import ConfigError
from dreamjax.sweep import grid, jobs
from tests.conftest import PAINTINGS

TINY = ["model=tiny", "layers=tiny_set1", "dream=dlwp", "dream.num_octaves=1", "dream.iterations=2",
        "data.image_size=64", "outputs.gif=false", "outputs.octave_images=false", "analyze=false",
        "checkpoint.enabled=false", "dream.border=0"]
STARRY, WAVE, PEARL = (PAINTINGS / f"{n}.jpg" for n in ("van_gogh_starry_night", "hokusai_great_wave",
                                                        "vermeer_girl_with_a_pearl_earring"))


def run(*args, cwd, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "dreamjax.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=e, timeout=600)


def composed(overrides):
    with initialize_config_dir(dj.config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ---------------------------------------------------------------------------------------------
# One validation pass: every value checked by key


@pytest.mark.parametrize("override, message", [
    ("batch_size=abc", "batch_size: 'abc' is not an integer"),
    ("seed=abc", "seed: 'abc' is not an integer"),
    ("dream.tile_size=abc", "dream.tile_size: 'abc' is not an integer or 'auto'"),
    ("data.image_size=96.5", "data.image_size: 96.5 is not an integer"),
    ("resume=maybe", "resume: 'maybe' is not allowed; choose one of: auto, false"),
    ("+data.typo=1", "data.typo: unknown key; allowed: image_size, max_pixels, paths, upscale_small"),
    ("+typo=1", "typo: unknown key; allowed: analyze, augment, batch_size"),
    ("+dream.stepsize=1", "dream.stepsize: unknown key"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps: 0 must be >= 1"),
    ("outputs.gif_max_side=0", "outputs.gif_max_side: 0 must be >= 1"),
    ("dream.norm=l3", "dream.norm: 'l3' is not allowed; choose one of: l2, mean_abs, std"),
    ("dream.objective=mean_sqare", "dream.objective: 'mean_sqare' is not allowed; choose one of: mean_square"),
    ("dream.optimizer=adamw", "dream.optimizer: 'adamw' is not allowed; choose one of: sgd, adam"),
    ("dream.compute_dtype=fp16", "dream.compute_dtype: 'fp16' is not allowed; choose one of: float32"),
    ("dream.cpu_kernels=mkl", "dream.cpu_kernels: 'mkl' is not allowed; choose one of: auto, xla, onednn"),
    ("dream.step_size=abc", "dream.step_size: 'abc' is not a number"),
    ("dream.step_size=0", "dream.step_size: 0 must be > 0"),
    ("model.straight_through=maybe", "model.straight_through: 'maybe' is not a boolean"),
    ("layers.weights=[1.0,x]", "layers.weights[1]: 'x' is not a number"),
])
def test_every_value_is_checked_by_key(override, message):
    with pytest.raises(ConfigError) as e:
        config.validate(composed(TINY + [override]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cpu_kernels_and_defaults_validate():
    c = config.validate(composed(TINY + ["dream.cpu_kernels=onednn", "dream.tile_size=auto"]))
    assert c.dream.cpu_kernels == "onednn" and c.dream.tile_size == "auto" and c.data.image_size == 64
    for e in ("quickstart", "seed_study", "seed_study_offline"):
        config.validate(composed([f"+experiment={e}"]))


def test_peak_memory_is_estimated_before_compute():
    with pytest.raises(ConfigError, match=r"data.image_size: 100000 needs an estimated .* GiB of memory .* "
                                          r"but this machine has .* GiB; lower data.image_size"):
        jobs.plan(composed(TINY + ["data.image_size=100000", f"data.paths={STARRY}"]), job=0, job_dir="/tmp/x")


@pytest.mark.parametrize("content, message", [
    (None, "no such file|not found"), (b"", "."), (b"hello, not weights\n", "."), ("trunc", "."), ("evil", "."),
])
def test_every_weights_problem_is_one_error_at_plan_time(tmp_path, content, message):
    from dreamjax.weights.keras_h5 import WeightsError

    f = tmp_path / "w.pth"
    if content == "trunc":
        src = Path(__file__).parent / "data" / "small_zip.pth"
        f.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif content == "evil":
        import pickle

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))

        f.write_bytes(pickle.dumps(Evil()))
    elif content is not None:
        f.write_bytes(content)
    with pytest.raises(WeightsError, match=message) as e:
        jobs.load_weights(config.Model(name="efficientnet_lite0", weights=str(f)))
    assert str(e.value).startswith("model.weights=") and "\n" not in str(e.value)


def test_offline_auto_weights_fail_at_plan_time(tmp_path, monkeypatch):
    from dreamjax.weights.keras_h5 import WeightsError

    monkeypatch.setenv("DREAMJAX_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("DREAMJAX_WEIGHTS_URL", "http://127.0.0.1:9/")  # nothing listens: offline
    with pytest.raises(WeightsError, match="download failed"):
        jobs.load_weights(config.Model(name="inception_v3", weights="auto"))


@pytest.mark.slow  # a long test (a CLI run or a full forward): the slow suite, which CI runs
def test_sweep_typo_in_one_job_stops_every_job_before_compute(tmp_path):
    p = run("-m", *TINY, f"data.paths={STARRY}", "dream.norm=l2,bogus", f"hydra.sweep.dir={tmp_path / 'sw'}",
            cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert err[-1] == "dreamjax: error: dream.norm: 'bogus' is not allowed; choose one of: l2, mean_abs, std", err
    assert "Traceback" not in p.stderr and "Error executing job" not in p.stderr
    assert not list((tmp_path / "sw").rglob("cell.json")) and not (tmp_path / "sw" / jobs.SWEEP_RECORD).exists()
    full = run("-m", *TINY, f"data.paths={STARRY}", "dream.norm=bogus", f"hydra.sweep.dir={tmp_path / 'sw'}",
               cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 2 and "Traceback" in full.stderr


# ---------------------------------------------------------------------------------------------
# The run lock; a failed config claims nothing


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_failed_config_leaves_no_claim_and_a_held_folder_names_its_holder(tmp_path):
    out = tmp_path / "r"
    p = run(*TINY, f"data.paths={STARRY}", "batch_size=abc", f"hydra.run.dir={out}", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        "dreamjax: error: batch_size: 'abc' is not an integer", p.stderr[-2000:]
    assert not (out / jobs.SWEEP_RECORD).exists() and not (out / jobs.PLAN).exists()
    with files.FolderLock(out, {"command": "the other run"}):  # another process holds the folder
        p = run(*TINY, f"data.paths={STARRY}", f"hydra.run.dir={out}", cwd=tmp_path)
        assert p.returncode == 4, p.stderr[-2000:]
        assert f"in use by another dreamjax run: pid {os.getpid()} on" in p.stderr and "the other run" in p.stderr
        assert not (out / jobs.SWEEP_RECORD).exists()
    p = run(*TINY, f"data.paths={STARRY}", f"hydra.run.dir={out}", cwd=tmp_path)  # the corrected command
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["counts"]["done"] == 1


def test_folder_lock_is_exclusive_and_survives_its_owner_dying(tmp_path):
    code = ("import sys, time; from dreamjax import files; files.FolderLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(files.FolderLocked, match=f"pid {holder.pid} on "):
            files.FolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = files.FolderLock(tmp_path).acquire()  # the dead owner's lock is taken over
    assert lock.previous.get("pid") == holder.pid
    lock.release()


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_two_sweeps_racing_on_one_name_exactly_one_runs(tmp_path):
    out = tmp_path / "r"
    procs = [subprocess.Popen([sys.executable, "-m", "dreamjax.cli", *TINY, f"data.paths={STARRY}", f"seed={s}",
                               f"hydra.run.dir={out}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in (1, 2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes[0] == 0 and codes[1] in (2, 4), results  # 4: held now; 2: the other sweep's folder
    loser = next(err for c, err in results if c != 0)
    assert "in use by another dreamjax run: pid" in loser or "already holds the results of another sweep" in loser
    seeds = {json.loads(p.read_text())["config"]["seed"] for p in out.rglob("cell.json")}
    assert len(seeds) == 1


# ---------------------------------------------------------------------------------------------
# Content-addressed cells, manifests from the plan


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_edited_painting_is_recomputed_and_removed_one_is_stale(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in (STARRY, WAVE):
        shutil.copy(p, src / p.name)
    out = tmp_path / "r"
    args = [*TINY, f"data.paths={src}", f"hydra.run.dir={out}"]
    assert run(*args, cwd=tmp_path).returncode == 0
    starry = out / STARRY.stem / "dream.png"
    first = starry.read_bytes()
    # edit the pixels in place (same name, same size): the old dream must not be kept
    im = np.asarray(Image.open(src / STARRY.name).convert("RGB")).copy()
    im[: im.shape[0] // 2] = 255 - im[: im.shape[0] // 2]
    Image.fromarray(im).save(src / STARRY.name, quality=95)
    p = run(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    stats = json.loads((out / "run_stats.json").read_text())
    assert stats["cells_skipped"] == 1 and stats["cells_done"] == 1
    assert starry.read_bytes() != first
    rec = json.loads((out / STARRY.stem / "cell.json").read_text())
    assert rec["painting_sha256"] == files.file_sha256(src / STARRY.name)
    assert rec["weights_id"].startswith("tiny-random") and rec["config"]["data"]["image_size"] == 64
    assert rec["code_version"] and rec["label"].startswith("tiny_set1 · ")  # the set + the dream overrides
    m = json.loads((out / "manifest.json").read_text())
    assert m["cells"][0]["label"] == rec["label"]
    # a painting removed from the folder: not part of the run any more, its files stay, listed as stale
    (src / WAVE.name).unlink()
    assert run(*args, cwd=tmp_path).returncode == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [c["painting"] for c in m["cells"]] == [STARRY.stem] and set(m["paintings"]) == {STARRY.stem}
    assert [s["painting"] for s in m["stale"]] == [WAVE.stem] and (out / WAVE.stem / "dream.png").is_file()


@pytest.mark.slow
def test_painting_dropped_from_an_explicit_list_is_stale_not_another_sweep(tmp_path):
    out = tmp_path / "r"
    assert run(*TINY, f"data.paths=[{STARRY},{WAVE}]", f"hydra.run.dir={out}", cwd=tmp_path).returncode == 0
    p = run(*TINY, f"data.paths=[{STARRY}]", f"hydra.run.dir={out}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert [c["painting"] for c in m["cells"]] == [STARRY.stem] and [s["painting"] for s in m["stale"]] == [WAVE.stem]
    assert json.loads((out / "run_stats.json").read_text())["cells_skipped"] == 1


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_same_relative_paths_from_two_folders_are_two_sweeps(tmp_path):
    for d, p in (("a", STARRY), ("b", WAVE)):
        (tmp_path / d / "in").mkdir(parents=True)
        shutil.copy(p, tmp_path / d / "in" / "x.jpg")
    out = tmp_path / "r"
    assert run(*TINY, "data.paths=in", f"hydra.run.dir={out}", cwd=tmp_path / "a").returncode == 0
    p = run(*TINY, "data.paths=in", f"hydra.run.dir={out}", cwd=tmp_path / "b")
    assert p.returncode == 2 and "already holds the results of another sweep (inputs" in p.stderr, p.stderr[-2000:]


def test_fingerprint_follows_content_not_location():
    base = dict(job=0, job_dir="/j", painting="p", painting_path="/a/p.jpg", backbone="tiny", weights="auto",
                straight_through=False, layers="l", taps=("conv2",), layer_weights=(1.0,), step_size=1.0,
                max_loss=1.0, jitter=0, iterations=1, seed=0, static=(), image_size=64, painting_sha256="aa",
                weights_id="w1")
    f = grid.Cell(**base).fingerprint()
    assert grid.Cell(**base | {"painting_path": "/b/p.jpg", "weights": "/x.pth"}).fingerprint() == f
    assert grid.Cell(**base | {"painting_sha256": "bb"}).fingerprint() != f
    assert grid.Cell(**base | {"weights_id": "w2"}).fingerprint() != f


# ---------------------------------------------------------------------------------------------
# Bad files never stop a sweep; unique readable slugs


def test_slugs_keep_letters_and_never_collide():
    names = ["神奈川沖浪裏.jpg", "富嶽三十六景.jpg", "凱風快晴.jpg", "été.jpg", "ôté.jpg", "a b.jpg", "a_b.jpg"]
    slugs = grid.painting_slugs([grid.PaintingInput(f"/in/{n}") for n in names])
    assert slugs[:5] == ["神奈川沖浪裏", "富嶽三十六景", "凱風快晴", "été", "ôté"]
    assert len(set(slugs)) == len(slugs) and all(s.startswith("a_b-") for s in slugs[5:])
    latin1 = os.fsdecode(b"caf\xe9")  # not UTF-8: a stable slug from its bytes
    assert files.slug(latin1) == files.slug(latin1) == f"caf-{files.short_hash(b'caf' + bytes([0xE9]))}"
    from dreamjax.outputs import report

    assert len({report.safe_name(s) for s in slugs[:3]}) == 3


def test_unreadable_painting_fails_alone(tmp_path, monkeypatch):
    """As root no permission bit stops a read, so the PermissionError is injected where the file is read."""
    from dreamjax.sweep import executor

    src = tmp_path / "in"
    src.mkdir()
    for p in (STARRY, WAVE):
        shutil.copy(p, src / p.name)
    real = files.file_sha256

    def sha(path, *a, **k):
        if Path(path).name == WAVE.name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(files, "file_sha256", sha)
    inputs = executor.plan_inputs([str(src)])
    bad = [i for i in inputs if i.error]
    assert len(inputs) == 2 and len(bad) == 1 and "cannot read (Permission denied)" in bad[0].error
    cells = jobs.plan(composed(TINY + [f"data.paths={src}"]), job=0, job_dir=tmp_path / "r")
    recs = {r["painting"]: r for r in executor.Executor(jobs.options(composed(TINY)))
            .run(cells, checkpoint_root=tmp_path / "ck")}
    assert recs[STARRY.stem]["status"] == "done" and recs[WAVE.stem]["status"] == "failed"


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_bad_inputs_beside_good_ones_some_failed_exit_code(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    cjk = ["神奈川沖浪裏", "富嶽三十六景", "凱風快晴"]
    for name, p in zip(cjk, (STARRY, WAVE, PEARL)):
        shutil.copy(p, src / f"{name}.jpg")
    shutil.copy(STARRY, os.path.join(os.fsencode(src), b"caf\xe9.jpg"))  # a latin-1 file name
    os.symlink(src / "gone.jpg", src / "broken.jpg")  # a broken symbolic link
    out = tmp_path / "r"
    p = run(*TINY, f"data.paths=[{src},{tmp_path / 'missing.jpg'}]", f"hydra.run.dir={out}", cwd=tmp_path)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "cell(s) failed" in p.stderr.strip().splitlines()[-1]
    m = json.loads((out / "manifest.json").read_text())
    status = {c["painting"]: c["status"] for c in m["cells"]}
    assert [status[n] for n in cjk] == ["done"] * 3
    latin = [n for n in status if n.startswith("caf-")]
    assert len(latin) == 1 and status[latin[0]] == "done"
    assert status["broken"] == "failed" and status["missing"] == "failed"
    errors = {c["painting"]: c["error"] for c in m["cells"]}
    assert "broken symbolic link" in errors["broken"] and "missing.jpg" in errors["missing"]
    assert all((out / "grids" / f"{n}.jpg").is_file() for n in cjk)  # three CJK names, three grids


@pytest.mark.slow  # a CLI run of its own: the slow suite (CI runs it)
def test_all_cells_failed_exit_code(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "worse.jpg").write_bytes(b"")
    p = run(*TINY, f"data.paths={tmp_path}", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert p.returncode == 3 and "2 cell(s) failed" in p.stderr and "0 done" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_ctrl_c_exit_code_is_130(tmp_path):
    out = tmp_path / "r"
    args = [a for a in TINY if not a.startswith(("checkpoint.", "dream.iterations"))]
    proc = subprocess.Popen([sys.executable, "-m", "dreamjax.cli", *args, "dream.iterations=20000",
                             "dream.frame_every=0",
                             "checkpoint.enabled=true", "checkpoint.every_steps=1", f"data.paths={STARRY}",
                             f"hydra.run.dir={out}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((out / ".checkpoints").rglob("*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(2)
        assert proc.wait(timeout=300) == 130, proc.stdout.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_layer_sets_that_refer_to_the_model_resolve():
    c, sets = jobs.check_config(composed(["model=tiny", "layer_sets=[study_set1,tiny_set3]"]))
    assert [s.name for s in sets] == ["tiny_set1", "tiny_set3"] and sets[0].taps == ["conv1", "conv2", "conv3", "conv4"]
    with pytest.raises(ConfigError, match=r"layer_sets\[1\]: 'nope' is not a layer set; allowed: .*tiny_set1"):
        jobs.check_config(composed(["model=tiny", "layer_sets=[tiny_set1,nope]"]))
