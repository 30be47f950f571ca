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


def _fake_bin(tmp_path, monkeypatch, name, script):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / name).write_text("#!/bin/sh\n" + script)
    (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{__import__('os').environ['PATH']}")


def test_squeue_watcher_without_accounting(tmp_path, monkeypatch, caplog):
    """No accounting: states come from squeue, a job it no longer lists is over, sacct is never run."""
    _fake_bin(tmp_path, monkeypatch, "sacct", f"touch {tmp_path}/sacct_called\nexit 1\n")
    _fake_bin(tmp_path, monkeypatch, "squeue", "echo '7_0|RUNNING|n1'\necho '7_1|REQUEUED|'\necho '7_2|COMPLETED|n1'\n")
    w = slurm.SqueueWatcher()
    for j in ("7_0", "7_1", "7_2", "7_3"):
        w.register_job(j)
    w.update()
    assert [w.is_done(j, mode="cache") for j in ("7_0", "7_1", "7_2", "7_3")] == [False, False, True, True]
    assert w.get_state("7_3", mode="cache") == "ENDED"  # purged from slurmctld: over
    _fake_bin(tmp_path, monkeypatch, "squeue", "echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2\n"
              "exit 1\n")
    with caplog.at_level("WARNING", logger="dreamjax"):
        w.update()
        w.update()
    assert sum("squeue failed" in r.getMessage() for r in caplog.records) == 1  # once, not per poll
    assert not w.is_done("7_0", mode="cache")  # unknown stays as last seen
    assert not (tmp_path / "sacct_called").exists()


def test_accounting_detected_from_scontrol(tmp_path, monkeypatch):
    _fake_bin(tmp_path, monkeypatch, "scontrol", "echo 'AccountingStorageType   = accounting_storage/none'\n")
    assert not slurm.accounting_enabled()
    _fake_bin(tmp_path, monkeypatch, "scontrol", "echo 'AccountingStorageType   = accounting_storage/slurmdbd'\n")
    assert slurm.accounting_enabled()


def test_report_written_once_when_the_launcher_collects(tmp_path, monkeypatch):
    """The submitit launcher collects itself (also when tasks failed); the callback then must not."""
    from omegaconf import OmegaConf

    from dreamjax.sweep import launcher

    calls = []
    monkeypatch.setattr(launcher.sweep, "collect", lambda d, **kw: calls.append(str(d)))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "a")}}})
    launcher.SweepReportCallback().on_multirun_end(cfg)
    assert len(calls) == 1  # the batched launcher leaves the report to the callback
    launcher.report_handled(tmp_path / "a")
    launcher.SweepReportCallback().on_multirun_end(cfg)
    assert len(calls) == 1


def test_an_error_raised_while_stopping_is_an_interruption_not_failed_cells(tmp_path, monkeypatch):
    """SLURM's time limit sends USR2 and SIGTERM together: submitit's handler then fails (its
    ``scontrol requeue`` child is killed too). That error must not mark the batch's cells failed."""
    import subprocess

    from hydra import compose, initialize_config_dir

    import dreamjax
    from dreamjax.sweep import executor, grid
    from tests.helpers import PAINTINGS

    with initialize_config_dir(dreamjax.config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "layers=tiny_set1", "dream=dlwp", "dream.iterations=4",
                                           "dream.num_octaves=1", "dream.border=0", "data.image_size=64",
                                           "checkpoint.every_steps=2", "outputs.gif=false"])
    cells = grid.cells_from_config(cfg, [PAINTINGS / "turner_shipwreck.jpg"], job_dir=tmp_path / "run")
    stop = {"now": False}

    def signalled(name):
        if name == "step":
            stop["now"] = True  # SIGTERM arrived ...
            raise subprocess.CalledProcessError(-15, ["scontrol", "requeue", "5_1"])  # ... and killed the child

    monkeypatch.setattr(executor, "fault_point", signalled)
    monkeypatch.setattr(executor.checkpoint, "fault_point", signalled)
    ex = executor.Executor(executor.RunOptions.from_config(cfg), stop_requested=lambda: stop["now"])
    with pytest.raises(executor.Interrupted, match="CalledProcessError"):
        ex.run(cells, checkpoint_root=tmp_path / ".checkpoints")
    assert not list(tmp_path.rglob("cell.json"))  # nothing recorded as failed
