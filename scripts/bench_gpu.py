#!/usr/bin/env python
"""The engine on one NVIDIA GPU: InceptionV3 DLwP step at 299 and 512 px, B = 1, 8, 16.

  python scripts/bench_gpu.py --json results/bench/engine_gpu.json        (< 8 min on one GPU)
  python scripts/bench_gpu.py --allow-cpu --sizes 96 --batch 1 2 --steps 1 --repeats 1   (smoke test)

Per (size, B): compile seconds, seconds per step, cell-steps/s (min/median/max over repeats) of
B cells in one program (``batched``: the whole batch in one gradient pass, as the engine runs on
GPUs) and of the B=1 program cell after cell (``per_cell``), their ratio, XLA's FLOPs per step
and the achieved FLOP rate against the device's float32 and bfloat16 matmul peaks measured in the
same run (8192^2 ``jnp.dot``; float32 at ``precision=highest`` and at XLA's default, which may use
TF32 on Ampere and later), and device memory (``memory_stats``: bytes in use after the case and
the process peak so far; cases run smallest first so the peak is the current case's). Cases that
would run past ``--budget-s`` are skipped and listed as such. Random weights: speed only.
"""
import argparse
import json
import os
import statistics
import sys
import time

import dreamjax

dreamjax.configure_cpu()  # no-op on GPU programs; keeps --allow-cpu runs like the CLI's


def _summary(xs):
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def matmul_peaks(n: int) -> dict:
    import jax
    import jax.numpy as jnp

    out = {"n": n}
    for name, dt, prec in [("float32_highest", jnp.float32, "highest"), ("float32_default", jnp.float32, None),
                           ("bfloat16", jnp.bfloat16, None)]:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt)
        f = jax.jit(lambda a, b, prec=prec: jnp.dot(a, b, precision=prec))
        f(a, a).block_until_ready()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            f(a, a).block_until_ready()
            ts.append(time.perf_counter() - t0)
        out[f"{name}_tflops"] = 2.0 * n ** 3 / min(ts) / 1e12
    return out


def memory(device) -> dict:
    try:
        st = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices have none
        st = {}
    return {"bytes_in_use_gib": st.get("bytes_in_use", float("nan")) / 2**30,
            "peak_bytes_in_use_gib": st.get("peak_bytes_in_use", float("nan")) / 2**30,
            "bytes_limit_gib": st.get("bytes_limit", float("nan")) / 2**30}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[299, 512])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--steps", type=int, default=5, help="dream steps per timed call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--peak-n", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=450.0, help="skip cases that would start after this")
    p.add_argument("--allow-cpu", action="store_true", help="run on whatever backend there is (smoke test)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    t_start = time.perf_counter()

    import jax

    from dreamjax import load_backbone
    from dreamjax.bench import engine as bench

    backend = jax.default_backend()
    if backend != "gpu" and not a.allow_cpu:
        sys.exit(f"JAX backend is {backend!r}, not gpu (install jax[cuda12]; or --allow-cpu for a smoke test)")
    dev = jax.devices()[0]
    info = {**bench.machine_info(), "device_kind": getattr(dev, "device_kind", str(dev))}
    peaks = matmul_peaks(a.peak_n if backend == "gpu" else 1024)
    print(f"{info['device_kind']}: matmul peak f32 (highest) {peaks['float32_highest_tflops']:.1f}, "
          f"f32 (default) {peaks['float32_default_tflops']:.1f}, bf16 {peaks['bfloat16_tflops']:.1f} TFLOP/s",
          flush=True)
    bb = load_backbone("inception_v3", weights="random")
    rows, skipped = [], []
    batches = sorted(set(a.batch))
    for size in sorted(a.sizes):
        one = None
        for b in batches:
            elapsed = time.perf_counter() - t_start
            if elapsed > a.budget_s:
                skipped.append({"size": size, "batch": b, "why": f"budget: {elapsed:.0f} s elapsed"})
                print(f"skip {size} B={b} (budget)", flush=True)
                continue
            case = bench.EngineCase(bb, size, b, a.steps, a.compute_dtype, micro_batch=0)
            if b == 1:
                one = case
            times = [case.time_batched() for _ in range(a.repeats)]
            row = {"size": size, "batch": b, "compile_seconds": case.compile_seconds,
                   "compilations": case.compilations, "flops_per_step": case.flops_per_step,
                   "seconds_per_step": _summary([t / a.steps for t in times]),
                   "cell_steps_per_s": _summary([b * a.steps / t for t in times]), "memory": memory(dev)}
            tf = [case.flops_per_step / (t / a.steps) / 1e12 for t in times]
            row["achieved_tflops"] = _summary(tf)
            row["vs_peak"] = {k: statistics.median(tf) / v for k, v in peaks.items() if k.endswith("tflops")}
            if b > 1 and one is not None:
                cells = [one.time_cells(case.images, case.params) for _ in range(a.repeats)]
                row["per_cell_cell_steps_per_s"] = _summary([b * a.steps / t for t in cells])
                row["batched_vs_per_cell"] = _summary([c / t for t, c in zip(times, cells)])
            rows.append(row)
            c = row["cell_steps_per_s"]
            pc = row.get("batched_vs_per_cell", {}).get("median", float("nan"))
            print(f"{size:>4} B={b:<3} compile {row['compile_seconds']:6.1f} s  cell-steps/s "
                  f"{c['min']:7.1f}/{c['median']:7.1f}/{c['max']:7.1f}  x per-cell {pc:5.2f}  "
                  f"{statistics.median(tf):6.2f} TFLOP/s ({100 * row['vs_peak']['bfloat16_tflops']:.0f} % of bf16, "
                  f"{100 * row['vs_peak']['float32_highest_tflops']:.0f} % of f32 peak)  "
                  f"mem {row['memory']['peak_bytes_in_use_gib']:.2f} GiB", flush=True)
            if b != 1:
                del case
        del one
        jax.clear_caches()
    out = {"kind": "engine_gpu", "backbone": "inception_v3", "weights": "random", "compute_dtype": a.compute_dtype,
           "steps_per_call": a.steps, "repeats": a.repeats, "machine": info, "matmul_peak": peaks, "rows": rows,
           "skipped": skipped, "wall_seconds": time.perf_counter() - t_start,
           "command": " ".join(["python", "scripts/bench_gpu.py", *(argv or sys.argv[1:])])}
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    print(f"total {out['wall_seconds']:.0f} s", flush=True)
    if a.json:
        bench.write_json(a.json, out)
    else:
        print(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
