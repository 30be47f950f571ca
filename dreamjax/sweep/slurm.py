"""SLURM sweeps through submitit: ``hydra/launcher=dreamjax_slurm`` (``dreamjax_slurm_local`` runs
the same code with submitit's local executor, for tests and single machines).

The launcher plans every job exactly like the batched launcher (``DreamjaxLauncher.compose_jobs``:
same job dirs, ``.hydra/`` files, config checks before any compute), splits the cells, grouped by
static signature, into chunks of ``cells_per_task`` (or into about ``tasks`` chunks; always whole
batches) and submits one SLURM array task per chunk with ``executor.map_array``. Each task runs its
cells with the same :class:`~dreamjax.sweep.executor.Executor` as a local sweep: orbax checkpoints of its
in-flight batches go to ``<sweep>/.checkpoints``, complete cells are skipped. When every task has
ended the launcher collects the sweep (manifest, summary, grids, index.html); with
``wait=false`` it returns after submitting and ``dreamjax-collect SWEEP_DIR`` does that later.

Preemption / timeout: :class:`SweepTasks` is a ``submitit.helpers.Checkpointable``; on SLURM's
USR2 signal submitit calls its ``checkpoint()``, which resubmits the same task (same cells), and
the requeued task resumes every batch from its last orbax checkpoint (at most
``checkpoint.every_steps`` steps are redone). Rerunning the same command resubmits only the chunks
that still have incomplete cells.

Example (array tasks of 16 cells, one GPU each; any other sbatch option through
``+hydra.launcher.additional_parameters.<option>=<value>``)::

    dreamjax -m +experiment=seed_study hydra/launcher=dreamjax_slurm \\
        hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 hydra.launcher.cpus_per_task=8 \\
        hydra.launcher.mem_gb=32 hydra.launcher.timeout_min=120 hydra.launcher.cells_per_task=16 \\
        hydra.launcher.account=myproj +hydra.launcher.additional_parameters.reservation=dream

Tasks run ``python -m submitit.core._submit`` with this interpreter on the compute nodes (same
filesystem); ``hydra.launcher.setup=['module load cuda','source /path/venv/bin/activate']`` adds
shell lines before each task. The same line runs locally with ``hydra/launcher=dreamjax_slurm_local``.
"""
from __future__ import annotations

import logging
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import submitit
from hydra.core.utils import configure_log, setup_globals
from omegaconf import OmegaConf

from dreamjax.sweep import executor as run
from dreamjax.sweep import grid
from dreamjax.sweep import jobs as sweep
from dreamjax.sweep.launcher import DreamjaxLauncher, report_handled

log = logging.getLogger("dreamjax")

# Launcher keys that are dreamjax's own (not submitit parameters).
OWN = {"submitit_executor", "submitit_folder", "cells_per_task", "tasks", "wait", "max_num_timeout", "poll_s"}
# submitit's cluster-independent parameters (AutoExecutor); everything else is SLURM-specific.
GENERIC = {"name", "timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node",
           "stderr_to_stdout"}
LOCAL_ONLY = {"visible_gpus", "signal_delay_s", "setup"}


def split_cells(cells: Sequence[grid.Cell], batch_size: int, cells_per_task: int | None = None,
                tasks: int | None = None) -> list[list[grid.Cell]]:
    """Chunks of cells for array tasks: each chunk holds cells of one static signature, in whole
    batches (a multiple of ``batch_size``), in plan order. Deterministic: the same sweep always
    gives the same chunks, so a resubmitted task finds its batches' checkpoints."""
    groups: dict[tuple, list[grid.Cell]] = {}
    for c in cells:
        groups.setdefault(c.signature(), []).append(c)
    if cells_per_task is None:
        n = max(1, int(tasks or 1))
        cells_per_task = math.ceil(len(cells) / n)
    per = max(batch_size, int(math.ceil(int(cells_per_task) / batch_size) * batch_size))
    return [g[i:i + per] for g in groups.values() for i in range(0, len(g), per)]


class SweepTasks(submitit.helpers.Checkpointable):
    """The array task: ``tasks(index, cells)`` dreams ``cells`` (complete ones skipped, in-flight
    batches resumed from ``<sweep>/.checkpoints``). ``checkpoint()`` (submitit, on preemption or
    timeout) resubmits itself with the same arguments."""

    def __init__(self, cfg: dict, sweep_dir: str, resume_cmd: str):
        self.cfg = cfg
        self.sweep_dir = str(sweep_dir)
        self.resume_cmd = resume_cmd

    def __call__(self, index: int, cells: list[grid.Cell]) -> dict[str, str]:
        _task_logging()
        sweep_dir = Path(self.sweep_dir)
        try:
            env = submitit.JobEnvironment()
            where = f"job {env.job_id}"
        except RuntimeError:  # called directly, not under submitit
            where = "in-process"
        log.info("dreamjax task %d (%s): %d cells", index, where, len(cells))
        records = sweep.execute(cells, self.cfg, checkpoint_root=sweep_dir / ".checkpoints",
                                resume_cmd=self.resume_cmd,
                                stats_path=sweep_dir / ".submitit" / f"task_{index}_stats.json")
        return {r["id"]: r["status"] for r in records}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        log.warning("dreamjax task %s preempted or timed out: resubmitting it; it resumes from its orbax "
                    "checkpoints in %s", args[0] if args else "?", Path(self.sweep_dir) / ".checkpoints")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _task_logging():
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("dreamjax").setLevel(logging.INFO)


# squeue states of a job that is not over yet (anything else, or no longer listed, is over).
_LIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING",
         "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
         "PREEMPTED", "READY", "UNKNOWN"}


class SqueueWatcher(submitit.slurm.slurm.SlurmInfoWatcher):
    """Job states from ``squeue`` instead of ``sacct``, for clusters without accounting.

    There, sacct fails on every poll (submitit logs a warning each time, "Bypassing sacct error")
    and never reports a job as over, so a task that ended without a result file (killed,
    cancelled, out of memory) would be waited for forever. squeue lists every job slurmctld
    knows (ended ones for ``MinJobAge``); a job it no longer lists has ended, and its result file,
    or the lack of one, says how. A failed poll is logged once, not on every retry."""

    def __init__(self, delay_s: int = 30) -> None:
        super().__init__(delay_s=delay_s)
        self._warned = False

    def _make_command(self):
        ids = sorted({x.split("_")[0] for x in self._registered - self._finished})
        if not ids:
            return None
        return ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%N", f"--jobs={','.join(ids)}"]

    def read_info(self, string) -> dict[str, dict[str, str]]:
        if not isinstance(string, str):
            string = string.decode()
        info = {}
        for line in string.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0]:
                info[parts[0]] = {"JobID": parts[0], "State": parts[1], "NodeList": parts[2]}
        for jid in self._registered - self._finished:  # no longer known to slurmctld: over
            info.setdefault(jid, {"JobID": jid, "State": "ENDED", "NodeList": ""})
        return info

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        return self.get_state(job_id, mode=mode).split()[0].upper() not in _LIVE

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        try:
            p = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            p = subprocess.CompletedProcess(command, 1, "", str(e))
        if p.returncode == 0 or "invalid job id" in p.stderr.lower():  # every job purged: all over
            self._info_dict.update(self.read_info(p.stdout if p.returncode == 0 else ""))
        elif not self._warned:
            self._warned = True
            log.warning("squeue failed (%s); job states may lag, retrying every %d s at most",
                        (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1], self._delay_s)
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)


def watch_with_squeue(jobs: Sequence[submitit.Job]) -> None:
    """Poll these jobs' states with squeue (submitit's array jobs are plain ``SlurmJob``s, whose
    shared watcher calls sacct): an instance watcher shadows the class one."""
    watcher = SqueueWatcher()
    for job in jobs:
        job.watcher = watcher
        watcher.register_job(job.job_id)


def accounting_enabled() -> bool:
    """Whether this cluster keeps job accounting (sacct works); False when SLURM says
    ``AccountingStorageType = accounting_storage/none`` (or cannot be asked)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    for line in out.splitlines():
        if line.split("=")[0].strip() == "AccountingStorageType":
            return line.split("=", 1)[1].strip() not in ("", "accounting_storage/none", "(null)")
    return False


def make_executor(params: dict, folder: str | Path):
    """A submitit executor from the launcher's config: generic keys as they are, the rest
    passed to the chosen cluster (``slurm_<key>``), ``additional_parameters`` included."""
    kind = str(params.get("submitit_executor", "slurm"))
    if kind not in ("slurm", "local"):
        raise ValueError(f"hydra.launcher.submitit_executor={kind!r}: use slurm or local")
    init = {f"{kind}_max_num_timeout": int(params.get("max_num_timeout", 3))} if kind == "slurm" else {}
    ex = submitit.AutoExecutor(folder=str(folder), cluster=kind, **init)
    upd: dict[str, Any] = {}
    for k, v in params.items():
        if k in OWN or k.startswith("_") or v is None:
            continue
        if k in GENERIC:
            upd[k] = v
        elif kind == "slurm" and k not in ("visible_gpus",):
            upd[f"slurm_{k}"] = v
        elif kind == "local" and k in LOCAL_ONLY:
            upd[f"local_{k}"] = v if k != "visible_gpus" else tuple(v)
    if kind == "local":  # AutoExecutor rejects local_* keys other than 'setup'; set the rest directly
        for k in ("signal_delay_s", "visible_gpus"):
            if f"local_{k}" in upd:
                ex._executor.parameters[k] = upd.pop(f"local_{k}")
    ex.update_parameters(**upd)
    return ex


class DreamjaxSlurmLauncher(DreamjaxLauncher):
    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params = params

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        params = {k: (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
                  for k, v in self.params.items()}
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        log.info("dreamjax submitit launcher (%s): planning %d jobs in %s", params.get("submitit_executor"),
                 len(job_overrides), sweep_dir)
        rets = self.compose_jobs(job_overrides, initial_job_idx)
        cells = [c for r in rets for c in r.return_value]
        cfg = sweep._plain(self.config)
        chunks = split_cells(cells, int(cfg.get("batch_size", 8)), params.get("cells_per_task"),
                             params.get("tasks"))
        todo = [(i, ch) for i, ch in enumerate(chunks) if not all(run.is_complete(c) for c in ch)]
        log.info("%d cells in %d array tasks; %d with work left", len(cells), len(chunks), len(todo))
        by_job: dict[int, dict] = {}
        failed: list[int] = []
        if todo:
            folder = params.get("submitit_folder") or str(sweep_dir / ".submitit" / "%j")
            ex = make_executor(params, folder)
            runner = SweepTasks(cfg, str(sweep_dir), sweep._command())
            jobs = ex.map_array(runner, [i for i, _ in todo], [ch for _, ch in todo])
            if ex.cluster == "slurm" and not accounting_enabled():  # sacct cannot answer: poll squeue
                watch_with_squeue(jobs)
            log.info("submitted array %s (%d tasks); logs in %s", jobs[0].job_id.split("_")[0], len(jobs),
                     Path(folder).parent if "%j" in folder else folder)
            if not params.get("wait", True):
                log.info("not waiting: when the tasks are done, run  dreamjax-collect %s", sweep_dir)
                report_handled(sweep_dir)  # no report of a sweep still running
                return self._returns(rets, initial_job_idx, by_job)
            for (i, _), job in zip(todo, jobs):
                try:
                    for cid, status in job.result().items():
                        by_job.setdefault(int(cid.split("/")[0]), {})[cid] = status
                except Exception as e:  # a task that died: its cells stay incomplete
                    failed.append(i)
                    log.error("array task %d (%s) failed: %s", i, job.job_id, str(e).strip().splitlines()[-1:])
        report_handled(sweep_dir)  # collected here (also when tasks failed), not again by the callback
        sweep.collect_or_warn(sweep_dir)
        if failed:
            msg = (f"{len(failed)} array tasks failed ({failed}); rerun the same command to resubmit them (they "
                   f"resume from their checkpoints): {sweep._command()}")
            log.error("%s", msg)
            raise RuntimeError(msg)
        return self._returns(rets, initial_job_idx, by_job)

    @staticmethod
    def _returns(rets, initial_job_idx, by_job):
        for i, ret in enumerate(rets):
            ret.return_value = by_job.get(initial_job_idx + i, {})
        return rets
