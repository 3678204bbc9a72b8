"""Segmentation figures on disk: ``segmentation.json`` (everything), ``segmentation_slides.csv`` (one row
per slide, method, resolution and class), ``plots/segmentation_METHOD.png`` (pooled Dice per class) and
``plots/segmentation_overlay_METHOD.png`` (truth, prediction, false positives / negatives of a few slides),
and an HTML section for report.html.

```python
from napari_slpd.evaluation.segmentation.report import write_segmentation_files, write_segmentation_report
html = write_segmentation_files(seg, folder)        # into an existing (temporary) report folder
write_segmentation_report(seg, "out")               # a folder of its own, atomically, with report.html
```
"""

from __future__ import annotations

import csv
import html as htmllib
import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

OVERLAY_SLIDES = 3
ERROR_COLORS = {"correct": (0.2, 0.7, 0.3), "false": (0.85, 0.15, 0.15), "missed": (0.95, 0.75, 0.1)}


def error_map(truth: np.ndarray, pred: np.ndarray, cls: int | None = None) -> np.ndarray:
    """[h, w] uint8: 0 not annotated, 1 correct, 2 wrong class predicted (a false positive of the
    predicted class and a false negative of the true one), 3 annotated but no prediction. With ``cls``:
    0 neither, 1 true positive, 2 false positive, 3 false negative of that class."""
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    out = np.zeros(truth.shape, np.uint8)
    if cls is None:
        annotated = truth >= 0
        out[annotated & (pred == truth)] = 1
        out[annotated & (pred >= 0) & (pred != truth)] = 2
        out[annotated & (pred < 0)] = 3
        return out
    annotated = truth >= 0
    out[annotated & (truth == cls) & (pred == cls)] = 1
    out[annotated & (truth != cls) & (pred == cls)] = 2
    out[annotated & (truth == cls) & (pred != cls)] = 3
    return out


def _rows(seg):
    for slide, methods in seg.slides.items():
        for method, per_res in methods.items():
            for res, f in per_res.items():
                for c, name in enumerate(seg.classes):
                    yield [slide, method, res, name, f["dice"][c], f["iou"][c], f["mean_dice"], f["mean_iou"],
                           f["pixel_accuracy"], f["n_units"]]


def _class_colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10)[:3] for i in range(n)]


def _colored(raster: np.ndarray, colors) -> np.ndarray:
    out = np.ones(raster.shape + (3,))
    for c, color in enumerate(colors):
        out[raster == c] = color
    return out


def _overlay_plot(path: Path, seg, method: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    slides = [s for s in seg.truths if method in seg.predictions[s]][:OVERLAY_SLIDES]
    colors = _class_colors(len(seg.classes))
    fig = Figure(figsize=(9, 2.8 * len(slides) + 0.6))
    axes = fig.subplots(len(slides), 3, squeeze=False)
    for row, slide in zip(axes, slides):
        truth, pred = seg.truths[slide].raster, seg.predictions[slide][method]
        errors = error_map(truth, pred)
        err_rgb = np.ones(truth.shape + (3,))
        for value, key in ((1, "correct"), (2, "false"), (3, "missed")):
            err_rgb[errors == value] = ERROR_COLORS[key]
        dice = seg.slides[slide][method]["patch"]["mean_dice"]
        for ax, image, title in zip(row, (_colored(truth, colors), _colored(pred, colors), err_rgb),
                                    (f"{slide}: annotation", f"{method} (mean Dice {dice:.2f} @ patch)", "errors")):
            ax.imshow(image, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    handles = [Patch(color=c, label=n) for c, n in zip(colors, seg.classes)]
    handles += [Patch(color=ERROR_COLORS["false"], label="wrong class (FP/FN)"),
                Patch(color=ERROR_COLORS["missed"], label="no prediction (FN)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


def _dice_plot(path: Path, seg, method: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    x = np.arange(len(seg.classes))
    for i, res in enumerate(("region", "patch")):
        pooled = seg.pooled[method][res]
        dice = np.asarray(pooled["figures"]["dice"], np.float64)
        ci = np.asarray(pooled["ci"]["dice"], np.float64)
        err = np.abs(np.stack([dice - ci[:, 0], ci[:, 1] - dice]))
        ax.bar(x + (i - 0.5) * 0.38, np.nan_to_num(dice), 0.38, yerr=np.nan_to_num(err), capsize=2, label=res)
    ax.set_xticks(x, seg.classes, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (pooled, 95% CI)")
    ax.set_title(f"{method}: Dice per class", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def html_section(seg, plots: list[str]) -> str:
    esc = htmllib.escape
    parts = ["<h2>Segmentation</h2>", "<ul>" + "".join(f"<li>{esc(line.strip())}</li>" for line in seg.lines())
             + "</ul>"]
    for method in seg.methods:
        for res in ("region", "patch"):
            f = seg.pooled[method][res]["figures"]
            ci = seg.pooled[method][res]["ci"]
            head = "".join(f"<th>{esc(c)}</th>" for c in seg.classes)
            cells = "".join(f"<td>{d:.3f} [{lo:.3f}, {hi:.3f}]</td>" if np.isfinite(d) else "<td>n/a</td>"
                            for d, (lo, hi) in zip(f["dice"], ci["dice"]))
            parts.append(f"<h3>{esc(method)} at {res} resolution</h3><table border=1 cellpadding=3>"
                         f"<tr><th>Dice</th>{head}<th>mean</th></tr><tr><td></td>{cells}"
                         f"<td>{f['mean_dice']:.3f}</td></tr></table>")
    parts += [f'<img src="{esc(p)}" style="max-width:100%">' for p in plots]
    return "\n".join(parts)


def write_segmentation_files(seg, folder: str | os.PathLike, plots: bool = True) -> str:
    """Write the segmentation files into ``folder``; returns the HTML section for report.html."""
    from napari_slpd.evaluation.report import _json_default, json_safe

    folder = Path(folder)
    (folder / "segmentation.json").write_text(
        json.dumps(json_safe(seg.to_dict()), indent=1, default=_json_default) + "\n", encoding="utf-8")
    with open(folder / "segmentation_slides.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "method", "resolution", "class", "dice", "iou", "mean_dice", "mean_iou",
                         "pixel_accuracy", "n_units"])
        writer.writerows(_rows(seg))
    shown = []
    if plots:
        (folder / "plots").mkdir(exist_ok=True)
        for method in seg.methods:
            for stem, fn in ((f"segmentation_{method}", _dice_plot), (f"segmentation_overlay_{method}", _overlay_plot)):
                path = folder / "plots" / f"{stem}.png"
                try:
                    fn(path, seg, method)
                    shown.append(f"plots/{path.name}")
                except Exception as exc:  # noqa: BLE001 - a plot that fails must not cost the numbers
                    log.warning("plot %s failed: %s", path.name, exc)
    return html_section(seg, shown)


def write_segmentation_report(seg, out: str | os.PathLike, plots: bool = True) -> Path:
    """A report folder holding the segmentation evaluation only (atomically), with report.html."""
    from napari_slpd.utils.files import atomic_folder

    out = Path(out)
    with atomic_folder(out) as tmp:
        section = write_segmentation_files(seg, tmp, plots=plots)
        (tmp / "report.html").write_text(
            "<!doctype html><html><head><meta charset='utf-8'><title>napari-slpd segmentation evaluation</title>"
            f"</head><body>{section}</body></html>", encoding="utf-8")
    return out.expanduser().resolve()
