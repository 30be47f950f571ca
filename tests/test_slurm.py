"""The submitit launcher (hydra/launcher=dreamjax_slurm[_local]).

Fast: the task split and the Checkpointable contract. Slow: real sweeps through submitit's
local executor (the same code path as SLURM, tasks are local processes): a complete sweep of
2 array tasks; a task preempted (USR2, as SLURM does) is requeued by submitit through
``checkpoint()`` and resumes from its orbax checkpoint; a task SIGKILLed mid-way is resubmitted
by rerunning the same command and resumes. Outputs equal the batched launcher's bytes.
"""
import json
import pickle
from pathlib import Path

import pytest
import submitit

from dreamjax.sweep import slurm
from dreamjax.sweep.grid import Cell
from tests.helpers import assert_complete_and_identical, cli  # noqa: F401


def _cell(job, sig="a"):
    return Cell(job=job, job_dir=f"/x/{job}", painting="p", painting_path="/p.jpg", backbone="tiny",
                weights=sig, straight_through=False, layers="l", taps=("conv2",), layer_weights=(1.0,),
                step_size=1.0, max_loss=float("inf"), jitter=0, iterations=2, seed=0, static=(), image_size=96)


def test_split_whole_batches_by_signature():
    cells = [_cell(i, "a") for i in range(5)] + [_cell(5 + i, "b") for i in range(3)]
    chunks = slurm.split_cells(cells, batch_size=2, cells_per_task=3)  # rounded up to 4 = two batches
    assert [[c.job for c in ch] for ch in chunks] == [[0, 1, 2, 3], [4], [5, 6, 7]]
    assert slurm.split_cells(cells, 2, tasks=2) == slurm.split_cells(cells, 2, cells_per_task=4)
    assert [len(ch) for ch in slurm.split_cells(cells, 8)] == [5, 3]  # default: one task per signature


def test_task_is_checkpointable_and_pickles():
    t = slurm.SweepTasks({"batch_size": 2}, "/tmp/sw", "dreamjax -m ...")
    assert isinstance(t, submitit.helpers.Checkpointable)
    cells = [_cell(0)]
    d = t.checkpoint(3, cells)
    assert isinstance(d, submitit.helpers.DelayedSubmission)
    assert d.function is t and d.args == (3, cells)
    assert pickle.loads(pickle.dumps(d)).args[1][0].id == cells[0].id


def test_executor_parameters_pass_through(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{__import__('os').environ['PATH']}")  # submitit looks for srun
    params = {"submitit_executor": "slurm", "cells_per_task": 4, "timeout_min": 90, "gpus_per_node": 1,
              "cpus_per_task": 8, "mem_gb": 32, "partition": "gpu", "qos": None,
              "additional_parameters": {"account": "proj"}, "signal_delay_s": 120, "array_parallelism": 8}
    ex = slurm.make_executor(params, tmp_path / "%j")
    p = ex._executor.parameters
    assert p["partition"] == "gpu" and p["gpus_per_node"] == 1 and p["cpus_per_task"] == 8
    assert p["time"] == 90 and p["mem"] == "32GB" and p["additional_parameters"] == {"account": "proj"}
    assert p["signal_delay_s"] == 120 and p["array_parallelism"] == 8 and "qos" not in p
    sbatch = ex._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    assert "#SBATCH --partition=gpu" in sbatch and "#SBATCH --account=proj" in sbatch
    assert "#SBATCH --signal=USR2@120" in sbatch


LOCAL = ["hydra/launcher=dreamjax_slurm_local", "hydra.launcher.cells_per_task=2"]


def _task_logs(sw: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (sw / ".submitit").rglob("*_log.*"))


def _task_stats(sw: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((sw / ".submitit").glob("task_*_stats.json"))]


@pytest.mark.slow
def test_local_executor_sweep_of_two_tasks_is_complete(reference, tmp_path):  # noqa: F811
    sw = tmp_path / "sw"
    p = cli(sw, *LOCAL)
    assert "2 array tasks" in p.stdout + p.stderr
    assert len(_task_stats(sw)) == 2
    assert_complete_and_identical(reference, sw)
    assert (sw / "index.html").is_file() and (sw / "summary.csv").is_file()


@pytest.mark.slow
def test_preempted_task_is_requeued_and_resumes(reference, tmp_path):  # noqa: F811
    sw = tmp_path / "sw"
    # The first task to finish its 2nd chunk of steps gets USR2 (SLURM's preemption/timeout signal):
    # submitit calls SweepTasks.checkpoint() and requeues it; the requeued task resumes.
    env = {"DREAMJAX_TEST_KILL_AT": "step:2:USR2", "DREAMJAX_TEST_KILL_ONCE": str(tmp_path / "fired")}
    cli(sw, *LOCAL, env=env)
    assert (tmp_path / "fired").exists()
    logs = _task_logs(sw)
    assert "preempted or timed out: resubmitting" in logs and "resumed batch" in logs, logs[-4000:]
    assert_complete_and_identical(reference, sw)


@pytest.mark.slow
def test_killed_task_resubmitted_by_the_same_command_resumes(reference, tmp_path):  # noqa: F811
    sw = tmp_path / "sw"
    env = {"DREAMJAX_TEST_KILL_AT": "step:3", "DREAMJAX_TEST_KILL_ONCE": str(tmp_path / "fired")}
    p = cli(sw, *LOCAL, env=env, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "array tasks failed" in out and "rerun the same command" in out, out[-3000:]
    p = cli(sw, *LOCAL)
    out = p.stdout + p.stderr
    assert "1 with work left" in out, out[-3000:]
    assert "resumed batch" in _task_logs(sw)
    assert_complete_and_identical(reference, sw)
