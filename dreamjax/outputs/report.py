"""Compare a sweep's cells: comparison grids, a contact sheet, summary.csv and index.html.

Works only from a sweep's manifest dict and the files under the sweep directory
(never JAX), so a report can be rebuilt on a laptop from a copied output folder:

    write_sweep_report(sweep_dir, manifest, originals)  # grids/, summary.csv, index.html

The figures follow the study that motivated dreamjax (seed_comparing_weights.png):
white background, the original beside one column per layer-weight set, a plain
sans caption under each image. Pillow draws them; matplotlib is not needed
(it is optional and only imported inside functions that plot curves).

Manifest paths are relative to ``sweep_dir``; every link in index.html is relative
too, so the folder opens from disk (file://) and can be moved or zipped.
"""
from __future__ import annotations

import csv
import datetime as _dt
import functools
import html
import io
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dreamjax import files
from dreamjax.outputs import images as _images

__all__ = [
    "comparison_grid", "contact_sheet", "write_summary_csv", "summary_rows", "write_gallery",
    "write_sweep_report", "render_analysis", "safe_name", "plot_losses",
]

PathLike = Union[str, os.PathLike]
# A cell of a figure: a uint8 image; a string = failure/pending message drawn in a box; None = missing.
CellImage = Union[np.ndarray, str, None]

BACKGROUND = (255, 255, 255)
INK = (25, 25, 25)
FAIL_FILL, FAIL_INK = (255, 238, 238), (170, 20, 20)
EMPTY_FILL, EMPTY_INK = (242, 242, 242), (120, 120, 120)
MAX_SHEET_SIDE = 16_000  # JPEG allows 65535; beyond ~16k px viewers struggle
THUMB_SIDE = 512  # originals/ thumbnails used by the gallery


# ---------------------------------------------------------------------------------------------
# Drawing


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:  # Pillow >= 10.1 bundles a scalable sans font (needs FreeType)
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow / no FreeType: small bitmap font
        return ImageFont.load_default()


def _line_height(font) -> int:
    box = font.getbbox("Ahgjy|")
    return int(box[3] - box[1]) + max(3, int(getattr(font, "size", 11) * 0.3))


def _text_width(font, text: str) -> float:
    return font.getlength(text)


def _wrap(text: str, font, max_w: float, max_lines: int = 3) -> list[str]:
    """Greedy word wrap; over-long words are split; overflow ends in an ellipsis."""
    words = str(text).split()
    lines: list[str] = []
    cur = ""
    for word in words:
        while _text_width(font, word) > max_w and len(word) > 1:  # split a word longer than a line
            cut = len(word) - 1
            while cut > 1 and _text_width(font, word[:cut]) > max_w:
                cut -= 1
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(word[:cut])
            word = word[cut:]
        trial = f"{cur} {word}".strip()
        if _text_width(font, trial) <= max_w or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_width(font, last + "…") > max_w:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines or [""]


def _fit(shape_hw: tuple[int, int], box_w: int, box_h: int) -> tuple[int, int]:
    h, w = shape_hw
    s = min(box_w / w, box_h / h)
    return max(1, round(w * s)), max(1, round(h * s))


def _cell_width(shape_hw: tuple[int, int], cell_height: int, max_aspect: float = 3.0) -> int:
    h, w = shape_hw
    return int(min(max(round(cell_height * w / h), cell_height // 2), round(cell_height * max_aspect)))


def _as_rgb(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise TypeError(f"figures take uint8 images, got {arr.dtype}; use images.to_uint8 first")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    return arr


def _paste_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, x: int, y: int, w: int, h: int,
                img: CellImage, font, ref_hw: tuple[int, int] | None = None) -> None:
    if isinstance(img, np.ndarray):
        arr = _as_rgb(img)
        fw, fh = _fit(arr.shape[:2], w, h)
        im = Image.fromarray(arr)
        if (fw, fh) != im.size:
            shrink = fw < im.size[0]
            im = im.resize((fw, fh), Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC)
        canvas.paste(im, (x + (w - fw) // 2, y + (h - fh) // 2))
        return
    failed = isinstance(img, str) and img.lower().startswith("failed")
    fill, ink = (FAIL_FILL, FAIL_INK) if failed else (EMPTY_FILL, EMPTY_INK)
    if ref_hw is not None:  # a placeholder takes the shape the image would have had
        fw, fh = _fit(ref_hw, w, h)
        fw, fh = max(fw, min(w, 48)), max(fh, min(h, 48))
        x, y, w, h = x + (w - fw) // 2, y + (h - fh) // 2, fw, fh
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=fill, outline=ink, width=2)
    text = img if isinstance(img, str) else "no image"
    lh = _line_height(font)
    lines = _wrap(text, font, w - 16, max_lines=max(1, (h - 16) // lh))
    ty = y + (h - lh * len(lines)) // 2
    for line in lines:
        draw.text((x + w // 2, ty), line, fill=ink, font=font, anchor="ma")
        ty += lh


def _render(rows: Sequence[tuple[str | None, Sequence[tuple[str, CellImage]]]], cell_w: int, cell_h: int,
            title: str | None, with_labels: bool) -> Image.Image:
    """Shared layout: optional title, then rows of [label] cell cell ... with captions below."""
    m = max(8, cell_h // 16)
    font = _font(max(12, round(cell_h / 14)))
    small = _font(max(11, round(cell_h / 18)))
    lh = _line_height(font)
    wrapped = [[_wrap(cap, font, cell_w) for cap, _ in cells] for _, cells in rows]
    n_cap = max([len(c) for r in wrapped for c in r] or [1])
    cap_h = n_cap * lh + m // 2
    row_h = cell_h + m // 2 + cap_h
    label_w = 0
    if with_labels:
        label_w = int(min(max([_text_width(font, str(lab or "")) for lab, _ in rows] + [60]) + m, 1.5 * cell_h))
    ncols = max([len(cells) for _, cells in rows] or [1])
    width = 2 * m + (label_w + m if with_labels else 0) + ncols * cell_w + (ncols - 1) * m
    title_lines: list[str] = []
    tfont = _font(max(14, round(cell_h / 11)))
    if title:
        title_lines = _wrap(title, tfont, width - 2 * m, max_lines=3)
    title_h = (len(title_lines) * _line_height(tfont) + m) if title_lines else 0
    height = m + title_h + len(rows) * row_h + (len(rows) - 1) * m + m
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = m
    for line in title_lines:
        draw.text((m, y), line, fill=INK, font=tfont)
        y += _line_height(tfont)
    y += m if title_lines else 0
    for (label, cells), caps in zip(rows, wrapped):
        x = m
        if with_labels:
            lab = _wrap(str(label or ""), font, label_w, max_lines=max(1, cell_h // lh))
            ly = y + (cell_h - lh * len(lab)) // 2
            for line in lab:
                draw.text((x, ly), line, fill=INK, font=font)
                ly += lh
            x += label_w + m
        ref = next((np.asarray(i).shape[:2] for _, i in cells if isinstance(i, np.ndarray)), None)
        for (_, img), cap_lines in zip(cells, caps):
            _paste_cell(canvas, draw, x, y, cell_w, cell_h, img, small, ref)
            cy = y + cell_h + m // 2
            for line in cap_lines:
                draw.text((x + cell_w // 2, cy), line, fill=INK, font=font, anchor="ma")
                cy += lh
            x += cell_w + m
        y += row_h + m
    return canvas


def comparison_grid(original: CellImage, columns: Sequence[tuple[str, CellImage]],
                    title: str | None = None, cell_height: int = 256,
                    original_caption: str = "Original") -> Image.Image:
    """The original beside one column per setting, captioned (seed_comparing_weights.png style).

    Every cell is a ``cell_width × cell_height`` box, ``cell_width`` following the
    original's aspect (clamped to [cell_height/2, 3·cell_height]); images are fitted
    and centred. A column's image may be a string (drawn as a boxed message; strings
    starting with "failed" in red) or None; so may ``original``. Size:
    ``width = 2·m + n·cell_width + (n−1)·m`` with ``n = 1 + len(columns)`` and
    ``m = max(8, cell_height // 16)``.
    """
    ref = original if isinstance(original, np.ndarray) else next(
        (img for _, img in columns if isinstance(img, np.ndarray)), None)
    cell_w = _cell_width(np.asarray(ref).shape[:2], cell_height) if ref is not None else cell_height
    cells = [(original_caption, original)] + list(columns)
    return _render([(None, cells)], cell_w, cell_height, title, with_labels=False)


def contact_sheet(rows: Sequence[tuple[str, Sequence[tuple[str, CellImage]]]], *, cell_height: int = 160,
                  title: str | None = None, max_cell_aspect: float = 2.5) -> Image.Image:
    """All cells on one sheet: one row per painting (label on the left), one column per setting.

    All boxes share one width (the widest image's, clamped to ``max_cell_aspect``), so
    columns line up across paintings of different aspect ratios.
    """
    shapes = [np.asarray(img).shape[:2] for _, cells in rows for _, img in cells if isinstance(img, np.ndarray)]
    cell_w = max([_cell_width(s, cell_height, max_cell_aspect) for s in shapes] or [cell_height])
    return _render(list(rows), cell_w, cell_height, title, with_labels=True)


# ---------------------------------------------------------------------------------------------
# summary.csv


def _fmt_csv(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # round-trips exactly
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def _union_keys(dicts: Iterable[Mapping | None]) -> list[str]:
    keys: dict[str, None] = {}
    for d in dicts:
        for k in (d or {}):
            keys.setdefault(str(k), None)
    return list(keys)


def summary_rows(cells: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of summary.csv; columns are the union over all cells, first-seen order.

    Columns: id, painting, layers, label, status, error, overrides (space-joined),
    hyper.<name>…, loss.<tap>… (final per-tap loss), final_loss, seconds.<phase>…,
    output.<kind>… (paths relative to the sweep dir; lists joined with ';').
    """
    hyper = _union_keys(c.get("hyper") for c in cells)
    taps = _union_keys(c.get("final_losses") for c in cells)
    secs = _union_keys(c.get("seconds") for c in cells)
    outs = [k for k in _union_keys(c.get("outputs") for c in cells) if k != "frames"]  # frames: a count below
    # Motion cells (sweep/motion.py): frames, seconds spent on them, mean instability warped / not.
    moving = any("frames" in c for c in cells)
    motion_cols = ["frames", "frame_seconds", "stability.with_flow", "stability.without_flow"] if moving else []
    header = (["id", "painting", "layers", "label", "status", "error", "overrides"]
              + [f"hyper.{k}" for k in hyper] + [f"loss.{t}" for t in taps] + ["final_loss"]
              + [f"seconds.{k}" for k in secs] + motion_cols + [f"output.{k}" for k in outs])
    rows = []
    for c in cells:
        h, fl, s, o = (c.get(k) or {} for k in ("hyper", "final_losses", "seconds", "outputs"))
        out_vals = [";".join(map(str, v)) if isinstance(v, (list, tuple)) else _fmt_csv(v)
                    for v in (o.get(k) for k in outs)]
        rows.append([_fmt_csv(c.get("id")), _fmt_csv(c.get("painting")), _fmt_csv(c.get("layers")),
                     _fmt_csv(c.get("label")), _fmt_csv(c.get("status")),
                     " ".join(str(c["error"]).split()) if c.get("error") else "",
                     " ".join(map(str, c.get("overrides") or []))]
                    + [_fmt_csv(h.get(k)) for k in hyper] + [_fmt_csv(fl.get(t)) for t in taps]
                    + [_fmt_csv(c.get("final_loss"))] + [_fmt_csv(s.get(k)) for k in secs]
                    + ([_fmt_csv(c.get("frames")), _fmt_csv(c.get("frame_seconds")),
                        _fmt_csv((c.get("stability") or {}).get("with_flow")),
                        _fmt_csv((c.get("stability") or {}).get("without_flow"))] if moving else [])
                    + out_vals)
    return header, rows


def write_summary_csv(path: PathLike, cells: Sequence[Mapping]) -> Path:
    """One row per cell (see :func:`summary_rows`), written atomically."""
    header, rows = summary_rows(cells)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return files.atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# index.html

_CSS = """
body{font:14px/1.4 -apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#1a1a1a;background:#fff}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:28px 0 8px}h2 small{font-weight:normal;color:#777}
.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:8px 0}
.facts dt{color:#666}.facts dd{margin:0}
nav a{margin-right:14px}.shared{color:#555;font-size:13px}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;width:240px}figure img,figure video{width:240px;height:auto;display:block;border:1px solid #eee}
figure.original img{border-color:#999}
figcaption{font-size:13px;margin-top:4px}figcaption b{display:block}
.hyper,.meta{display:block;color:#555;font-size:12px}.links a{font-size:12px;margin-right:8px}
.box{width:238px;min-height:160px;border:2px solid #aa1414;background:#ffeeee;color:#aa1414;
 padding:8px;box-sizing:border-box;overflow-wrap:anywhere}
.box pre{white-space:pre-wrap;font-size:12px;margin:4px 0 0}
.box.pending{border-color:#999;background:#f2f2f2;color:#666}
.painting-error{border:2px solid #aa1414;background:#ffeeee;color:#aa1414;padding:8px}
.analysis{font-size:12px;color:#333;margin:4px 0 0;padding-left:18px}
.analysis-head{font-size:12px;font-weight:bold;color:#7a3e00;margin-top:4px}.analysis.hallucinated{color:#7a3e00}
.analysis.none{margin:2px 0;color:#777}.meta-inline{color:#777}
.notes{color:#777;font-size:12px}footer{margin-top:32px;color:#888;font-size:12px}
"""


# After load, <body data-images=N data-broken=K data-broken-src="..."> counts images that did not
# render (tests read it with headless Chromium --dump-dom). With #selfcheck in the URL, lazy images
# are loaded first so every image is checked. A body onload attribute, not a <script> element.
_SELF_CHECK_JS = (
    "var imgs=Array.prototype.slice.call(document.images);"
    "if(location.hash==='#selfcheck')imgs.forEach(function(i){i.loading='eager';});"
    "Promise.all(imgs.map(function(i){return i.complete?null:new Promise(function(r){"
    "i.addEventListener('load',r);i.addEventListener('error',r);});})).then(function(){"
    "var bad=imgs.filter(function(i){return !i.complete||i.naturalWidth===0;});"
    "document.body.dataset.images=imgs.length;"
    "document.body.dataset.brokenSrc=bad.map(function(i){return i.getAttribute('src');}).join(' ');"
    "document.body.dataset.broken=bad.length;});"
    # Videos (motion cells): play each muted and sample currentTime twice, so a test can see it
    # advance: data-videos=N data-videos-playing=K data-video-first/-second (space-separated seconds).
    "var vids=Array.prototype.slice.call(document.querySelectorAll('video'));"
    "document.body.dataset.videos=vids.length;"
    "vids.forEach(function(v){v.muted=true;var p=v.play();if(p&&p.catch)p.catch(function(){});});"
    "function times(){return vids.map(function(v){return v.currentTime.toFixed(3);}).join(' ');}"
    "setTimeout(function(){document.body.dataset.videoFirst=times();},600);"
    "setTimeout(function(){document.body.dataset.videoSecond=times();document.body.dataset.videosPlaying="
    "vids.filter(function(v){return v.currentTime>0&&!v.error;}).length;},1600);"
)


def safe_name(name: str) -> str:
    """A file-name-safe version of a painting name (used for grids/ and originals/): the same slug the
    cells' folders use (Unicode letters kept), so three Japanese titles give three grids."""
    return files.slug(str(name))


def _href(rel: str) -> str:
    return html.escape(urllib.parse.quote(str(rel).replace(os.sep, "/"), safe="/"), quote=True)


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str)
    return str(v)


def render_analysis(analysis: Mapping[str, Any] | None) -> str:
    """HTML for a cell's (or original's) analysis dict; the hook for later analysis content.

    Known keys: ``top_classes`` — list of ``[label, prob]`` rendered as a ranked list;
    ``hallucinated`` — same, under a "new in top-5" heading (dreamjax.outputs.analysis).
    Any other key is rendered as ``key: value``. Everything is escaped.
    """
    if not analysis:
        return ""
    parts = []
    top = analysis.get("top_classes")
    if top:
        items = "".join(f"<li>{_esc(lab)} <span class=meta-inline>{float(p) * 100:.1f}%</span></li>"
                        if isinstance(p, (int, float)) else f"<li>{_esc(lab)}</li>" for lab, p in top)
        parts.append(f'<ol class="analysis top-classes">{items}</ol>')
    if "hallucinated" in analysis:  # dreamjax.outputs.analysis: classes new in the dream's top-5
        new = analysis.get("hallucinated") or []
        items = "".join(f"<li>{_esc(lab)} <span class=meta-inline>{float(p) * 100:.1f}%</span></li>" for lab, p in new)
        parts.append('<div class="analysis-head">new in top-5</div>'
                     + (f'<ol class="analysis hallucinated">{items}</ol>' if items
                        else '<p class="analysis none">none (same top-5 as the original)</p>'))
    rest = {k: v for k, v in analysis.items() if k not in ("top_classes", "hallucinated")}
    if rest:
        items = "".join(f"<li>{_esc(k)}: {_esc(_fmt_value(v))}</li>" for k, v in rest.items())
        parts.append(f'<ul class="analysis">{items}</ul>')
    return "".join(parts)


def _cell_analysis(cell: Mapping, extra: Mapping | None) -> dict:
    out: dict = {}
    if cell.get("top_classes"):
        out["top_classes"] = cell["top_classes"]
    out.update(cell.get("analysis") or {})
    if extra:
        out.update(extra.get(str(cell.get("id")), {}) or {})
    return out


def _painting_names(manifest: Mapping) -> list[str]:
    names = list((manifest.get("paintings") or {}).keys())
    for c in manifest.get("cells") or []:
        if c.get("painting") not in names:
            names.append(c.get("painting"))
    return [str(n) for n in names]


def _varying_hyper(cells: Sequence[Mapping]) -> tuple[list[str], dict]:
    """Hyperparameter names whose value differs between cells, and the shared ones."""
    keys = _union_keys(c.get("hyper") for c in cells)
    varying, shared = [], {}
    for k in keys:
        vals = {json.dumps((c.get("hyper") or {}).get(k), sort_keys=True, default=str) for c in cells}
        if len(vals) > 1:
            varying.append(k)
        else:
            shared[k] = (cells[0].get("hyper") or {}).get(k)
    return varying, shared


def _rel_if_file(sweep_dir: Path, rel: Any) -> str | None:
    if not rel or not isinstance(rel, str):
        return None
    return rel if (sweep_dir / rel).is_file() else None


def _ensure_thumbnail(sweep_dir: Path, name: str, painting: Mapping | None,
                      pixels: np.ndarray | None = None) -> str | None:
    rel = f"originals/{safe_name(name)}.jpg"
    target = sweep_dir / rel
    if pixels is None and target.is_file():
        return rel
    if pixels is None and painting and painting.get("path") and painting.get("status", "ok") == "ok":
        try:
            pixels = np.asarray(_images.load_painting(painting["path"]).pixels)
        except (_images.ImageError, OSError):
            pixels = None
    if pixels is None:
        return rel if target.is_file() else None
    arr = _as_rgb(pixels)
    h, w = arr.shape[:2]
    if max(h, w) > THUMB_SIDE:
        arr = _images.resize_uint8(arr, _scaled_hw(h, w, THUMB_SIDE))
    _images.save_jpeg(target, arr, quality=88)
    return rel


def _scaled_hw(h: int, w: int, long_side: int) -> tuple[int, int]:
    s = long_side / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def write_gallery(sweep_dir: PathLike, manifest: Mapping, *, analysis: Mapping[str, Mapping] | None = None,
                  analysis_md_path: PathLike | None = None, title: str | None = None) -> Path:
    """Write ``sweep_dir/index.html``: a static, self-contained gallery of the sweep.

    One row per painting: original thumbnail (``originals/<name>.jpg``, created from
    the painting's path when missing), then each cell's dream captioned with its label
    and the hyperparameters that vary across the sweep (shared ones are listed once in
    the header); a dream links to its iteration GIF. Failed cells are red boxes with
    the escaped error. Only files that exist are linked, all links are relative.

    Analysis hook: per cell, ``cell["top_classes"]``, ``cell["analysis"]`` and
    ``analysis[cell_id]`` (merged, later wins) are rendered by :func:`render_analysis`
    under the dream; a painting's ``top_classes``/``analysis`` under its original;
    ``analysis_md_path`` (or ``manifest["analysis_md"]``) is linked from the header.
    """
    sweep_dir = Path(sweep_dir)
    cells = list(manifest.get("cells") or [])
    paintings = dict(manifest.get("paintings") or {})
    varying, shared = _varying_hyper(cells) if cells else ([], {})
    status_counts: dict[str, int] = {}
    for c in cells:
        status_counts[str(c.get("status"))] = status_counts.get(str(c.get("status")), 0) + 1
    p_failed = sum(1 for p in paintings.values() if p.get("status") == "failed")
    title = title or f"dreamjax sweep · {sweep_dir.resolve().name}"

    out: list[str] = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body onload=\"{_esc(_SELF_CHECK_JS)}\">",
        f"<header><h1>{_esc(title)}</h1><dl class=facts>",
    ]
    wid = str(manifest.get("weights_id") or "")
    facts = [
        ("backbone", _esc(manifest.get("backbone", "?"))),
        ("weights", f'<code title="{_esc(wid)}">{_esc(wid[:16] + ("…" if len(wid) > 16 else ""))}</code>'),
        ("dreamjax", _esc(manifest.get("dreamjax_version", "?"))),
        ("created", _esc(manifest.get("created", "?"))),
        ("paintings", f"{len(paintings) - p_failed} ok, {p_failed} failed" if paintings else "0"),
        ("cells", f"{len(cells)} total: " + ", ".join(f"{v} {_esc(k)}" for k, v in sorted(status_counts.items()))),
    ]
    # Times: the sweep's own wall clock (run_stats.json). Per-cell seconds are their batch's and
    # would count a batch once per cell if summed.
    try:
        st = json.loads((sweep_dir / "run_stats.json").read_text())
        facts.append(("time", f"{float(st.get('seconds', 0)):.1f} s, of which compiling "
                              f"{float(st.get('compile_seconds', 0)):.1f} s ({int(st.get('programs', 0))} dream "
                              f"programs, {int(st.get('batches', 0))} batches)"))
    except (OSError, ValueError, TypeError):
        pass
    out += [f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts] + ["</dl><nav>"]
    for rel, text in [("summary.csv", "summary.csv"), ("manifest.json", "manifest.json"),
                      ("grids/all_cells.jpg", "all cells (contact sheet)")]:
        if (sweep_dir / rel).is_file():
            out.append(f'<a href="{_href(rel)}">{_esc(text)}</a>')
    md = analysis_md_path or manifest.get("analysis_md")
    if md:
        md_path = Path(md) if Path(md).is_absolute() else sweep_dir / md
        if md_path.is_file():
            out.append(f'<a href="{_href(os.path.relpath(md_path, sweep_dir))}">analysis</a>')
    for rel, text in manifest.get("analysis_links") or []:  # e.g. dreamjax.outputs.analysis plots
        if (sweep_dir / rel).is_file():
            out.append(f'<a href="{_href(rel)}">{_esc(text)}</a>')
    out.append("</nav>")
    if shared:
        out.append("<p class=shared>shared settings: " + _esc(", ".join(f"{k}={_fmt_value(v)}"
                                                                         for k, v in shared.items())) + "</p>")
    out.append("</header><main>")

    for name in _painting_names(manifest):
        p = paintings.get(name) or {}
        pcells = [c for c in cells if str(c.get("painting")) == name]
        size = p.get("size")
        sub = f" <small>{int(size[0])}×{int(size[1])}</small>" if size and len(size) == 2 else ""
        out.append(f'<section class=painting id="p-{_esc(safe_name(name))}"><h2>{_esc(name)}{sub}</h2>')
        if p.get("notes"):
            out.append("<p class=notes>" + _esc("; ".join(map(str, p["notes"]))) + "</p>")
        grid_rel = f"grids/{safe_name(name)}.jpg"
        if (sweep_dir / grid_rel).is_file():
            out.append(f'<p class=links><a href="{_href(grid_rel)}">comparison grid</a></p>')
        if p.get("status") == "failed":
            out.append("<div class=painting-error><strong>painting failed</strong>"
                       f"<pre>{_esc(p.get('error'))}</pre></div>")
        out.append("<div class=row>")
        thumb = _ensure_thumbnail(sweep_dir, name, p) if p.get("status") != "failed" else None
        if thumb:
            out.append(f'<figure class=original><a href="{_href(thumb)}"><img src="{_href(thumb)}" '
                       f'alt="original {_esc(name)}"></a><figcaption><b>original</b>'
                       f'{render_analysis(_cell_analysis(p, None))}</figcaption></figure>')
        for c in pcells:
            out.append(_cell_html(sweep_dir, c, varying, analysis))
        out.append("</div></section>")
    now = _dt.datetime.now().isoformat(timespec="seconds")
    out.append(f"</main><footer>written by dreamjax.outputs.report at {_esc(now)}</footer></body></html>")
    return files.atomic_write_text(sweep_dir / "index.html", "\n".join(out) + "\n")


def _cell_html(sweep_dir: Path, c: Mapping, varying: Sequence[str], analysis: Mapping | None) -> str:
    o = c.get("outputs") or {}
    label = c.get("label") or c.get("layers") or c.get("id")
    status = str(c.get("status") or "pending")
    hyper = c.get("hyper") or {}
    hyper_txt = ", ".join(f"{k}={_fmt_value(hyper[k])}" for k in varying if k in hyper)
    meta = []
    if isinstance(c.get("final_loss"), (int, float)):
        meta.append(f"loss {c['final_loss']:.4g}")
    secs = c.get("seconds") or {}
    if secs:
        meta.append("batch " + " + ".join(f"{k} {float(v):.1f}s" for k, v in secs.items()
                                          if isinstance(v, (int, float))))
    dream = _rel_if_file(sweep_dir, o.get("dream")) if status == "done" else None
    gif = _rel_if_file(sweep_dir, o.get("gif"))
    mp4 = _rel_if_file(sweep_dir, o.get("video")) if status == "done" else None
    if mp4:  # a motion cell: its MP4 (H.264, yuv420p), the last frame as the poster
        poster = f' poster="{_href(dream)}"' if dream else ""
        body = (f'<video src="{_href(mp4)}"{poster} width="240" controls muted loop autoplay playsinline '
                f'preload="auto" title="{_esc(label)}"></video>')
    elif dream:
        target = gif or dream
        tip = "open the iteration GIF" if gif else "open the dream"
        body = (f'<a href="{_href(target)}" title="{tip}"><img src="{_href(dream)}" loading="lazy" '
                f'alt="{_esc(label)}"></a>')
    elif status == "failed":
        body = f"<div class=box><strong>FAILED</strong><pre>{_esc(c.get('error') or 'no error recorded')}</pre></div>"
    elif status == "done":
        body = "<div class='box pending'><strong>missing output</strong><pre>dream image not found</pre></div>"
    else:
        body = f"<div class='box pending'><strong>{_esc(status)}</strong></div>"
    links = []
    if isinstance(c.get("frames"), int):
        meta.append(f"{c['frames']} frames")
    stab = c.get("stability")
    if isinstance(stab, Mapping) and isinstance(stab.get("with_flow"), (int, float)):
        meta.append(f"instability {stab['with_flow']:.4f} warped / {stab.get('without_flow', float('nan')):.4f} raw")
    for key, text in [("dream", "png"), ("video", "mp4"), ("gif", "gif"), ("stability", "stability"),
                      ("losses", "losses"), ("config", "config"),
                      ("hydra_config", "hydra")]:
        rel = _rel_if_file(sweep_dir, o.get(key))
        if rel:
            links.append(f'<a href="{_href(rel)}">{text}</a>')
    cap = [f"<b>{_esc(label)}</b>"]
    if hyper_txt:
        cap.append(f"<span class=hyper>{_esc(hyper_txt)}</span>")
    if meta:
        cap.append(f"<span class=meta>{_esc(' · '.join(meta))}</span>")
    if links:
        cap.append(f"<span class=links>{''.join(links)}</span>")
    cap.append(render_analysis(_cell_analysis(c, analysis)))
    return (f'<figure class="cell {_esc(status)}" id="cell-{_esc(c.get("id"))}">{body}'
            f"<figcaption>{''.join(cap)}</figcaption></figure>")


# ---------------------------------------------------------------------------------------------
# The whole report


def _read_rgb(path: Path) -> np.ndarray | str:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        return f"unreadable output ({type(e).__name__})"


def _cell_figure_image(sweep_dir: Path, c: Mapping) -> CellImage:
    status = str(c.get("status") or "pending")
    if status == "failed":
        return f"failed: {' '.join(str(c.get('error') or '').split())}"
    rel = (c.get("outputs") or {}).get("dream")
    if status == "done" and rel and (sweep_dir / rel).is_file():
        return _read_rgb(sweep_dir / rel)
    return "missing output" if status == "done" else status


def _shrink(img: CellImage, cell_height: int) -> CellImage:
    """Downscale early (memory): height to ``cell_height``; figures fit it into its box later."""
    if not isinstance(img, np.ndarray) or img.shape[0] <= cell_height:
        return img
    h, w = img.shape[:2]
    return _images.resize_uint8(_as_rgb(img), (cell_height, max(1, round(w * cell_height / h))))


def _sheet_cell_height(aspects: Sequence[float], ncols: int, nrows: int, wanted: int) -> int:
    """Largest cell height <= wanted keeping the contact sheet under MAX_SHEET_SIDE."""
    a = min(max(list(aspects) + [1.0]), 2.5)
    h = wanted
    while h > 32:
        m = max(8, h // 16)
        width = 2 * m + 1.5 * h + m + ncols * (a * h + m)
        height = 2 * m + nrows * (h + 4 * m + 3 * (h / 14 * 1.3))
        if width <= MAX_SHEET_SIDE and height <= MAX_SHEET_SIDE:
            break
        h = int(h * 0.85)
    return max(32, h)


def write_sweep_report(sweep_dir: PathLike, manifest: Mapping, originals: Mapping[str, np.ndarray], *,
                       cell_height: int = 256, sheet_cell_height: int = 160,
                       analysis: Mapping[str, Mapping] | None = None,
                       analysis_md_path: PathLike | None = None) -> dict[str, Any]:
    """Write grids/<painting>.jpg, grids/all_cells.jpg, originals/, summary.csv and index.html.

    ``originals``: painting name -> uint8 pixels (as loaded); a painting missing from
    it is re-read from its manifest path. Columns follow the manifest's cell order,
    captioned by ``cell["label"]``. Returns ``{"grids": {name: path}, "originals":
    {name: path}, "all_cells": path, "summary_csv": path, "index_html": path}``.
    """
    sweep_dir = Path(sweep_dir)
    cells = list(manifest.get("cells") or [])
    written: dict[str, Any] = {"grids": {}, "originals": {}}
    atlas = [c for c in cells if str(c.get("unit") or "").rpartition("_")[2].isdigit()]  # channel atlases
    if atlas:  # one contact sheet per atlas tap instead of a 64-column comparison grid
        written["atlases"] = write_atlas_sheets(sweep_dir, atlas, cell_height=min(sheet_cell_height, 128))
        cells = [c for c in cells if c not in atlas]
    paintings = dict(manifest.get("paintings") or {})
    names = _painting_names({**manifest, "cells": cells}) if atlas else _painting_names(manifest)

    def shape_of(name: str) -> tuple[int, int] | None:
        if name in originals and originals[name] is not None:
            return tuple(np.asarray(originals[name]).shape[:2])
        size = (paintings.get(name) or {}).get("size")
        return (int(size[1]), int(size[0])) if size else None

    ncols = max([sum(1 for c in cells if str(c.get("painting")) == n) for n in names] or [0]) + 1
    aspects = [s[1] / s[0] for s in map(shape_of, names) if s]
    sheet_h = _sheet_cell_height(aspects, ncols, len(names), sheet_cell_height)

    sheet_rows = []
    for name in names:
        p = paintings.get(name) or {}
        pcells = [c for c in cells if str(c.get("painting")) == name]
        orig: CellImage = originals.get(name)
        if orig is None and p.get("status") != "failed":
            rel = _ensure_thumbnail(sweep_dir, name, p)
            orig = _read_rgb(sweep_dir / rel) if rel else "original unavailable"
        elif orig is not None:
            rel = _ensure_thumbnail(sweep_dir, name, p, pixels=np.asarray(orig))
        else:
            rel = None
            orig = f"failed: {' '.join(str(p.get('error') or '').split())}"
        if rel:
            written["originals"][name] = sweep_dir / rel
        columns = [(str(c.get("label") or c.get("layers") or c.get("id")), _cell_figure_image(sweep_dir, c))
                   for c in pcells]
        columns = [(cap, _shrink(img, cell_height)) for cap, img in columns]
        orig = _shrink(orig, cell_height)
        if pcells or isinstance(orig, np.ndarray):
            grid = comparison_grid(orig, columns, title=name, cell_height=cell_height)
            path = sweep_dir / "grids" / f"{safe_name(name)}.jpg"
            _images.save_jpeg(path, np.asarray(grid), quality=90)
            written["grids"][name] = path
        picking = [c for c in pcells if c.get("picked") and c.get("status") == "done"]
        if picking:  # a layer atlas: what each tap's picked channels dream on this painting
            written.setdefault("layer_atlases", {})[name] = write_layer_atlas_sheet(
                sweep_dir, name, orig, picking, cell_height=min(cell_height, 256))
        sheet_rows.append((name, [("original", _shrink(orig, sheet_h))]
                           + [(cap, _shrink(img, sheet_h)) for cap, img in columns]))
    if sheet_rows:
        sheet = contact_sheet(sheet_rows, cell_height=sheet_h, title=_sheet_title(manifest))
        written["all_cells"] = _images.save_jpeg(sweep_dir / "grids" / "all_cells.jpg", np.asarray(sheet), quality=88)
    written["summary_csv"] = write_summary_csv(sweep_dir / "summary.csv", cells)
    written["index_html"] = write_gallery(sweep_dir, manifest, analysis=analysis, analysis_md_path=analysis_md_path)
    return written


CLASS_TAPS = ("logits",)  # = sweep/units.py CLASS_TAPS: an atlas whose "channels" are the classifier's classes


@functools.lru_cache(maxsize=1)
def _imagenet_labels() -> tuple[str, ...]:
    return tuple(files.IMAGENET_LABELS.read_text(encoding="utf-8").split())


def _top_class(cell: Mapping) -> str | None:
    """The classifier's top class of a cell's dream, where the analysis recorded one
    (``top_classes``: ``[[label, p], ...]`` or ``[{"label": .., "p": ..}, ...]``)."""
    top = cell.get("top_classes") or (cell.get("analysis") or {}).get("top_classes")
    if not top:
        return None
    first = top[0]
    label = first.get("label") if isinstance(first, Mapping) else (first[0] if isinstance(first, (list, tuple))
                                                                   else first)
    return str(label) if label else None


def atlas_tile_label(tap: str, channel: int, cell: Mapping) -> str:
    """The caption under an atlas tile: the channel index; for a class-like tap (the logits) the
    class's name from the bundled ImageNet labels (``1 goldfish``); and the classifier's top class
    of the dream where the analysis gave one and it differs (``top: tench``)."""
    label = str(channel)
    named = None
    if tap in CLASS_TAPS and 0 <= channel < len(_imagenet_labels()):
        named = _imagenet_labels()[channel]
        label += f" {named}"
    top = _top_class(cell)
    if top and top != named:
        label += f" (top: {top})" if named else f" {top}"
    return label


def write_atlas_sheets(sweep_dir: Path, cells: Sequence[Mapping], *, per_row: int = 8,
                       cell_height: int = 128) -> dict[str, Path]:
    """``grids/atlas_<tap>.jpg`` per tap of atlas cells (``unit`` = ``<tap>_<channel>``): tiles in
    channel order, captioned by :func:`atlas_tile_label` (the channel index; a class atlas's class
    names; the top class where the analysis gave one)."""
    by_tap: dict[str, list] = {}
    for c in cells:
        if c.get("status") != "done":
            continue
        tap, _, ch = str(c["unit"]).rpartition("_")
        by_tap.setdefault(tap, []).append((int(ch), c))
    out = {}
    for tap, items in sorted(by_tap.items()):
        items.sort(key=lambda t: t[0])
        tiles = [(atlas_tile_label(tap, ch, c), _shrink(_cell_figure_image(sweep_dir, c), cell_height))
                 for ch, c in items]
        rows = [(f"{tap} {items[i][0]}-{items[min(i + per_row, len(items)) - 1][0]}", tiles[i:i + per_row])
                for i in range(0, len(tiles), per_row)]
        what = "class atlas" if tap in CLASS_TAPS else "channel atlas"
        sheet = contact_sheet(rows, cell_height=cell_height, title=f"{what}: {tap}")
        out[tap] = _images.save_jpeg(sweep_dir / "grids" / f"atlas_{safe_name(tap)}.jpg", np.asarray(sheet), quality=88)
    return out


def layer_atlas_tile_label(cell: Mapping) -> str:
    """The caption under a layer-atlas tile: each tap and the channels its pick chose on the
    painting (``block9 · ch 12, 40, 77, 3``), strongest first."""
    picked = (cell.get("picked") or {}).items()
    return "; ".join(f"{tap} · ch {', '.join(str(i) for i in chans)}" for tap, chans in picked)


def write_layer_atlas_sheet(sweep_dir: Path, name: str, original: CellImage, cells: Sequence[Mapping], *,
                            per_row: int = 3, cell_height: int = 256) -> Path:
    """``grids/layer_atlas_<painting>.jpg``: the original, then one tile per layer-atlas cell (in
    the manifest's order, shallow to deep as the config lists the taps), each captioned with its tap
    and the channels picked (:func:`layer_atlas_tile_label`), ``per_row`` tiles a row."""
    cells = list(cells)
    modes = sorted({str(c.get("unit") or "").rpartition("_")[2] for c in cells} - {""})
    tiles = [("original", _shrink(original, cell_height))] + [
        (layer_atlas_tile_label(c), _shrink(_cell_figure_image(sweep_dir, c), cell_height)) for c in cells]
    rows = [("", tiles[i:i + per_row]) for i in range(0, len(tiles), per_row)]
    rows[0] = (name, rows[0][1])
    shapes = [np.asarray(img).shape[:2] for _, img in tiles if isinstance(img, np.ndarray)]
    cell_w = max([_cell_width(sh, cell_height, 2.5) for sh in shapes] or [cell_height])
    words = {"strong": "strongest", "weak": "weakest", "median": "median"}

    def said(mode: str) -> str:  # "strong4" -> "the 4 strongest"
        word = mode.rstrip("0123456789")
        return f"the {mode[len(word):]} {words.get(word, word)}".replace("  ", " ")

    title = f"layer atlas: {name}" + (f" ({' / '.join(map(said, modes))} channels of each tap here)" if modes else "")
    sheet = _render(rows, cell_w, cell_height, title, with_labels=False)
    return _images.save_jpeg(sweep_dir / "grids" / f"layer_atlas_{safe_name(name)}.jpg", np.asarray(sheet), quality=88)


def _sheet_title(manifest: Mapping) -> str:
    bits = [f"dreamjax {manifest.get('dreamjax_version', '')}".strip(), str(manifest.get("backbone") or "")]
    if manifest.get("created"):
        bits.append(str(manifest["created"]))
    return " · ".join(b for b in bits if b)


# ---------------------------------------------------------------------------------------------
# Optional plots (matplotlib imported lazily)


def _loss_series(obj: Any) -> dict[str, list[float]]:
    """Best-effort reading of a losses.json: {"total": [...], "mixed4": [...]} or a list of
    per-step dicts or a bare list of totals."""
    if isinstance(obj, Mapping):
        if isinstance(obj.get("octaves"), list) and obj.get("taps"):  # dreamjax.sweep.executor's format
            return _octave_loss_series(obj)
        if "steps" in obj and isinstance(obj["steps"], list):
            return _loss_series(obj["steps"])
        return {str(k): [float(x) for x in v] for k, v in obj.items()
                if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)}
    if isinstance(obj, list) and obj and all(isinstance(x, Mapping) for x in obj):
        keys = _union_keys(obj)
        return {k: [float(d[k]) for d in obj if isinstance(d.get(k), (int, float))] for k in keys
                if any(isinstance(d.get(k), (int, float)) for d in obj)}
    if isinstance(obj, list) and all(isinstance(x, (int, float)) for x in obj):
        return {"total": [float(x) for x in obj]}
    return {}


def _octave_loss_series(obj: Mapping) -> dict[str, list[float]]:
    """{"taps", "layer_weights", "octaves": [{"per_tap": [[loss per tap] per step]}]} -> series
    per tap and "total" (= sum of layer_weight * tap loss), steps of all octaves concatenated."""
    taps = [str(t) for t in obj["taps"]]
    weights = [float(w) for w in obj.get("layer_weights") or [1.0] * len(taps)]
    rows = [r for o in obj["octaves"] if isinstance(o, Mapping) for r in (o.get("per_tap") or [])
            if r is not None and len(r) == len(taps)]
    out = {t: [float(r[j]) for r in rows] for j, t in enumerate(taps)}
    out["total"] = [sum(w * float(v) for w, v in zip(weights, r)) for r in rows]
    return out


def plot_losses(sweep_dir: PathLike, manifest: Mapping, path: PathLike, series: str = "total") -> Path | None:
    """Loss curves of every done cell (one line per cell) into a PNG; needs matplotlib.

    Returns None when no cell has a readable losses.json containing ``series``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    n = 0
    for c in manifest.get("cells") or []:
        rel = (c.get("outputs") or {}).get("losses")
        if c.get("status") != "done" or not rel or not (sweep_dir / rel).is_file():
            continue
        try:
            s = _loss_series(json.loads((sweep_dir / rel).read_text())).get(series)
        except (OSError, ValueError):
            continue
        if s:
            ax.plot(s, label=f"{c.get('painting')} · {c.get('label') or c.get('id')}", linewidth=1)
            n += 1
    if not n:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(f"{series} loss")
    ax.spines[["top", "right"]].set_visible(False)
    if n <= 12:
        ax.legend(fontsize=8, frameon=False)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return files.atomic_write_bytes(path, buf.getvalue())
