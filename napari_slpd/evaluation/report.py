"""The evaluation report folder: numbers, the embeddings behind them, plots and one HTML page.

```
OUT/
  results.json                 every figure, every fold's numbers, the config, which slides were used
  folds.csv                    task, fold, slide_id, case_id, role (train/test/val) for every fold of every task
  predictions.csv              task, representation, protocol, fold, slide_id, truth, prediction and scores
  embeddings/NAME.npz          slide_ids + vectors [N, D] (or prototypes [sum K, E] + counts [N]) used
  plots/roc_TASK_PROTOCOL.png  ROC curves (one panel per representation, one-vs-rest per class)
  plots/confusion_TASK_PROTOCOL.png, plots/km_TASK.png (Kaplan-Meier, high vs low risk split at the
  training median risk of each fold), plots/retrieval_TASK_REPR.png (query thumbnail + top 5 with labels)
  report.html                  all of it on one page
```
Writing is atomic: everything goes into a temporary folder beside OUT that is renamed onto OUT at the
end (an older OUT is replaced), so an interrupted run leaves the previous report or none, never half of
one. Plots use matplotlib's Agg canvas (no display needed).

```python
from napari_slpd.evaluation.report import write_report
write_report(result, "eval-out", cohort=cohort)     # -> Path of the report folder
```
"""

from __future__ import annotations

import contextlib
import csv
import html
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np

from napari_slpd.utils.files import atomic_folder

log = logging.getLogger(__name__)

THUMBNAIL_PX = 192
RETRIEVAL_EXAMPLES = 4
TOP_SHOWN = 5


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def json_safe(obj):
    """JSON has no NaN: NaN and infinities become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


# -- tables ---------------------------------------------------------------------------------------------------


def _write_folds(path: Path, result) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "fold", "fold_name", "slide_id", "case_id", "role"])
        for name, info in result.tasks.items():
            data = info.data
            for fold in data.folds:
                roles = {}
                for role, idx in (("train", fold.train), ("test", fold.test), ("val", fold.val)):
                    for i in idx:
                        roles[int(i)] = role
                for i in sorted(roles):
                    w.writerow([name, fold.index, fold.name, data.slide_ids[i], data.cases[i], roles[i]])


def _write_predictions(path: Path, result) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "representation", "protocol", "fold", "slide_id", "truth", "prediction", "scores"])
        for r in result.results:
            info = result.tasks[r.task]
            data, p = info.data, r.predictions
            for row in range(p.index.size):
                i = int(p.index[row])
                if p.proba is not None:
                    truth = info.classes[data.y[i]]
                    pred = info.classes[int(np.argmax(p.proba[row]))]
                    scores = " ".join(f"{v:.6g}" for v in p.proba[row])
                elif p.risk is not None:
                    truth = f"{data.time[i]:g}/{int(data.event[i])}"
                    pred, scores = f"{p.risk[row]:.6g}", f"{p.risk[row]:.6g}"
                else:
                    truth = info.classes[data.y[i]]
                    got = [data.slide_ids[j] for j in p.retrieved[row] if j >= 0]
                    pred = " ".join(got)
                    scores = " ".join(f"{d:.6g}" for d in p.distances[row] if np.isfinite(d))
                w.writerow([r.task, r.representation, r.protocol, int(p.fold[row]), data.slide_ids[i], truth, pred,
                            scores])


def _write_embeddings(folder: Path, result) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rep in result.representations.items():
        path = folder / f"{_safe(name)}.npz"
        ids = np.array(rep.slide_ids, dtype=str)
        if rep.vectors is not None:
            np.savez_compressed(path, slide_ids=ids, vectors=rep.vectors)
        elif rep.sets is not None:
            np.savez_compressed(path, slide_ids=ids, prototypes=np.concatenate(rep.sets),
                                counts=np.array([s.shape[0] for s in rep.sets], np.int64))
        else:
            continue
        out[name] = f"embeddings/{path.name}"
    return out


# -- plots ---------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _roc_plot(path: Path, results, info) -> None:
    from sklearn.metrics import roc_curve

    fig = _figure(max(4.8, 3.4 * len(results)), 3.4)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    data = info.data
    for ax, r in zip(axes, results):
        p = r.predictions
        y = data.y[p.index]
        classes = [1] if len(info.classes) == 2 else range(len(info.classes))
        for c in classes:
            if (y == c).any() and (y != c).any():
                fpr, tpr, _ = roc_curve(y == c, p.proba[:, c])
                label = info.classes[c] if len(info.classes) > 2 else f"{info.classes[1]} vs {info.classes[0]}"
                ax.plot(fpr, tpr, lw=1.5, label=label)
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
        fig_auc = r.summary["auc"]
        ax.set_title(f"{r.representation}\nAUC {fig_auc['mean']:.3f} ± {fig_auc['std']:.3f}", fontsize=9)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{info.name}: ROC ({results[0].protocol}, test predictions of all folds)", fontsize=10)
    fig.savefig(path)


def _confusion_plot(path: Path, results, info) -> None:
    n = len(info.classes)
    fig = _figure(max(3.0, 0.5 * n + 2.2) * len(results), max(3.0, 0.5 * n + 2.0))
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, r in zip(axes, results):
        p = r.predictions
        y, pred = info.data.y[p.index], np.argmax(p.proba, axis=1)
        cm = np.bincount(y * n + pred, minlength=n * n).reshape(n, n)
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(n), info.classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(n), info.classes, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(r.representation, fontsize=9)
    fig.suptitle(f"{info.name}: confusion ({results[0].protocol})", fontsize=10)
    fig.savefig(path)


def high_risk_groups(predictions, data) -> np.ndarray:
    """[n] bool: test slides whose predicted risk is above the median risk of their fold's training slides
    (the split of the Kaplan-Meier curves; the test median when a fold did not record its training median)."""
    p = predictions
    high = np.zeros(p.index.size, bool)
    for fold in data.folds:
        rows = p.rows_of_fold(fold.index)
        median = p.extra.get(fold.name, {}).get("train_median_risk", np.median(p.risk[rows]) if rows.size else 0)
        high[rows] = p.risk[rows] > median
    return high


def _km_plot(path: Path, results, info) -> None:
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator

    from napari_slpd.evaluation.protocols.survival import structured

    fig = _figure(max(4.8, 3.4 * len(results)), 3.4)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    data = info.data
    for ax, r in zip(axes, results):
        p = r.predictions
        high = high_risk_groups(p, data)
        time, event = data.time[p.index], data.event[p.index]
        for group, label, color in ((~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")):
            if group.sum() == 0:
                continue
            t, s = kaplan_meier_estimator(event[group], time[group])
            ax.step(t, s, where="post", color=color, label=f"{label} (n={int(group.sum())})")
        title = r.representation
        if high.any() and (~high).any():
            with contextlib.suppress(Exception):
                _, pvalue = compare_survival(structured(event, time), high.astype(int))
                title += f"\nlog-rank p = {pvalue:.2g}"
        ci = r.summary["c_index"]
        ax.set_title(f"{title}\nc-index {ci['mean']:.3f} ± {ci['std']:.3f}", fontsize=9)
        ax.set_xlabel("time", fontsize=8)
        ax.set_ylabel("survival", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(f"{info.name}: Kaplan-Meier, split at each fold's training median risk", fontsize=10)
    fig.savefig(path)


def _thumbnail(cohort, slide_id: str) -> np.ndarray | None:
    """The cohort's cached thumbnail, else one read from the slide (None when neither works)."""
    if cohort is None:
        return None
    from PIL import Image

    path = cohort.thumbnail_path(slide_id)
    if path.exists():
        with contextlib.suppress(OSError), Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            return np.asarray(im)
    try:
        from napari_slpd.slides.slide import open_slide

        record = cohort.slide(slide_id)
        with open_slide(record.path, mpp=record.mpp) as slide:
            return slide.thumbnail(THUMBNAIL_PX)
    except Exception as exc:  # noqa: BLE001 - a missing slide file only costs the picture
        log.debug("no thumbnail for %s: %s", slide_id, exc)
        return None


def _retrieval_plot(path: Path, r, info, cohort, seed: int) -> list[dict]:
    data, p = info.data, r.predictions
    rng = np.random.default_rng(seed)
    # One query per class first (so every class is shown), then random ones.
    picks = []
    for c in range(len(info.classes)):
        rows = np.flatnonzero(data.y[p.index] == c)
        if rows.size:
            picks.append(int(rng.choice(rows)))
    picks = picks[:RETRIEVAL_EXAMPLES]
    fig = _figure(1.6 * (TOP_SHOWN + 1), 1.9 * len(picks))
    axes = fig.subplots(len(picks), TOP_SHOWN + 1, squeeze=False)
    examples = []
    for a, row in enumerate(picks):
        q = int(p.index[row])
        shown = [(q, None)] + [(int(j), d) for j, d in zip(p.retrieved[row][:TOP_SHOWN], p.distances[row][:TOP_SHOWN])]
        examples.append({"query": data.slide_ids[q], "label": info.classes[data.y[q]],
                         "retrieved": [{"slide_id": data.slide_ids[j], "label": info.classes[data.y[j]],
                                        "distance": float(d)} for j, d in shown[1:] if j >= 0]})
        for b, (j, d) in enumerate(shown):
            ax = axes[a, b]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < 0:
                ax.axis("off")
                continue
            image = _thumbnail(cohort, data.slide_ids[j])
            if image is not None:
                ax.imshow(image)
            else:
                ax.set_facecolor("0.9")
            label = info.classes[data.y[j]]
            hit = b > 0 and data.y[j] == data.y[q]
            color = "black" if b == 0 else ("tab:green" if hit else "tab:red")
            head = "query" if b == 0 else f"#{b} d={d:.3g}"
            ax.set_title(f"{head}\n{data.slide_ids[j][:18]}\n{label}", fontsize=6, color=color)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2 if b else 1)
    fig.suptitle(f"{info.name}: retrieval with {r.representation} (green: same label)", fontsize=9)
    fig.savefig(path)
    return examples


# -- HTML ------------------------------------------------------------------------------------------------------------


def _fmt(figure: dict) -> str:
    mean, std, lo, hi = (figure.get(k) for k in ("mean", "std", "ci_low", "ci_high"))
    if mean is None or not np.isfinite(mean):
        return "n/a"
    ci = "" if lo is None or not np.isfinite(lo) else f" <small>[{lo:.3f}, {hi:.3f}]</small>"
    return f"{mean:.3f} ± {std:.3f}{ci}"


def _html(result, plots: dict[str, list[str]], examples: dict[str, list[dict]]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Slide-level evaluation</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:0.5em 0}small{color:#666}"
        ".best{font-weight:bold}</style></head><body>",
        "<h1>Slide-level evaluation</h1>",
        f"<p>Cohort <code>{esc(result.cohort)}</code>, labels <code>{esc(result.labels_path)}</code>, seed "
        f"{result.config.seed}, {result.config.n_bootstrap} bootstrap resamples. Figures: mean ± std over folds "
        "<small>[bootstrap 95% CI of the pooled test predictions, resampling cases]</small>.</p>",
        "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in result.report.lines()) + "</ul>",
    ]
    for name, info in result.tasks.items():
        t = info.to_dict()
        parts.append(f"<h2>Task <code>{esc(name)}</code> ({esc(info.kind)}{', ordinal' if info.ordinal else ''})</h2>")
        parts.append(f"<p>{t['n_slides']} slides, {t['n_cases']} cases, {len(info.data.folds)} folds"
                     f"{' (given)' if info.folds_given else ''}; counts: "
                     + esc(", ".join(f"{k}: {v}" for k, v in t["counts"].items())) + "</p>")
        task_results = [r for r in result.results if r.task == name]
        protocols = list(dict.fromkeys(r.protocol for r in task_results))
        reps = list(dict.fromkeys(r.representation for r in task_results))
        parts.append("<table><tr><th>representation</th>" + "".join(
            f"<th>{esc(p)} <small>{esc(next(r.primary for r in task_results if r.protocol == p))}</small></th>"
            for p in protocols) + "</tr>")
        for rep in reps:
            cells = []
            for p in protocols:
                found = [r for r in task_results if r.representation == rep and r.protocol == p]
                cells.append(f"<td>{_fmt(found[0].figure()) if found else ''}</td>")
            parts.append(f"<tr><td>{esc(rep)}</td>{''.join(cells)}</tr>")
        parts.append("</table>")
        parts.append("<details><summary>all figures</summary><table><tr><th>representation / protocol</th>"
                     "<th>metric</th><th>mean ± std [95% CI]</th><th>pooled</th><th>per fold</th></tr>")
        for r in task_results:
            for metric, fig in r.summary.items():
                folds = " ".join("n/a" if not np.isfinite(f.metrics[metric]) else f"{f.metrics[metric]:.3f}"
                                 for f in r.folds)
                parts.append(f"<tr><td>{esc(r.representation)} / {esc(r.protocol)}</td><td>{esc(metric)}</td>"
                             f"<td>{_fmt(fig)}</td><td>{fig['pooled']:.3f}</td><td><small>{folds}</small></td></tr>")
        parts.append("</table></details>")
        comps = [c for c in result.comparisons if c.task == name]
        if comps:
            parts.append("<h3>Paired comparisons</h3><table><tr><th>protocol</th><th>A - B</th><th>metric</th>"
                         "<th>difference [95% CI]</th><th>p</th></tr>")
            for c in comps:
                diff = "n/a" if not np.isfinite(c.difference) else (
                    f"{c.difference:+.3f} <small>[{c.ci_low:+.3f}, {c.ci_high:+.3f}]</small>")
                pv = "n/a" if not np.isfinite(c.p_value) else f"{c.p_value:.3g}"
                parts.append(f"<tr><td>{esc(c.protocol)}</td><td>{esc(c.a)} - {esc(c.b)}</td><td>{esc(c.metric)}</td>"
                             f"<td>{diff}</td><td>{pv}</td></tr>")
            parts.append("</table>")
        for src in plots.get(name, []):
            parts.append(f"<img src='{esc(src)}' alt='{esc(src)}'>")
        for ex in examples.get(name, []):
            got = ", ".join(f"{esc(e['slide_id'])} ({esc(e['label'])})" for e in ex["retrieved"])
            parts.append(f"<p><small>query {esc(ex['query'])} ({esc(ex['label'])}): {got}</small></p>")
    if result.skipped:
        parts.append("<details><summary>combinations that do not apply</summary><ul>"
                     + "".join(f"<li>{esc(s)}</li>" for s in result.skipped) + "</ul></details>")
    parts.append("<p><small>Numbers: results.json; folds: folds.csv; predictions: predictions.csv; embeddings: "
                 "embeddings/*.npz.</small></p></body></html>")
    return "\n".join(parts)


# -- the whole folder -------------------------------------------------------------------------------------------


def write_report(result, out: str | os.PathLike, cohort=None, plots: bool = True, progress=None,
                 segmentation=None) -> Path:
    """Write the report folder ``out`` atomically (see the module docstring); returns its path.
    ``segmentation``: a SegmentationResult whose files and section join the report."""
    out = Path(out)
    with atomic_folder(out) as tmp:
        payload = result.to_dict()
        payload["embeddings"] = _write_embeddings(tmp / "embeddings", result)
        _write_folds(tmp / "folds.csv", result)
        _write_predictions(tmp / "predictions.csv", result)
        plot_paths: dict[str, list[str]] = {}
        examples: dict[str, list[dict]] = {}
        if plots:
            (tmp / "plots").mkdir()
            jobs = _plot_jobs(result)
            for n, (kind, task, group) in enumerate(jobs):
                info = result.tasks[task]
                stem = f"{kind}_{_safe(task)}_{_safe(group[0].protocol if kind != 'retrieval' else group[0].representation)}"
                path = tmp / "plots" / f"{stem}.png"
                try:
                    if kind == "roc":
                        _roc_plot(path, group, info)
                    elif kind == "confusion":
                        _confusion_plot(path, group, info)
                    elif kind == "km":
                        _km_plot(path, group, info)
                    else:
                        examples.setdefault(task, []).extend(
                            _retrieval_plot(path, group[0], info, cohort, result.config.seed))
                    plot_paths.setdefault(task, []).append(f"plots/{path.name}")
                except Exception as exc:  # noqa: BLE001 - a plot that fails must not cost the numbers
                    log.warning("plot %s failed: %s", path.name, exc)
                if progress is not None:
                    progress(n + 1, len(jobs))
        payload["plots"] = plot_paths
        payload["retrieval_examples"] = examples
        (tmp / "results.json").write_text(
            json.dumps(json_safe(payload), indent=1, default=_json_default) + "\n", encoding="utf-8")
        page = _html(result, plot_paths, examples)
        if segmentation is not None:  # its own module writes its files (segmentation imports this one)
            section = segmentation.write_files(tmp, plots=plots)
            page = page.replace("</body></html>", section + "</body></html>")
        (tmp / "report.html").write_text(page, encoding="utf-8")
    return out.expanduser().resolve()


def _plot_jobs(result) -> list[tuple[str, str, list]]:
    jobs = []
    for task, info in result.tasks.items():
        task_results = [r for r in result.results if r.task == task]
        for protocol in dict.fromkeys(r.protocol for r in task_results):
            group = [r for r in task_results if r.protocol == protocol]
            if protocol in ("knn", "linear", "abmil"):
                jobs.append(("roc", task, group))
                jobs.append(("confusion", task, group))
            elif protocol == "cox":
                jobs.append(("km", task, group))
            elif protocol == "retrieval":
                for r in group:
                    jobs.append(("retrieval", task, [r]))
    return jobs
