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


def test_cold_study_runs_the_seed_study_sets_on_both_sides():
    """The TF notebook script gets the same 4 weight sets that `dreamjax -m layers=set1..set4` runs."""
    from pathlib import Path

    import yaml

    import dreamjax
    from dreamjax.bench import engine as bench

    over = bench.cold_cli_overrides(["a.jpg", "b.jpg"], 256, "/tmp/x", 30, study=True)
    assert over[0] == "-m" and f"layers={','.join(bench.STUDY_SETS)}" in over and "data.paths=[a.jpg,b.jpg]" in over
    assert "hydra.sweep.dir=/tmp/x" in over and not any(o.startswith("hydra.run.dir") for o in over)
    for name, weights in bench.STUDY_SETS.items():
        cfg = yaml.safe_load((Path(dreamjax.config_dir()) / "layers" / f"{name}.yaml").read_text())
        assert cfg["taps"] == ["mixed4", "mixed5", "mixed6", "mixed7"]
        assert [float(w) for w in weights.split(",")] == [float(w) for w in cfg["weights"]], name
