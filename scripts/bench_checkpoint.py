"""Checkpoint overhead and resume latency of a real sweep (through the CLI, in subprocesses).

    python scripts/bench_checkpoint.py [--model efficientnet_lite0 --layers lite_set1 --dream lite
                                        --image-size 160 --paintings 2 --every 10]

1. the same sweep with checkpoint.enabled=false and =true (every_steps=N): overhead = extra run
   time in % (run_stats.json "seconds": the executor's time, excluding Python/JAX start-up), plus
   the time the run itself waited on orbax (checkpoint_seconds: the blocking part of each async
   save, the final waits and the restore);
2. the sweep killed (SIGKILL, DREAMJAX_TEST_KILL_AT=step:K) and rerun with the same command:
   resume latency = process start -> checkpoint restored, and -> first chunk of steps done after it.
Prints a table; writes results/bench/checkpoint.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dreamjax

dreamjax.configure_cpu()  # dreamjax's XLA:CPU flags, as its CLI applies them (before JAX starts)

REPO = Path(__file__).resolve().parents[1]
PAINTINGS = REPO / "dreamjax" / "data" / "paintings"


def run(sweep: Path, args: list[str], env: dict | None = None) -> tuple[int, float, dict]:
    import resource

    e = dict(os.environ, **(env or {}))
    t0 = time.time()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable, "-m", "dreamjax.cli", *args, f"hydra.sweep.dir={sweep}"], cwd=sweep.parent,
                       capture_output=True, text=True, env=e)
    wall = time.time() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats = json.loads((sweep / "run_stats.json").read_text()) if (sweep / "run_stats.json").exists() else {}
    stats["_cpu_s"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if p.returncode not in (0, -9):
        sys.exit(f"sweep failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p.returncode, wall, stats | {"_t0": t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--layers", default="lite_set1")
    ap.add_argument("--dream", default="lite")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--paintings", type=int, default=2)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--kill-at-chunk", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "results" / "bench" / "checkpoint.json"))
    a = ap.parse_args(argv)
    files = sorted(PAINTINGS.glob("*.jpg"))[: a.paintings]
    base = ["-m", f"model={a.model}", f"layers={a.layers}", f"dream={a.dream}", f"data.image_size={a.image_size}",
            "data.paths=" + ",".join(map(str, files)), "analyze=false", f"checkpoint.every_steps={a.every}"]
    tmp = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        run(tmp / "warm", base + ["checkpoint.enabled=false"])  # fills the compilation cache
        offs, ons = [], []
        for r in range(a.repeats):  # interleaved; the best of each (shared machines are noisy)
            offs.append(run(tmp / f"off{r}", base + ["checkpoint.enabled=false"]))
            ons.append(run(tmp / f"on{r}", base + ["checkpoint.enabled=true"]))
        _, w_off, s_off = min(offs, key=lambda x: x[2]["seconds"])
        _, w_on, s_on = min(ons, key=lambda x: x[2]["seconds"])
        cpu_off, cpu_on = min(x[2]["_cpu_s"] for x in offs), min(x[2]["_cpu_s"] for x in ons)
        rc, _, _ = run(tmp / "kill", base, env={"DREAMJAX_TEST_KILL_AT": f"step:{a.kill_at_chunk}"})
        assert rc == -9, rc
        _, w_res, s_res = run(tmp / "kill", base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    steps = s_on["cell_steps"]
    res = {
        "config": {"model": a.model, "layers": a.layers, "dream": a.dream, "image_size": a.image_size,
                   "cells": s_on["cells_done"], "batches": s_on["batches"], "every_steps": a.every,
                   "cell_steps": steps},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "devices": os.environ.get("JAX_PLATFORMS", "default")},
        "run_s_without_checkpoints": round(s_off["seconds"], 3),
        "run_s_with_checkpoints": round(s_on["seconds"], 3),
        "wall_s_without": round(w_off, 3), "wall_s_with": round(w_on, 3),
        "checkpoint_saves": s_on.get("checkpoint_saves"),
        "checkpoint_wait_s": round(s_on.get("checkpoint_seconds", 0.0), 3),
        "overhead_pct": round(100 * (s_on["seconds"] - s_off["seconds"]) / s_off["seconds"], 2),
        "wait_pct": round(100 * s_on.get("checkpoint_seconds", 0.0) / s_on["seconds"], 2),
        "repeats": a.repeats, "all_run_s_without": [round(x[2]["seconds"], 2) for x in offs],
        "all_run_s_with": [round(x[2]["seconds"], 2) for x in ons],
        "process_cpu_s_without": round(cpu_off, 2), "process_cpu_s_with": round(cpu_on, 2),
        "cpu_overhead_pct": round(100 * (cpu_on - cpu_off) / cpu_off, 2),
        "load_avg_at_end": os.getloadavg(),
        "resume_restored_s": round(s_res["resume_restored_unix"] - s_res["_t0"], 3),
        "resume_first_chunk_s": round(s_res["resume_first_step_unix"] - s_res["_t0"], 3),
        "resume_total_wall_s": round(w_res, 3),
    }
    cfg = res["config"]
    rows = [("cells x steps", f"{cfg['cells']} cells, {steps} cell-steps, {cfg['batches']} batches"),
            ("run time, checkpoints off", f"{res['run_s_without_checkpoints']:.2f} s"),
            (f"run time, every {a.every} steps", f"{res['run_s_with_checkpoints']:.2f} s "
                                                 f"({res['checkpoint_saves']} saves)"),
            ("overhead (run time)", f"{res['overhead_pct']:+.1f} %"),
            ("overhead (process CPU time)", f"{res['cpu_overhead_pct']:+.1f} %"),
            ("waited on orbax", f"{res['checkpoint_wait_s']:.2f} s ({res['wait_pct']:.1f} %)"),
            ("resume: start -> restored", f"{res['resume_restored_s']:.2f} s"),
            ("resume: start -> first chunk done", f"{res['resume_first_chunk_s']:.2f} s")]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
