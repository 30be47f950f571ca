"""Entry points (thin): parse, call the library, turn the outcome into an exit status.

Exit status of ``dreamjax`` (also in README.md, "Exit codes"):

* 0 -- every planned cell is done (dreamed now or already complete);
* 2 -- nothing was computed: a config, weights or painting-path mistake (one line on stderr;
  ``HYDRA_FULL_ERROR=1`` prints the traceback too);
* 3 -- the run finished but some or all cells failed (their reasons are in the log and in each
  cell.json; the others are done);
* 4 -- the output folder is in use by another dreamjax process (named on stderr); nothing was done;
* 130 -- stopped by Ctrl-C (143 by SIGTERM), after checkpointing: the same command resumes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

import dreamjax
from dreamjax import files
from dreamjax.config import ConfigError
from dreamjax.outputs import analysis
from dreamjax.outputs.images import ImageError
from dreamjax.sweep import jobs
from dreamjax.sweep import jobs as sweep
from dreamjax.weights.keras_h5 import WeightsError

EXIT_OK, EXIT_USAGE, EXIT_CELLS_FAILED, EXIT_BUSY, EXIT_INTERRUPTED = 0, 2, 3, 4, 130


USER_ERRORS = (ConfigError, WeightsError, ImageError, files.FolderLocked)
_CAUGHT: list[BaseException] = []  # a job's mistake, reported by run() (not through Hydra's wrapper)


@hydra.main(version_base="1.3", config_path=dreamjax.config_dir(), config_name="config")
def _dream(cfg):
    try:
        return sweep.task(cfg)
    except USER_ERRORS as e:
        if os.environ.get("DREAMJAX_FULL_ERROR") == "1":
            traceback.print_exc()
        _CAUGHT.append(e)
        return None


def help_text() -> str:
    """``dreamjax --help``: what it is, how to run it, every experiment with its one-line summary
    (the first comment line of ``conf/experiment/NAME.yaml``) and every config group's options."""
    conf = Path(dreamjax.config_dir())
    lines = ["dreamjax: DeepDream experiments at scale in JAX (paintings x objectives x settings, batched,",
             "compiled and checkpointed; grids, gallery and an analysis of what gets hallucinated).", "",
             "Usage:  dreamjax [+experiment=NAME] [group=option ...] [key=value ...]    one run",
             "        dreamjax -m [+experiment=NAME] [key=a,b,c ...]                    a sweep", "",
             "Experiments (+experiment=NAME):"]
    for f in sorted((conf / "experiment").glob("*.yaml")):
        lines.append(f"  {f.stem:<22} {_summary(f)}")
    lines += ["", "Config groups (group=option):"]
    for g in sorted(d for d in conf.iterdir() if d.is_dir() and d.name != "experiment"):
        lines.append(f"  {g.name:<22} {', '.join(sorted(f.stem for f in g.glob('*.yaml')))}")
    lines += ["", "Settings: `dreamjax --cfg job [overrides]` prints the composed config; README.md explains",
              "each. Exit codes: README.md. Hydra's own options: `dreamjax --hydra-help`."]
    return "\n".join(lines)


def _summary(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.lstrip("#").strip()
        if line.startswith("#") and text and not text.startswith("@package"):
            return text
    return ""


def main():
    """``dreamjax [overrides]`` / ``dreamjax -m [sweeps]``: see ``dreamjax --help``."""
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(help_text())
        return
    dreamjax.configure_cpu()
    sys.exit(run(_dream))


def run(app) -> int:
    """Run the Hydra app; a mistake found before compute is one line on stderr, not a traceback."""
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises; the message is printed here, once
    os.environ["DREAMJAX_FULL_ERROR"] = "1" if full else "0"
    _CAUGHT.clear()
    try:
        app()
        if _CAUGHT:
            raise _CAUGHT[0]
    except (*USER_ERRORS, HydraException, OmegaConfBaseException) as e:
        if full and not _CAUGHT:
            traceback.print_exc()
        kind = "" if isinstance(e, (ConfigError, HydraException, OmegaConfBaseException)) else f"{type(e).__name__}: "
        text = str(e) if isinstance(e, (HydraException, OmegaConfBaseException)) else " ".join(str(e).split())
        print(f"dreamjax: error: {kind}{text}", file=sys.stderr)
        return EXIT_BUSY if isinstance(e, files.FolderLocked) else EXIT_USAGE
    except KeyboardInterrupt:
        print("dreamjax: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if not full:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    o = jobs.OUTCOME
    if o["failed"]:  # pending alone (e.g. SLURM tasks submitted with wait=false) is not a failure
        print(f"dreamjax: {o['failed']} cell(s) failed, {o['pending']} not run, {o['done']} done "
              f"(exit status {EXIT_CELLS_FAILED}; reasons in the log and in each cell.json)", file=sys.stderr)
        return EXIT_CELLS_FAILED
    return EXIT_OK


def collect_main(argv=None):
    p = argparse.ArgumentParser(prog="dreamjax-collect", description="Write a sweep's manifest, summary, "
                                "grids and gallery from its cells' records (after SLURM tasks finish, say).")
    p.add_argument("sweep_dir")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = sweep.collect(a.sweep_dir)
    except FileNotFoundError as e:
        print(f"dreamjax-collect: {e}", file=sys.stderr)
        return 2
    c = out["manifest"]["counts"]
    print(f"{a.sweep_dir}: {c['done']} done, {c['failed']} failed, {c['pending']} pending -> index.html, "
          f"manifest.json, summary.csv")
    return EXIT_CELLS_FAILED if c["failed"] else EXIT_OK


def analyze_main(argv=None):
    dreamjax.configure_cpu()

    return analysis.main(argv, collect=lambda d: jobs.collect(d, analyze=False))


if __name__ == "__main__":
    main()
