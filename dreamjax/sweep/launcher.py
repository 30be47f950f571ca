"""Hydra launchers: the batched multirun launcher (default for ``-m``) and the sweep-report callback.

``DreamjaxLauncher`` composes every job's config exactly as Hydra's basic launcher does
(same job directories, ``.hydra/`` files and ``multirun.yaml``), but instead of running the
task once per job it *plans* each job into cells, fails before any compute on a config
mistake, then runs all cells together: grouped by static signature, batched, one compiled
program per (group, octave shape). The stock ``basic`` launcher still works (one job at a
time) and is the benchmark's baseline; ``SweepReportCallback`` writes the sweep's manifest,
summary and gallery at the end of a multirun, whichever launcher ran it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

from dreamjax.sweep import jobs as sweep

log = logging.getLogger("dreamjax")
# Sweep folders whose launcher has written (or, with ``wait=false``, deferred) the report itself:
# the callback then leaves them alone, so collect and the analysis run once per sweep.
_REPORTED: set[str] = set()


def report_handled(sweep_dir: str | Path) -> None:
    """Called by a launcher that collects ``sweep_dir`` itself (or leaves it to dreamjax-collect)."""
    _REPORTED.add(str(Path(sweep_dir).resolve()))


class DreamjaxLauncher(Launcher):
    def __init__(self, **kwargs: Any) -> None:
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def compose_jobs(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        """Compose every job (as the basic launcher composes them), check and plan them all before
        anything is written (a mistake in any job stops the sweep before compute), claim the sweep
        folder (lock + sweep record + plan), then let Hydra write each job's folder and ``.hydra/``
        files. Returns the JobReturns, each holding its job's cells."""
        jobs = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = idx
                cfg.hydra.job.num = idx
            job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
            jobs.append((cfg, idx, job_dir, list(cfg.hydra.overrides.task)))
        planned = sweep.plan_jobs(jobs)
        assert self.config is not None
        sweep.claim(Path(str(self.config.hydra.sweep.dir)), list(self.config.hydra.overrides.task),
                    [cfg for cfg, *_ in jobs], [c for cells in planned for c in cells])
        rets = []
        for (cfg, *_), cells in zip(jobs, planned):
            rets.append(run_job(hydra_context=self.hydra_context, task_function=lambda _cfg, cells=cells: cells,
                                config=cfg, job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
        for ret in rets:
            if ret.status == JobStatus.FAILED:
                raise ret._return_value
        return rets

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        log.info("dreamjax launcher: planning %d jobs in %s", len(job_overrides), sweep_dir)
        rets = self.compose_jobs(job_overrides, initial_job_idx)
        cells = [c for r in rets for c in r.return_value]
        records = sweep.execute(cells, self.config, checkpoint_root=sweep_dir / ".checkpoints",
                                resume_cmd=sweep._command())
        by_job: dict[int, dict] = {}
        for r in records:
            by_job.setdefault(int(r["job"]), {})[r["id"]] = r["status"]
        for i, ret in enumerate(rets):
            ret.return_value = by_job.get(initial_job_idx + i, {})
        return rets


class SweepReportCallback(Callback):
    """At the end of a multirun, gather every job's cells into one report."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if str(sweep_dir.resolve()) in _REPORTED:
            return
        sweep.collect_or_warn(sweep_dir)
