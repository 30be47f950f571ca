"""Entry points (thin): parse, call the library."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import hydra

import dreamjax
from dreamjax.outputs import analysis
from dreamjax.sweep import jobs
from dreamjax.sweep import jobs as sweep


@hydra.main(version_base="1.3", config_path=dreamjax.config_dir(), config_name="config")
def _dream(cfg):
    return sweep.task(cfg)


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
    _dream()


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
    print(f"{a.sweep_dir}: {c['done']} done, {c['failed']} failed -> index.html, manifest.json, summary.csv")
    return 0


def analyze_main(argv=None):
    dreamjax.configure_cpu()

    return analysis.main(argv, collect=lambda d: jobs.collect(d, analyze=False))


if __name__ == "__main__":
    main()
