#!/usr/bin/env python
"""Is there a supported XLA:CPU path to bfloat16 on AMX? Each XLA_FLAGS setting in a fresh process:
a 3x3 convolution at 64x64x192 (NHWC, forward) and a 2048^2 matmul, float32 vs bfloat16, against
the oneDNN custom call (models/kernels) in the same process. Best of 7 x 10 calls.

  python scripts/bench_xla_bf16.py --json results/bench/xla_bf16_paths.json   (~2 min)
"""
import argparse
import json
import os
import subprocess
import sys

SETTINGS = {  # flags this jaxlib (0.10.2) knows, from its binary's flag table
    "default": "",
    "xnnpack (dreamjax)": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_xnn_fusion_type="
                          "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "use_onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "onednn_fusion": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_fusion_type="
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}

WORKER = r'''
import json, time, jax, jax.numpy as jnp, numpy as np
from jax import lax
def best(f, *a):
    f(*a).block_until_ready(); ts = []
    for _ in range(7):
        t = time.perf_counter()
        [f(*a) for _ in range(10)][-1].block_until_ready()
        ts.append((time.perf_counter() - t) / 10)
    return min(ts)
DN = ("NHWC", "HWIO", "NHWC")
r = np.random.default_rng(0)
x = r.standard_normal((1, 64, 64, 192)).astype(np.float32); w = r.standard_normal((3, 3, 192, 192)).astype(np.float32)
a = r.standard_normal((2048, 2048)).astype(np.float32)
out = {}
conv_fl, mm_fl = 2 * 64 * 64 * 192 * 192 * 9, 2 * 2048 ** 3
for dt in ("float32", "bfloat16"):
    xs, ws, As = (jnp.asarray(v, dt) for v in (x, w, a))
    conv = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                                         preferred_element_type=jnp.float32))
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    out[f"xla_conv_{dt}_gflops"] = conv_fl / best(conv, xs, ws) / 1e9
    out[f"xla_matmul_{dt}_gflops"] = mm_fl / best(mm, As, As) / 1e9
from dreamjax.models import kernels
if kernels.status().available:
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    ours = jax.jit(lambda x, w: kernels.conv(x, w, None, (1, 1), ((1, 1), (1, 1))))
    out["onednn_conv_bfloat16_gflops"] = conv_fl / best(ours, xb, wb) / 1e9
    out["onednn_conv_float32_gflops"] = conv_fl / best(ours, jnp.asarray(x), jnp.asarray(w)) / 1e9
print("@@" + json.dumps(out))
'''


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = {"load_start": list(os.getloadavg()), "settings": {}}
    for name, flags in SETTINGS.items():
        env = dict(os.environ, XLA_FLAGS=flags, DREAMJAX_XLA_CPU_CONV="default")
        done = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True)
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("@@")]
        res["settings"][name] = {"XLA_FLAGS": flags, **(json.loads(line[0][2:]) if line else
                                                       {"error": done.stderr[-800:]})}
        print(name, json.dumps(res["settings"][name]), flush=True)
    res["load_end"] = list(os.getloadavg())
    if a.json:
        from dreamjax.bench.engine import write_json
        write_json(a.json, res)


if __name__ == "__main__":
    main()
