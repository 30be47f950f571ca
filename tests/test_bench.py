"""Smoke test of the benchmark logic (dreamjax/bench/engine.py) on the tiny backbone. No timing assertions."""
import json
import math

from dreamjax.bench import engine as bench


def test_engine_bench_tiny(tmp_path):
    res = bench.run_engine_bench("tiny", "random", sizes=(64,), batches=(1, 2), repeats=1, steps=1,
                                 peak_n=256, log=lambda *a: None)
    modes = {(r["mode"], r["batch"]) for r in res["rows"]}
    assert modes == {("batched", 1), ("batched", 2), ("per_cell", 2)}
    for r in res["rows"]:
        for k in ("seconds_per_step", "cell_steps_per_s", "compile_seconds", "flops_per_step",
                  "achieved_gflops", "peak_ratio", "compilations"):
            assert k in r, k
        assert r["seconds_per_step"]["min"] > 0
        # throughput is the batch over the step time, repeat by repeat (so the fastest step is the best rate)
        assert math.isclose(r["cell_steps_per_s"]["max"], r["batch"] / r["seconds_per_step"]["min"], rel_tol=1e-6)
        assert r["flops_per_step"] > 0 and math.isfinite(r["flops_per_step"])
        assert r["compilations"] >= 1
    b1 = next(r for r in res["rows"] if r["mode"] == "batched" and r["batch"] == 1)
    b2 = next(r for r in res["rows"] if r["mode"] == "batched" and r["batch"] == 2)
    # the body of the octave loop is one step: twice the cells, about twice the FLOPs
    assert 1.5 < b2["flops_per_step"] / b1["flops_per_step"] < 2.5
    assert res["matmul_peak"]["gflops_best"] > 0
    assert [q["vs"] for q in res["ratios"]] == ["per_cell"]
    table = bench.format_engine_table(res)
    assert "batched" in table and "per_cell" in table
    path = tmp_path / "engine.json"
    bench.write_json(path, res)
    assert json.loads(path.read_text())["kind"] == "engine"


def test_summary_and_sweep_table():
    s = bench.summary([3.0, 1.0, 2.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 2.0, 3.0, 3)
    res = {"overrides": ["a=1"], "table": [{"launcher": "basic", "start": "cold", "wall_seconds": s,
                                            "compilations": s, "compile_seconds": s, "records": 3, "ok": True}]}
    assert "basic" in bench.format_sweep_table(res)
