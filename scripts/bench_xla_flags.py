#!/usr/bin/env python
"""XLA:CPU option study: one fresh process per setting (XLA_FLAGS are read at start-up), each
timing the InceptionV3 DLwP step at 299x299 through scripts/bench.py. The baseline runs first
and last to bracket background-load drift. Writes results/bench/xla_flags_cpu.json.

  python scripts/bench_xla_flags.py [--size 299] [--batch 1] [--repeats 5]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import dreamjax
from dreamjax.bench import engine as bench
from dreamjax.engine.xla_cpu import XNNPACK_FLAGS

dreamjax.configure_cpu()  # dreamjax's XLA:CPU flags, as its CLI applies them (before JAX starts)

# Each setting's XLA_FLAGS are exactly these (dreamjax's own XLA:CPU flags are switched off in the
# child with DREAMJAX_XLA_CPU_CONV=default; "xnnpack" is what dreamjax sets by default).
XNNPACK = " ".join(XNNPACK_FLAGS)
SETTINGS = [
    ("baseline", "", []),
    ("xnnpack", XNNPACK, []),
    ("xnnpack_graph_greedy", XNNPACK + " --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
     []),
    ("fast_math", "--xla_cpu_enable_fast_math=true", []),
    ("onednn", "--xla_cpu_use_onednn=true", []),
    ("no_xnnpack", "--xla_cpu_use_xnnpack=false", []),
    ("single_thread_eigen", "--xla_cpu_multi_thread_eigen=false", []),
    ("vector_width_512", "--xla_cpu_prefer_vector_width=512", []),
    ("max_isa_avx2", "--xla_cpu_max_isa=AVX2", []),
    ("thunk_runtime_off", "--xla_cpu_use_thunk_runtime=false", []),
    ("matmul_precision_bf16", "", ["--matmul-precision", "bfloat16"]),
    ("baseline_again", "", []),
]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--settings", nargs="*", default=None, help="names from SETTINGS (default: all)")
    p.add_argument("--rounds", type=int, default=1, help="round robin over the settings this many times")
    p.add_argument("--json", default="results/bench/xla_flags_cpu.json")
    a = p.parse_args(argv)
    here = Path(__file__).resolve().parent
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        chosen = [x for x in SETTINGS if a.settings is None or x[0] in a.settings]
        for rnd, (name, flags, extra) in [(r, x) for r in range(a.rounds) for x in chosen]:
            js = Path(tmp) / f"{name}_{rnd}.json"
            env = dict(os.environ, XLA_FLAGS=flags, DREAMJAX_XLA_CPU_CONV="default")
            cmd = [sys.executable, str(here / "bench.py"), "--sizes", str(a.size), "--batch", str(a.batch),
                   "--repeats", str(a.repeats), "--steps", str(a.steps), "--json", str(js), *extra]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0 or not js.exists():
                row = {"setting": name, "XLA_FLAGS": flags, "extra": extra, "ok": False,
                       "error": (r.stderr or r.stdout)[-600:]}
            else:
                res = json.loads(js.read_text())
                b = next(x for x in res["rows"] if x["mode"] == "batched")
                row = {"setting": name, "round": rnd, "XLA_FLAGS": flags, "extra": extra, "ok": True,
                       "seconds_per_step": b["seconds_per_step"], "cell_steps_per_s": b["cell_steps_per_s"],
                       "compile_seconds": b["compile_seconds"], "gflops_median": b["achieved_gflops"]["median"],
                       "matmul_peak_gflops": res["matmul_peak"]["gflops_best"],
                       "loadavg": res["machine"]["loadavg_start"][0]}
            out.append(row)
            if row["ok"]:
                s = row["seconds_per_step"]
                print(f"{name:<22} s/step min/med/max {s['min']:.3f}/{s['median']:.3f}/{s['max']:.3f}  "
                      f"compile {row['compile_seconds']:.1f}s  {row['gflops_median']:.0f} GFLOP/s "
                      f"(matmul peak {row['matmul_peak_gflops']:.0f}, load {row['loadavg']:.1f})", flush=True)
            else:
                print(f"{name:<22} FAILED: {row['error'][-200:]!r}", flush=True)
    bench.write_json(a.json, {"size": a.size, "batch": a.batch, "settings": out})


if __name__ == "__main__":
    main()
