"""Benchmarks of the dream engine (library logic; the CLIs are scripts/bench.py, scripts/bench_sweep.py).

Engine benchmark (:func:`run_engine_bench`): for each (size, batch) the octave program of the
DLwP step (InceptionV3 mixed4..7, L2-normalised ascent) is compiled once (timed), then
modes are timed *interleaved* over repeats (round robin, so background load hits all
modes alike):

* ``batched``   B cells in one program, ``steps`` steps per call;
* ``per_cell``  the same engine at B=1, cell after cell (B calls of the B=1 program);
* ``keras``     the Keras 3 (JAX backend) DLwP loop, one cell at a time, one jitted gradient
                step per Python iteration (Keras' own random init: only speed matters here);
* ``tf``        the DLwP notebook step on TensorFlow (tf.function), one cell at a time, in a
                separate interpreter (``tf_python``), driven over a pipe.

Reported per row: compile seconds, seconds per step, cell-steps per second, XLA's FLOPs per
step (``compiled.cost_analysis()``), achieved FLOP/s and its ratio to a float32 matmul peak
measured in the same run, XLA's memory analysis, compilations. Peak RSS comes from a fresh
subprocess per case (``rss=True``), the only honest resident-set number.

Sweep benchmark (:func:`run_sweep_bench`): wall time of a Hydra multirun under several
launchers, cold (fresh persistent compilation cache) and warm (same cache again), with the
compile counts and seconds from each ``run_stats.json``.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreamjax import load_backbone
from dreamjax.engine.dream import (
    CellParams,
    DreamConfig,
    Dreamer,
    OctavePlan,
    pass_size,
)
from dreamjax.files import write_json as atomic_json
from dreamjax.models import kernels as onednn_kernels
from dreamjax.sweep.executor import CompileLog, auto_micro_batch

DLWP_TAPS = ("mixed4", "mixed5", "mixed6", "mixed7")
DLWP_WEIGHTS = (1.0, 1.5, 2.0, 2.5)
STUDY_TAPS = {"resnet50": ("conv3_block4_out", "conv4_block2_out", "conv4_block4_out", "conv4_block6_out"),
              "vgg16": ("block3_conv3", "block4_conv1", "block4_conv3", "block5_conv1"),
              "efficientnet_lite2": ("block10", "block12", "block14_dwpre", "block16")}
TINY_TAPS = ("conv2", "conv3", "conv4")
# extra batched modes for studies (EngineCase keyword arguments)
VARIANTS = {
    "devloop": {"device_loop": True},  # the device while_loop (the engine's default)
    "hostloop": {"device_loop": False},
    "bf16": {"compute_dtype": "bfloat16"},  # XLA with bfloat16 activations (no AMX path: slower)
    "onednn": {"cpu_kernels": "onednn"},  # oneDNN bfloat16 convolutions (AMX), float32 elsewhere
    "onednn_f32": {"cpu_kernels": "onednn_f32"},
    "onednn_unfused": {"cpu_kernels": "onednn", "fuse_batchnorm": False},  # BatchNorm + ReLU left to XLA
    "xla": {"cpu_kernels": "xla"},
    "mb1": {"micro_batch": 1},  # the batch's gradient in passes of 1 / 2 / 4 cells (one program)
    "mb2": {"micro_batch": 2},
    "mb4": {"micro_batch": 4},
    "whole": {"micro_batch": 0},  # the whole batch in one pass
}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def summary(xs: Sequence[float]) -> dict:
    xs = [float(x) for x in xs]
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def machine_info() -> dict:
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def matmul_peak(n: int = 2048, reps: int = 10) -> dict:
    """Best-of-``reps`` float32 GFLOP/s of one jitted ``jnp.dot`` n x n (the peak we compare with)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return {"n": n, "gflops_best": flops / min(ts) / 1e9, "gflops_median": flops / statistics.median(ts) / 1e9}


def CompileCounter():
    """Counts XLA backend compilations (jax.monitoring) inside a ``with`` block."""
    return CompileLog(active=False)


def _first(x):
    # cost_analysis() is a dict in new jax, a list of dicts in old ones
    return x[0] if isinstance(x, (list, tuple)) else (x or {})


def default_taps(backbone) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if backbone.name == "inception_v3":
        return DLWP_TAPS, DLWP_WEIGHTS
    if backbone.name == "efficientnet_lite0":
        return ("block7", "block9", "block10_dwpre", "block12"), DLWP_WEIGHTS
    if backbone.name in STUDY_TAPS:  # the model config's study taps (conf/model/*.yaml)
        return STUDY_TAPS[backbone.name], DLWP_WEIGHTS
    return TINY_TAPS, (1.0, 1.5, 2.0)


def dlwp_config(backbone, compute_dtype="float32", tile_size=0, micro_batch=None, cpu_kernels="xla"):
    """The DLwP preset's static settings; ``micro_batch`` None = what ``run.py`` picks (per platform)."""
    taps, _ = default_taps(backbone)
    mb = auto_micro_batch() if micro_batch is None else micro_batch
    return DreamConfig(taps=taps, norm="l2", objective="mean_square", border=2, frame_every=0,
                       clip=False, tile_size=tile_size, compute_dtype=compute_dtype, micro_batch=mb,
                       cpu_kernels=cpu_kernels,
                       straight_through=backbone.name == "efficientnet_lite0")  # as conf/model/*.yaml


# ----------------------------------------------------------------------------------------------
# dreamjax engine cases
# ----------------------------------------------------------------------------------------------
class EngineCase:
    """One octave program (size x size, batch B) of the dreamjax engine, run through
    ``Dreamer.run_steps`` (the path real dreams take). ``device_loop`` forces the device
    while_loop (True) or the host step loop (False); None = the engine's default."""

    def __init__(self, backbone, size: int, batch: int, steps: int, compute_dtype="float32",
                 tile_size=0, height=None, device_loop=None, micro_batch=None, cpu_kernels="xla",
                 fuse_batchnorm=True):
        self.size, self.batch, self.steps = size, batch, steps
        h, w = (height or size), size
        cfg = dlwp_config(backbone, compute_dtype, tile_size, micro_batch, cpu_kernels)
        self.micro_batch = cfg.micro_batch
        self.cpu_kernels = cpu_kernels
        _, weights = default_taps(backbone)
        variables = None if fuse_batchnorm else backbone.dream_variables_for(cpu_kernels, fuse_batchnorm=False)
        self.dreamer = Dreamer(backbone, cfg, OctavePlan(), steps_capacity=steps, variables=variables)
        if device_loop is not None:
            self.dreamer.device_loop = bool(device_loop)
        self.device_loop = self.dreamer.device_loop
        self.params = CellParams.make(np.tile(np.asarray(weights, np.float32), (batch, 1)), 20.0,
                                      iterations=steps, seed=np.arange(batch))
        rng = np.random.default_rng(0)
        self.images = rng.uniform(-1, 1, (batch, h, w, 3)).astype(np.float32)
        self._jnp = jnp
        self._jax = jax
        # XLA's cost analysis of the program run_steps runs: one step (host loop), or the
        # while_loop whose body it counts once (device loop): FLOPs of one step either way.
        cost = _first(self.dreamer.lower(h, w, batch).cost_analysis())
        # XLA counts a loop body once: with micro-batches the gradient is a lax.map over `passes`
        # passes, so a step's FLOPs are the count x passes (the step's bookkeeping, <0.1 %, too).
        self.passes = batch // pass_size(batch, cfg.micro_batch)
        self.flops_per_step = float(cost.get("flops", float("nan"))) * self.passes
        self.bytes_per_step = float(cost.get("bytes accessed", float("nan"))) * self.passes
        with CompileCounter() as cc:
            t0 = time.perf_counter()
            self.run(self.fresh_state())  # compiles init, step (or loop) and finish programs
            self.first_call_seconds = time.perf_counter() - t0
        self.compilations = cc.count
        self.compile_seconds = cc.seconds
        self.memory = None

    def fresh_state(self, images=None, params=None):
        return self.dreamer.init_octave(self.images if images is None else images,
                                        self.params if params is None else params)

    def run(self, state, params=None):
        out = self.dreamer.run_steps(state, self.params if params is None else params, 0, self.steps)
        return self._jax.block_until_ready(out)

    def time_batched(self) -> float:
        """Seconds for ``steps`` steps of all B cells in one call."""
        state = self.fresh_state()
        self._jax.block_until_ready(state)
        t0 = time.perf_counter()
        self.run(state)
        return time.perf_counter() - t0

    def time_cells(self, images: np.ndarray, params) -> float:
        """This (B=1) program over ``len(images)`` cells, one after the other."""
        states = [self.fresh_state(images[i:i + 1], params.take(slice(i, i + 1))) for i in range(len(images))]
        cell_params = [params.take(slice(i, i + 1)) for i in range(len(images))]
        self._jax.block_until_ready(states)
        t0 = time.perf_counter()
        for s, p in zip(states, cell_params):
            self.run(s, p)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Keras 3 (JAX backend) reference: the DLwP loop
# ----------------------------------------------------------------------------------------------
class KerasCase:
    """DLwP's gradient-ascent step on keras.applications.InceptionV3 (random init), Keras 3 + JAX.

    As the DLwP notebook: a feature extractor returning mixed4..7, loss = sum of coeff *
    mean(square(act[:, 2:-2, 2:-2])), one jitted step (grad, l2-normalise, ascend) called once per
    iteration from Python, one image at a time. The gradient is jax.grad over the model's
    ``stateless_call`` (the jitted-JAX way to call a Keras 3 model).
    """

    _model = None

    def __init__(self, size: int, steps: int):
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras

        if keras.backend.backend() != "jax":
            raise RuntimeError(f"Keras backend is {keras.backend.backend()!r}; set KERAS_BACKEND=jax")
        if KerasCase._model is None:
            base = keras.applications.InceptionV3(weights=None, include_top=False)
            outs = {n: base.get_layer(n).output for n in DLWP_TAPS}
            KerasCase._model = keras.Model(inputs=base.inputs, outputs=outs)
        model = KerasCase._model
        self.size, self.steps = size, steps
        coeffs = dict(zip(DLWP_TAPS, DLWP_WEIGHTS))
        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]

        def loss_fn(x):
            outs, _ = model.stateless_call(tv, ntv, x, training=False)
            loss = 0.0
            for n, c in coeffs.items():
                a = outs[n]
                loss = loss + c * jnp.mean(jnp.square(a[:, 2:-2, 2:-2, :]))
            return loss

        @jax.jit
        def step(x):
            loss, g = jax.value_and_grad(loss_fn)(x)
            g = g / jnp.sqrt(jnp.maximum(jnp.sum(g * g), 1e-12))  # tf.math.l2_normalize
            return loss, x + 20.0 * g

        self._step = step
        self._jax = jax
        self.image = np.random.default_rng(0).uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
        with CompileCounter() as cc:
            t0 = time.perf_counter()
            jax.block_until_ready(step(jnp.asarray(self.image)))
            self.compile_seconds = time.perf_counter() - t0  # trace + compile + one step
        self.compilations = cc.count

    def time_cells(self, cells: int) -> float:
        x0 = jnp.asarray(self.image)
        t0 = time.perf_counter()
        for _ in range(cells):
            x = x0
            for _ in range(self.steps):
                loss, x = self._step(x)
                if float(loss) > 1e30:  # DLwP checks max_loss on the host every step
                    break
            self._jax.block_until_ready(x)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# TensorFlow reference (separate interpreter): the DLwP notebook step
# ----------------------------------------------------------------------------------------------
TF_WORKER = Path(__file__).with_name("tf_worker.py")  # runs in the TensorFlow interpreter


class TFWorker:
    """The DLwP notebook step in a TensorFlow interpreter; ``policy`` is a Keras mixed-precision
    policy (``float32``, ``mixed_bfloat16``)."""

    def __init__(self, python: str, policy: str = "float32"):
        path = TF_WORKER
        # ours is jax; the notebook's Keras runs on TF
        env = dict(os.environ, KERAS_BACKEND="tensorflow", DREAMJAX_TF_POLICY=policy)
        self.proc = subprocess.Popen([python, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env=env)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the TensorFlow worker ({python}) did not start; see its stderr above")
        hello = json.loads(line)
        self.version = hello["tf"]

    def request(self, size, steps, cells) -> dict:
        self.proc.stdin.write(json.dumps({"size": size, "steps": steps, "cells": cells}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the TensorFlow worker died")
        return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()



# ----------------------------------------------------------------------------------------------
# Peak RSS in a fresh interpreter
# ----------------------------------------------------------------------------------------------
def rss_worker(backbone: str, weights: str, size: int, batch: int, steps: int, compute_dtype="float32",
               tile_size=0, height=None, device_loop=None) -> dict:
    """Runs in a fresh interpreter: load, compile and run one case; report ru_maxrss and timings."""
    bb = load_backbone(backbone, weights=weights)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    case = EngineCase(bb, size, batch, steps, compute_dtype, tile_size, height, device_loop)
    t = case.time_batched()
    return {"backbone": backbone, "size": size, "height": height or size, "batch": batch, "steps": steps,
            "tile_size": tile_size, "compute_dtype": compute_dtype,
            "compile_seconds": case.compile_seconds, "first_call_seconds": case.first_call_seconds, "seconds": t,
            "seconds_per_step": t / steps,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mib": base_rss, "xla_memory": case.memory}


def measure_rss(backbone: str, weights: str, size: int, batch: int, steps: int = 1, compute_dtype="float32",
                tile_size=0, height=None, device_loop=None, timeout=1800) -> dict:
    args = json.dumps(dict(backbone=backbone, weights=weights, size=size, batch=batch, steps=steps,
                           compute_dtype=compute_dtype, tile_size=tile_size, height=height,
                           device_loop=device_loop))
    code = ("import json,sys,dreamjax; dreamjax.configure_cpu(); from dreamjax.bench.engine import rss_worker; "
            "print('@@' + json.dumps(rss_worker(**json.loads(sys.argv[1]))))")
    p = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=timeout)
    for line in p.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError(f"RSS worker failed (rc {p.returncode}): {p.stderr[-2000:]}")


# ----------------------------------------------------------------------------------------------
# The engine benchmark
# ----------------------------------------------------------------------------------------------
def run_engine_bench(backbone_name="inception_v3", weights="random", sizes=(256, 512), batches=(1, 4, 8),
                     repeats=3, steps=3, keras=False, tf_python=None, rss=False, compute_dtype="float32",
                     tiled=None, tile_size=512, peak_n=2048, variants=(), tf_mixed=True, log=print) -> dict:
    """Interleaved, repeated timing of batched / per-cell / Keras / TF modes. Returns a JSON-able dict.

    variants: extra batched modes from :data:`VARIANTS` (e.g. "devloop", "bf16"), timed in the
    same round robin and reported as ``batched_<variant>`` with its ratio to ``batched``.
    """
    bb = load_backbone(backbone_name, weights=weights)
    info = machine_info()
    peak = matmul_peak(peak_n)
    log(f"float32 matmul peak ({peak_n}^3, best of 10): {peak['gflops_best']:.1f} GFLOP/s")
    tfw = tfm = None
    if tf_python:
        tfw = TFWorker(tf_python)
        info["tensorflow"] = tfw.version
        if tf_mixed:
            tfm = TFWorker(tf_python, "mixed_bfloat16")
    if keras:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras as _k

        info["keras"] = _k.__version__
    batches = sorted(set(int(b) for b in batches))
    rows, ratios = [], []
    try:
        for size in sizes:
            # ---- compile every case of this size (timed) ----
            cases = {b: EngineCase(bb, size, b, steps, compute_dtype) for b in batches}
            vcases = {(v, b): EngineCase(bb, size, b, steps, **{"compute_dtype": compute_dtype, **VARIANTS[v]})
                      for v in variants for b in batches}
            one = cases.get(1) or EngineCase(bb, size, 1, steps, compute_dtype)
            kcase = KerasCase(size, steps) if keras and backbone_name == "inception_v3" else None
            tf_compile = None
            if tfw is not None:
                tf_compile = tfw.request(size, 1, 1).get("compile_seconds")
            tfm_compile = tfm.request(size, 1, 1).get("compile_seconds") if tfm is not None else None
            # ---- interleaved repeats ----
            times: dict[tuple[str, int], list[float]] = {}
            for r in range(repeats):
                for b in batches:
                    times.setdefault(("batched", b), []).append(cases[b].time_batched())
                    for v in variants:
                        times.setdefault((f"batched_{v}", b), []).append(vcases[(v, b)].time_batched())
                    if b > 1:
                        times.setdefault(("per_cell", b), []).append(
                            one.time_cells(cases[b].images, cases[b].params))
                    if kcase is not None:
                        times.setdefault(("keras", b), []).append(kcase.time_cells(b))
                    if tfw is not None:
                        res = tfw.request(size, steps, b)
                        times.setdefault(("tf", b), []).append(res["seconds"])
                    if tfm is not None:
                        times.setdefault(("tf_bf16", b), []).append(tfm.request(size, steps, b)["seconds"])
                log(f"  size {size}: repeat {r + 1}/{repeats} done (load {os.getloadavg()[0]:.2f})")
            # ---- rows ----
            for (mode, b), ts in times.items():
                c = cases[b] if mode == "batched" else vcases.get((mode[len("batched_"):], b), one)
                per_step = [t / steps for t in ts]  # seconds per step of the whole batch of b cells
                cps = [b * steps / t for t in ts]
                row = {"size": size, "batch": b, "mode": mode, "steps_per_call": steps,
                       "seconds_per_step": summary(per_step),
                       "cell_steps_per_s": summary(cps)}
                if mode.startswith("batched") or mode == "per_cell":
                    # XLA counts no FLOPs in a custom call: oneDNN variants do the XLA program's work.
                    flops = cases[b].flops_per_step if "onednn" in mode else c.flops_per_step
                    fl = flops * (b if mode == "per_cell" else 1)
                    achieved = [fl / t for t in per_step]
                    row.update(compile_seconds=c.compile_seconds, compilations=c.compilations,
                               programs=1, flops_per_step=fl,
                               achieved_gflops=summary([a / 1e9 for a in achieved]),
                               peak_ratio=summary([a / 1e9 / peak["gflops_best"] for a in achieved]),
                               xla_memory=c.memory)
                elif mode == "keras":
                    row.update(compile_seconds=kcase.compile_seconds, compilations=kcase.compilations,
                               programs=1, weights="keras random init (speed only)")
                elif mode in ("tf", "tf_bf16"):
                    row.update(compile_seconds=tf_compile if mode == "tf" else tfm_compile,
                               policy="float32" if mode == "tf" else "mixed_bfloat16",
                               weights="keras random init (speed only)")
                rows.append(row)
            for b in batches:
                base = times[("batched", b)]
                for other in ("per_cell", "keras", "tf", "tf_bf16", *(f"batched_{v}" for v in variants)):
                    if (other, b) in times:
                        # throughput ratio batched / other, paired by repeat
                        rr = [o / t for t, o in zip(base, times[(other, b)])]
                        ratios.append({"size": size, "batch": b, "vs": other, "ratio": summary(rr)})
                        # ... and each variant against the TF anchors (the acceptance ratios)
                for v in variants:
                    for anchor in ("tf", "tf_bf16"):
                        if (anchor, b) in times:
                            rr = [a / t for t, a in zip(times[(f"batched_{v}", b)], times[(anchor, b)])]
                            ratios.append({"size": size, "batch": b, "mode": f"batched_{v}", "vs": anchor,
                                           "ratio": summary(rr)})
            if rss:
                for b in batches:
                    m = measure_rss(backbone_name, weights, size, b, 1, compute_dtype)
                    for row in rows:
                        if row["size"] == size and row["batch"] == b and row["mode"] == "batched":
                            row["peak_rss_mib"] = m["ru_maxrss_mib"]
                    log(f"  size {size} batch {b}: peak RSS {m['ru_maxrss_mib']:.0f} MiB (fresh process)")
            del cases, vcases, one, kcase
            jax.clear_caches()
    finally:
        for w in (tfw, tfm):
            if w is not None:
                w.close()
    out = {"kind": "engine", "backbone": backbone_name, "weights": weights, "compute_dtype": compute_dtype,
           "steps_per_call": steps, "repeats": repeats, "machine": info, "matmul_peak": peak,
           "rows": rows, "ratios": ratios}
    if tiled:
        log(f"tiled {tiled}x{tiled}, tile {tile_size}: running in a fresh process ...")
        out["tiled"] = measure_rss(backbone_name, weights, tiled, 1, 1, compute_dtype, tile_size=tile_size)
        out["tiled"]["peak_rss_gib"] = out["tiled"]["ru_maxrss_mib"] / 1024
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    return out


def format_engine_table(res: dict) -> str:
    lines = [f"backbone {res['backbone']} ({res['weights']}), compute {res['compute_dtype']}, "
             f"{res['steps_per_call']} steps/call, {res['repeats']} repeats; "
             f"f32 matmul peak {res['matmul_peak']['gflops_best']:.1f} GFLOP/s; "
             f"XLA_FLAGS={res['machine']['XLA_FLAGS'] or '-'}; load {res['machine']['loadavg_start'][0]:.2f} -> "
             f"{res['machine'].get('loadavg_end', [float('nan')])[0]:.2f}"]
    hdr = (f"{'size':>5} {'B':>3} {'mode':<9} {'compile s':>9} {'s/step med':>10} "
           f"{'cell-steps/s min/med/max':>26} {'GFLOP/step':>10} {'GFLOP/s med':>11} {'%peak':>6} {'RSS MiB':>8}")
    lines += [hdr, "-" * len(hdr)]
    for r in res["rows"]:
        c = r["cell_steps_per_s"]
        comp = r.get("compile_seconds")
        fl = r.get("flops_per_step")
        ag = r.get("achieved_gflops", {}).get("median")
        mode = r["mode"].replace("batched_", "b_")
        pr = r.get("peak_ratio", {}).get("median")
        lines.append(
            f"{r['size']:>5} {r['batch']:>3} {mode:<9} {comp if comp is not None else float('nan'):>9.1f} "
            f"{r['seconds_per_step']['median']:>10.3f} "
            f"{c['min']:>8.2f}/{c['median']:>8.2f}/{c['max']:>8.2f} "
            f"{(fl or float('nan')) / 1e9:>10.1f} {ag if ag is not None else float('nan'):>11.1f} "
            f"{100 * pr if pr is not None else float('nan'):>5.0f}% "
            f"{r.get('peak_rss_mib', float('nan')):>8.0f}")
    if res["ratios"]:
        lines.append("")
        lines.append("throughput ratio batched (or the named mode) / other (paired by repeat): min / median / max")
        for q in res["ratios"]:
            s = q["ratio"]
            who = q.get("mode", "batched").replace("batched_", "b_")
            lines.append(f"  size {q['size']:>4} B={q['batch']:<2} {who:<12} vs {q['vs']:<16} "
                         f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}")
    if "tiled" in res:
        t = res["tiled"]
        lines.append("")
        lines.append(f"tiled {t['size']}x{t['height']} (tile {t['tile_size']}), 1 cell, 1 step: peak RSS "
                     f"{t['peak_rss_gib']:.2f} GiB, compile {t['compile_seconds']:.1f} s, step {t['seconds']:.1f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The sweep benchmark
# ----------------------------------------------------------------------------------------------
def _stats_in(sweep_dir: Path) -> dict:
    files = sorted(sweep_dir.rglob("run_stats.json"))
    comp, secs, runs = 0, 0.0, []
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        comp += int(d.get("compilations", 0))
        secs += float(d.get("compile_seconds", 0.0))
        runs.append({"file": str(f.relative_to(sweep_dir)), **d})
    return {"stats_files": len(files), "compilations": comp, "compile_seconds": secs, "runs": runs}


LAUNCHERS = {
    "dreamjax": ["hydra/launcher=dreamjax"],
    "basic": ["hydra/launcher=basic"],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
}


def run_sweep_once(overrides: Sequence[str], launcher: str, workdir: Path, cache_dir: Path,
                   timeout: int = 1800) -> dict:
    sweep_dir = workdir / f"sweep_{launcher}_{int(time.time() * 1000)}"
    env = dict(os.environ, DREAMJAX_JAX_CACHE=str(cache_dir))
    cmd = [sys.executable, "-m", "dreamjax.cli", "-m", *overrides, *LAUNCHERS[launcher],
           f"hydra.sweep.dir={sweep_dir}", "analyze=false"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(workdir))
    wall = time.perf_counter() - t0
    res = {"launcher": launcher, "wall_seconds": wall, "rc": p.returncode, "sweep_dir": str(sweep_dir),
           "command": " ".join(cmd)}
    if p.returncode != 0:
        res["stderr_tail"] = p.stderr[-3000:]
    res.update(_stats_in(sweep_dir))
    res["records"] = len(list(sweep_dir.rglob("cell.json")))
    return res


def run_sweep_bench(overrides: Sequence[str], launchers=("dreamjax", "basic", "joblib"), repeats=1,
                    workdir=None, keep=False, log=print) -> dict:
    """Cold (fresh persistent cache) then warm (same cache) runs of one multirun per launcher.

    Order per repeat: for each launcher, cold then warm; launchers interleaved across repeats.
    """
    base = Path(workdir or tempfile.mkdtemp(prefix="dreamjax_sweepbench_"))
    base.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    results = []
    try:
        for r in range(repeats):
            order = list(launchers) if r % 2 == 0 else list(reversed(launchers))
            for launcher in order:
                cache = base / f"cache_{launcher}_{r}"
                shutil.rmtree(cache, ignore_errors=True)
                for start in ("cold", "warm"):
                    res = run_sweep_once(overrides, launcher, base, cache)
                    res.update(start=start, repeat=r)
                    results.append(res)
                    log(f"  {launcher:<8} {start:<4} wall {res['wall_seconds']:7.1f} s  rc {res['rc']}  "
                        f"compilations {res['compilations']:4d} ({res['compile_seconds']:.1f} s)  "
                        f"records {res['records']}  (load {os.getloadavg()[0]:.2f})")
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    info["loadavg_end"] = list(os.getloadavg())
    table = []
    for launcher in launchers:
        for start in ("cold", "warm"):
            rs = [x for x in results if x["launcher"] == launcher and x["start"] == start]
            if not rs:
                continue
            table.append({"launcher": launcher, "start": start,
                          "wall_seconds": summary([x["wall_seconds"] for x in rs]),
                          "compilations": summary([x["compilations"] for x in rs]),
                          "compile_seconds": summary([x["compile_seconds"] for x in rs]),
                          "records": rs[0]["records"], "ok": all(x["rc"] == 0 for x in rs)})
    for res in results:  # keep the JSON small: per-job run stats summarised above
        res["runs"] = [{k: v for k, v in run.items() if k in ("file", "compilations", "compile_seconds", "seconds",
                                                              "batches", "programs", "cells")}
                       for run in res["runs"]]
    return {"kind": "sweep", "overrides": list(overrides), "machine": info, "table": table, "runs": results}


def format_sweep_table(res: dict) -> str:
    lines = [f"sweep: {' '.join(res['overrides'])}"]
    hdr = f"{'launcher':<9} {'start':<5} {'wall s min/med/max':>24} {'compiles':>9} {'compile s':>10} {'cells':>6} ok"
    lines += [hdr, "-" * len(hdr)]
    for t in res["table"]:
        w = t["wall_seconds"]
        lines.append(f"{t['launcher']:<9} {t['start']:<5} {w['min']:>7.1f}/{w['median']:>7.1f}/{w['max']:>7.1f} "
                     f"{t['compilations']['median']:>9.0f} {t['compile_seconds']['median']:>10.1f} "
                     f"{t['records']:>6} {t['ok']}")
    return "\n".join(lines)


def write_json(path, obj):
    """A benchmark's JSON, written atomically (:func:`dreamjax.outputs.files.write_json`), and say so."""
    atomic_json(path, obj)
    print(f"wrote {path}")


def run_memory_bench(backbone_name="inception_v3", weights="random", sizes=(256, 512), batches=(1, 8),
                     tiled=None, tile_size=512, log=print) -> dict:
    """Peak RSS (ru_maxrss) of one compile + one step, each case in a fresh interpreter."""
    rows = []
    for size in sizes:
        for b in batches:
            m = measure_rss(backbone_name, weights, size, b, 1)
            rows.append(m)
            log(f"  {size}x{size} B={b}: peak RSS {m['ru_maxrss_mib']:.0f} MiB, step {m['seconds']:.2f} s")
    out = {"kind": "memory", "backbone": backbone_name, "machine": machine_info(), "rows": rows}
    if tiled:
        t = measure_rss(backbone_name, weights, tiled, 1, 1, tile_size=tile_size)
        t["peak_rss_gib"] = t["ru_maxrss_mib"] / 1024
        out["tiled"] = t
        log(f"  tiled {tiled}x{tiled} (tile {tile_size}): peak RSS {t['peak_rss_gib']:.2f} GiB, "
            f"one step {t['seconds']:.1f} s, compile {t['compile_seconds']:.1f} s")
    return out


# ----------------------------------------------------------------------------------------------
# Cold start: whole processes, start-up included
# ----------------------------------------------------------------------------------------------
# The seed study's four weight sets over mixed4..mixed7 (conf/layers/set1..4.yaml), as the TF
# notebook script takes them.
STUDY_SETS = {"set1": "1.0,1.5,2.0,2.5", "set2": "0.1,0.3,4.0,5", "set3": "4.0,3.5,0.3,0.5", "set4": "2.0,3.0,4.0,5"}


def cold_cli_overrides(paintings: Sequence[str] | str, long_side: int, run_dir: str, iterations: int = 30,
                       study: bool = False) -> list[str]:
    """The dreamjax CLI run that does what ``scripts/dlwp_notebook_tf.py`` does: InceptionV3 with
    random weights, DLwP preset (3 octaves x 30 steps), the paintings at ``long_side``; with
    ``study`` the seed study's grid, every painting x the 4 weight sets, as one ``-m`` sweep."""
    paintings = [paintings] if isinstance(paintings, str) else list(paintings)
    out = ["model=inception_v3", "model.weights=random", "dream=dlwp",
           f"dream.iterations={iterations}", f"data.paths=[{','.join(paintings)}]", f"data.image_size={long_side}",
           "outputs.gif=false", "outputs.octave_images=false", "checkpoint.enabled=false", "analyze=false"]
    if study:
        return ["-m", f"layers={','.join(STUDY_SETS)}", *out, f"hydra.sweep.dir={run_dir}"]
    return ["layers=set1", *out, f"hydra.run.dir={run_dir}"]


def run_cold_start_bench(tf_python: str | None, painting: Sequence[str] | str, long_side: int = 256,
                         repeats: int = 3, kernels: Sequence[str] = ("xla", "auto"), iterations: int = 30,
                         study: bool = False, experiment: str | None = None, log=print) -> dict:
    """Wall seconds of whole processes, interleaved over ``repeats``: the dreamjax CLI with an empty
    compilation cache (``cold``) and again with that cache (``warm``), once per ``dream.cpu_kernels``
    choice, against the DLwP notebook as a script on TensorFlow (``tf_python``). ``study``: every
    painting x the seed study's 4 weight sets, one ``dreamjax -m`` sweep against the notebook's
    cells re-run for each (set, painting) in one TF process. ``experiment``: time
    ``dreamjax +experiment=NAME`` as it is (e.g. the quickstart; no TF side). The oneDNN extension
    itself is built before timing (it is built once per machine, not per run)."""
    paintings = [painting] if isinstance(painting, str) else list(painting)
    info = machine_info()
    info["onednn"] = onednn_kernels.status().reason
    root = Path(tempfile.mkdtemp(prefix="dreamjax_cold_"))
    script = Path(__file__).resolve().parents[2] / "scripts" / "dlwp_notebook_tf.py"
    times: dict[str, list[float]] = {}
    try:
        for r in range(repeats):
            for k in kernels:
                cache = root / f"cache_{k}_{r}"
                for phase in ("cold", "warm"):
                    run_dir = root / f"run_{k}_{r}_{phase}"
                    # "auto:noprefetch": the same kernels with every octave compiled when it starts
                    kern, _, flag = k.partition(":")
                    env_k = dict(os.environ, DREAMJAX_JAX_CACHE=str(cache),
                                 **({"DREAMJAX_PREFETCH": "0"} if flag == "noprefetch" else {}))
                    over = ([f"+experiment={experiment}", f"hydra.run.dir={run_dir}"] if experiment else
                            cold_cli_overrides(paintings, long_side, str(run_dir), iterations, study))
                    cmd = [sys.executable, "-m", "dreamjax.cli", *over, f"dream.cpu_kernels={kern}"]
                    t0 = time.perf_counter()
                    p = subprocess.run(cmd, env=env_k, capture_output=True, text=True)
                    dt = time.perf_counter() - t0
                    if p.returncode != 0:
                        raise RuntimeError(f"dreamjax CLI failed ({p.returncode}): {p.stderr[-2000:]}")
                    times.setdefault(f"dreamjax_{k}_{phase}", []).append(dt)
                    stats = [json.loads(f.read_text()) for f in run_dir.rglob("run_stats.json")]
                    if stats:  # one per run (a sweep's batched launcher writes one per group's job)
                        times.setdefault(f"dreamjax_{k}_{phase}_compilations", []).append(
                            sum(d.get("compilations", 0) for d in stats))
                        times.setdefault(f"dreamjax_{k}_{phase}_compile_seconds", []).append(
                            sum(d.get("compile_seconds", 0.0) for d in stats))
            if tf_python and not experiment:
                t0 = time.perf_counter()
                sets = ["--sets", *STUDY_SETS.values()] if study else []
                p = subprocess.run([tf_python, str(script), *paintings, "--long-side", str(long_side),
                                    "--iterations", str(iterations), "--out", str(root / f"tf_{r}.png"), *sets],
                                   capture_output=True, text=True, env=dict(os.environ, KERAS_BACKEND="tensorflow"))
                if p.returncode != 0:
                    raise RuntimeError(f"TF notebook script failed ({p.returncode}): {p.stderr[-2000:]}")
                times.setdefault("tf_notebook", []).append(time.perf_counter() - t0)
            log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in times.items()
                                                          if not k.endswith(("compilations", "seconds"))))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    kind = f"cold_experiment_{experiment}" if experiment else "cold_study" if study else "cold_start"
    out = {"kind": kind, "painting": [] if experiment else paintings, "long_side": long_side,
           "iterations": iterations,
           "repeats": repeats, "machine": info, "wall_seconds": {k: summary(v) for k, v in times.items()}}
    if "tf_notebook" in times:
        out["tf_over_dreamjax"] = {k[len("dreamjax_"):]: summary([t / d for t, d in zip(times["tf_notebook"], v)])
                                   for k, v in times.items()
                                   if k.startswith("dreamjax_") and k.endswith(("_cold", "_warm"))}
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    return out


def format_cold_table(res: dict) -> str:
    what = {"cold_study": "seed study (paintings x 4 weight sets)", "cold_start": "cold start"}.get(
        res["kind"], res["kind"].replace("cold_experiment_", "+experiment="))
    names = ", ".join(Path(p).name for p in np.atleast_1d(res["painting"]))
    workload = (f"{names} at long side {res['long_side']}, {res['iterations']} steps x 3 octaves, "
                if res["painting"] else "as configured, ")
    lines = [f"{what}, whole processes: {workload}{res['repeats']} repeats; load "
             f"{res['machine']['loadavg_start'][0]:.2f} -> {res['machine']['loadavg_end'][0]:.2f}"]
    for k, s in res["wall_seconds"].items():
        lines.append(f"  {k:<42} {s['min']:8.2f} / {s['median']:8.2f} / {s['max']:8.2f}")
    for k, s in res.get("tf_over_dreamjax", {}).items():
        lines.append(f"  TF notebook / dreamjax {k:<20} {s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"
                     "  (>1: dreamjax faster)")
    return "\n".join(lines)
