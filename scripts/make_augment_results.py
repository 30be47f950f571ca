"""Publish an augment run (``dreamjax +experiment=augment``): a before/after strip of a few paintings,
captioned with EfficientNet-Lite0's p(target) and the second network's rank of the target, plus the
success rates as JSON. Reads the run's ``<out>/manifest.json`` (sweep/augment.py); no compute.

    python scripts/make_augment_results.py outputs/augment [--compare NAME=RUN_DIR ...] \
        [--paintings a,b,c,d] [--out results/augment]

``--compare`` adds other schedules' rates (other augment runs) to summary.json, so the default's
choice is on record; each schedule also gets the mean |dream - painting| (grey levels), how much of
the painting is left. Prints a Markdown table row per schedule.
Writes <out>/<target>_before_after.jpg and <out>/summary.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RATES = ("images", "target", "classifier", "success_rate_top1", "success_rate_top5", "mean_p_target_before",
         "mean_p_target_after", "second_classifier", "second_success_rate_top5", "second_success_rate_top1",
         "second_mean_p_target_before", "second_mean_p_target_after")


def _dataset(run_dir: Path) -> tuple[dict, Path]:
    m = next(run_dir.glob("*/manifest.json"))  # <out>/manifest.json beside the run's own manifest
    return json.loads(m.read_text()), m.parent


def _rates(result: dict) -> dict:
    return {k: result[k] for k in RATES if k in result}


def _change(result: dict, ds: Path) -> float:
    """Mean |dream - painting| in grey levels (0-255) at the dream's size: how much of the painting is left."""
    from dreamjax.outputs import images

    out = []
    for it in result["items"]:
        d = images.load_painting(ds / it["image"]).pixels.astype(np.float32)
        p = images.resize_uint8(images.load_painting(it["source"]).pixels, d.shape[:2]).astype(np.float32)
        out.append(float(np.abs(d - p).mean()))
    return round(float(np.mean(out)), 2)


def _run_seconds(run_dir: Path) -> dict:
    """The dream's seconds and the compilation part of them (run_stats.json): a warm compilation
    cache makes the second near zero."""
    stats = run_dir / "run_stats.json"
    if not stats.is_file():
        return {}
    s = json.loads(stats.read_text())
    return {"dream_seconds": s.get("seconds"), "compile_seconds": s.get("compile_seconds")}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--compare", action="append", default=[], help="NAME=RUN_DIR of another schedule")
    ap.add_argument("--name", default="default", help="this run's schedule name in summary.json")
    ap.add_argument("--wall", action="append", default=[], help="NAME=SECONDS: a run's measured wall clock "
                    "(the dream, both classifiers, the dataset)")
    ap.add_argument("--setting", action="append", default=[], help="NAME=OVERRIDES: what a schedule changed")
    ap.add_argument("--command", default="dreamjax +experiment=augment")
    ap.add_argument("--paintings", default="hokusai_great_wave,leonardo_mona_lisa,monet_san_giorgio_maggiore_at_dusk,"
                    "van_gogh_starry_night", help="comma-separated painting names for the strip")
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--out", default=str(REPO / "results" / "augment"))
    a = ap.parse_args(argv)

    from dreamjax import files
    from dreamjax.outputs import images, report

    run_dir = Path(a.run_dir)
    result, ds = _dataset(run_dir)
    by_name = {Path(it["source"]).stem: it for it in result["items"]}
    items = [by_name[n] for n in a.paintings.split(",")]
    second = result.get("second_classifier")
    before, after = [], []
    for it in items:
        name = Path(it["source"]).stem
        px = images.load_painting(it["source"]).pixels
        dream = images.load_painting(ds / it["image"]).pixels
        px = images.resize_uint8(px, dream.shape[:2])
        cap = lambda p, r: (f"Lite0 p={p:.2f}" + (f" · {second.replace('efficientnet_', '').title()} rank {r}"  # noqa: E731
                                                    if r is not None else ""))
        before.append((f"{name}: " + cap(it["p_target_before"], it.get("second_rank_before")), px))
        after.append((cap(it["p_target_after"], it.get("second_rank_after")), dream))
    h = a.height
    fit = lambda img: images.resize_uint8(img, (h, max(1, round(img.shape[1] * h / img.shape[0]))))  # noqa: E731
    before = [(c, fit(img)) for c, img in before]
    after = [(c, fit(img)) for c, img in after]
    n = result["images"]
    title = f"augment toward '{result['target']}': Lite0 top-1 {round(result['success_rate_top1'] * n)}/{n}"
    if second:
        title += f", {second} top-5 {round(result['second_success_rate_top5'] * n)}/{n}"
    title += "  (p: Lite0's probability of the target" + (
        "; rank: the second network's rank of it, 1 = top-1)" if second else ")")
    sheet = report.contact_sheet([("before", before), ("after", after)], cell_height=h, title=title)
    sheet = np.asarray(sheet)
    if max(sheet.shape[:2]) > 1600:
        s = 1600 / max(sheet.shape[:2])
        sheet = images.resize_uint8(sheet, (round(sheet.shape[0] * s), round(sheet.shape[1] * s)))
    out = Path(a.out)
    strip = images.save_jpeg(out / f"{result['target']}_before_after.jpg", sheet, quality=85)
    wall = {k: float(v) for k, _, v in (w.partition("=") for w in a.wall)}
    setting = {k: v for k, _, v in (w.partition("=") for w in a.setting)}

    def schedule(n: str, d: Path, r: dict, where: Path) -> dict:
        return {"overrides": setting.get(n, ""), **_rates(r), "mean_abs_change": _change(r, where), **_run_seconds(d),
                "wall_seconds": wall.get(n)}

    schedules = {a.name: schedule(a.name, run_dir, result, ds)}
    for spec in a.compare:
        n, _, d = spec.partition("=")
        schedules[n] = schedule(n, Path(d), *_dataset(Path(d)))
    summary = {"command": a.command, **_rates(result), "mean_abs_change": schedules[a.name]["mean_abs_change"],
               "items": [{k: it.get(k) for k in ("source", "top1_before", "top1_after", "p_target_before",
                                                 "p_target_after", "second_rank_before", "second_rank_after",
                                                 "second_top1_after")} | {"source": Path(it["source"]).name}
                         for it in result["items"]],
               "schedules": schedules}
    files.write_json(out / "summary.json", summary)
    print(f"{strip} ({strip.stat().st_size // 1024} KB, {sheet.shape[1]}x{sheet.shape[0]}); {out / 'summary.json'}")
    for n, r in schedules.items():
        k = r["images"]
        rates = " / ".join(str(round(r[q] * k)) for q in ("success_rate_top1", "second_success_rate_top5",
                                                          "second_success_rate_top1"))
        print(f"| {n} | `{r['overrides']}` | {rates} | {r['second_mean_p_target_after']:.2f} | "
              f"{r['mean_abs_change']:.1f} |")


if __name__ == "__main__":
    main()
