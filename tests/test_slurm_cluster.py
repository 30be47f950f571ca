"""The ``dreamjax_slurm`` launcher on a real SLURM cluster (slow).

``.ci/run`` starts a single-node cluster (Debian's slurmctld + slurmd + munge, no accounting)
with ``.ci/slurm/up`` and exports its ``SLURM_CONF``; by hand: ``eval "$(.ci/slurm/up)"``, then
``python -m pytest -m slow tests/test_slurm_cluster.py``, then ``.ci/slurm/down``. Skipped, with
the reason, when ``sinfo`` is missing or no cluster answers it.

One sweep of 6 cells in 3 array tasks (2 cells, one batch, each), every task paused once after
its 2nd chunk of steps (``DREAMJAX_TEST_KILL_AT=step:2:PAUSE``, a checkpoint of its 1st chunk on
disk), and while paused:

* the first is requeued by the scheduler (``scontrol requeue``, as a preemption does): SLURM
  sends it SIGTERM, it checkpoints and exits, SLURM starts it again, it resumes its batch;
* the second is put past its time limit (``scontrol update TimeLimit=``, shorter than it has
  left): SLURM sends submitit's USR2, submitit calls ``SweepTasks.checkpoint()`` and requeues
  it as timed out, it resumes its batch;
* the third goes on.

The collected sweep equals, byte for byte, the same sweep run locally (``hydra/launcher=dreamjax``);
the report and the analysis step ran once; nothing polled sacct (no accounting here).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import PAINTINGS, assert_complete_and_identical, cli

THREE = [PAINTINGS / f"{n}.jpg" for n in ("kandinsky_composition_vii", "turner_shipwreck", "monet_water_lilies_1919")]
# All three paintings share the 128x192 bucket, so the local run's batches are the tasks' batches.
ARGS = ["-m", "model=tiny", "layers=tiny_set1,tiny_set2", "data.paths=" + ",".join(str(p) for p in THREE),
        "data.image_size=192", "dream=dlwp", "dream.iterations=6", "dream.num_octaves=2", "dream.frame_every=2",
        "checkpoint.every_steps=2", "batch_size=2", "outputs.gif_max_side=96", "analyze=false"]
# timeout_min <= 10: submitit counts any USR2 as a time-out (not a preemption); the warning
# comes signal_delay_s before the end (SLURM checks every 30 s).
SLURM = ["hydra/launcher=dreamjax_slurm", "hydra.launcher.cells_per_task=2", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10", "hydra.launcher.signal_delay_s=240"]


def _cluster_or_skip():
    if shutil.which("sinfo") is None:
        pytest.skip("no SLURM client (sinfo not found); .ci/run installs slurm-client and starts a cluster")
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo timed out: no SLURM controller answers")
    states = p.stdout.split()
    if p.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        why = (p.stderr.strip().splitlines() or [f"node states {states}"])[-1]
        pytest.skip(f"no usable SLURM cluster ({why}); start one with: eval \"$(.ci/slurm/up)\"")


def _job(jid: str) -> dict[str, str]:
    p = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30)
    return dict(tok.split("=", 1) for tok in p.stdout.split() if "=" in tok)


def _minutes(t: str) -> int:
    """SLURM's [D-]HH:MM:SS in whole minutes."""
    days, _, hms = t.rpartition("-")
    h, m, _s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 1440 + h * 60 + m


def _scontrol(*args: str):
    subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True, timeout=30)


def _task_log(sw: Path, jid: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((sw / ".submitit" / jid).glob("*_log.*")))


def _grids(d: Path) -> dict[str, bytes]:
    """The per-painting grids (the contact sheet's title carries the report's creation time)."""
    return {p.name: p.read_bytes() for p in sorted((d / "grids").glob("*.jpg")) if p.name != "all_cells.jpg"}


@pytest.mark.slow
def test_real_slurm_array_requeue_and_time_limit_equal_a_local_sweep(tmp_path):
    _cluster_or_skip()
    ref = tmp_path / "ref"
    cli(ref, args=ARGS)  # the batched local launcher

    sw, pause, log_path = tmp_path / "sw", tmp_path / "pause", tmp_path / "launcher.log"
    pause.mkdir()
    env = dict(os.environ, DREAMJAX_TEST_KILL_AT="step:2:PAUSE", DREAMJAX_TEST_PAUSE_DIR=str(pause))
    env.pop("DREAMJAX_TEST_KILL_ONCE", None)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "dreamjax.cli", *ARGS, f"hydra.sweep.dir={sw}", *SLURM],
                                cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env)
    roles: dict[str, str] = {}  # task id -> requeue | timeout | run
    sped_up: set[str] = set()
    deadline = time.time() + 540
    try:
        while proc.poll() is None:
            assert time.time() < deadline, "the SLURM sweep did not finish in 9 minutes"
            for marker in sorted(pause.glob("*.paused"), key=lambda p: p.stat().st_mtime):
                jid = marker.name[: -len(".paused")]
                if jid in roles:
                    continue
                roles[jid] = ("requeue", "timeout", "run")[min(len(roles), 2)]
                if roles[jid] == "requeue":
                    _scontrol("requeue", jid)  # SIGTERM now; the task checkpoints once it goes on
                    until = time.time() + 60
                    while "SIGTERM received" not in _task_log(sw, jid) and time.time() < until:
                        time.sleep(0.2)
                    (pause / f"{jid}.go").touch()
                elif roles[jid] == "timeout":
                    ran_min = _minutes(_job(jid)["RunTime"])
                    # less than signal_delay_s left: SLURM sends USR2 at its next time-limit check
                    _scontrol("update", f"JobId={jid}", f"TimeLimit={ran_min + 2}")
                else:
                    (pause / f"{jid}.go").touch()
            for jid, role in roles.items():  # a requeued job waits 120 s (SLURM's requeue delay): start it now
                if role in ("requeue", "timeout") and jid not in sped_up:
                    j = _job(jid)
                    if int(j.get("Restarts", 0)) >= 1 and j.get("JobState") == "PENDING":
                        _scontrol("update", f"JobId={jid}", "StartTime=now",
                                  *(["TimeLimit=10"] if role == "timeout" else []))
                        sped_up.add(jid)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        for jid in roles:
            (pause / f"{jid}.go").touch()
    out = log_path.read_text(errors="replace")
    assert proc.returncode == 0, out[-5000:]
    assert sorted(roles.values()) == ["requeue", "run", "timeout"], roles
    by_role = {r: j for j, r in roles.items()}

    # The requeued task: SLURM restarted it, it had checkpointed on SIGTERM and resumed.
    jid = by_role["requeue"]
    assert int(_job(jid).get("Restarts", 0)) == 1
    logs = _task_log(sw, jid)
    assert "SIGTERM received" in logs and "stopped with a checkpoint" in logs, logs[-4000:]
    assert "resumed batch" in logs, logs[-4000:]

    # The task past its time limit: submitit's checkpoint() resubmitted it as timed out; it resumed.
    jid = by_role["timeout"]
    assert int(_job(jid).get("Restarts", 0)) >= 1
    logs = _task_log(sw, jid)
    assert "this job is timed-out" in logs and "preempted or timed out: resubmitting" in logs, logs[-4000:]
    assert "resumed batch" in logs, logs[-4000:]
    assert "FAILED" not in logs, logs[-4000:]

    # One report, one analysis step, no sacct polling without accounting.
    assert out.count("sweep report:") == 1 and out.count("analysis skipped") == 1, out[-5000:]
    assert "sacct" not in out and "Bypassing" not in out, out[-5000:]
    assert "3 array tasks" in out

    assert_complete_and_identical(ref, sw, n_cells=6)
    assert _grids(ref) == _grids(sw) and _grids(ref)
