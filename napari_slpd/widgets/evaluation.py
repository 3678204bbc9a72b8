"""Evaluation panel: what the cohort's slide representations are worth on a labelled task, with the papers'
protocols (``napari_slpd.evaluation``: KNN, linear probe, ABMIL, Cox, retrieval), in a worker with
progress and Cancel.

Choose a labels file (CSV/TSV with ``slide_id``, task columns, optional ``case_id``; or a Patho-Bench split
file), a task, the representations to compare (every region-embedding version of the cohort is one, e.g.
before and after an SLPD fine-tune) and the protocols, then Run. The results table gives every figure as
mean ± std over folds with the bootstrap 95% CI; selecting a row draws its ROC curve (classification) or
its Kaplan-Meier curves split at the training median risk (survival); retrieval examples list each query
slide with its top 5, and clicking one opens that slide in the viewer. "Save report" writes the same
folder as ``slpd evaluate --out`` (results.json, folds.csv, embeddings, plots, report.html).

An annotations folder (QuPath GeoJSON per slide, or label masks with classes.csv) adds the segmentation
evaluation (``napari_slpd.evaluation.segmentation``): Dice / IoU / pixel accuracy of the prototype maps,
ProAlign labels and named prototypes, and "Show errors" adds the open slide's error layer (correct, wrong
class = false positive of the predicted and false negative of the true class, missed = false negative).
"""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTreeWidget,
    QTreeWidgetItem,
    QWidget,
)

from napari_slpd.evaluation.protocol_names import PROTOCOLS
from napari_slpd.widgets._base import (NOTE_COLOR, THEME_FONT_SIZE, SlpdPanel, dark_figure, style_axes,
                                       style_legend)
from napari_slpd.widgets._common import choose_labels_file, fill_label_tasks, guarded, show_info
from napari_slpd.widgets._panels import compact_form, panel_layout

log = logging.getLogger(__name__)

DEFAULT_ON = ("knn", "linear", "cox", "retrieval")  # ABMIL trains a network per fold: asked for explicitly
METRIC_ORDER = ("auc", "balanced_accuracy", "weighted_f1", "quadratic_kappa", "c_index", "top1_acc", "mv3_acc",
                "mAP@5")
TABLE_HEADERS = ["task", "representation", "protocol", "metric", "mean ± std", "95% CI", "other figures"]


class ResultPlot(QWidget):
    """ROC curves or Kaplan-Meier curves of one result (matplotlib, dark like napari)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        from qtpy.QtWidgets import QVBoxLayout

        self.figure, self.canvas = dark_figure((4, 2.8), 90)
        self.axes = self.figure.add_subplot(111)
        self.kind = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.setMinimumHeight(220)
        self.clear("Run an evaluation, then select a row")

    def clear(self, message: str = "") -> None:
        self.axes.clear()
        style_axes(self.axes, "", "", "")
        self.axes.text(0.5, 0.5, message, transform=self.axes.transAxes, ha="center", va="center",
                       color=NOTE_COLOR, fontsize=THEME_FONT_SIZE)
        self.kind = None
        self.canvas.draw_idle()

    def show_roc(self, result, info) -> None:
        from sklearn.metrics import roc_curve

        self.axes.clear()
        p, y = result.predictions, info.data.y[result.predictions.index]
        classes = [1] if len(info.classes) == 2 else range(len(info.classes))
        for c in classes:
            if (y == c).any() and (y != c).any():
                fpr, tpr, _ = roc_curve(y == c, p.proba[:, c])
                label = info.classes[c] if len(info.classes) > 2 else f"{info.classes[1]} vs {info.classes[0]}"
                self.axes.plot(fpr, tpr, linewidth=1.5, label=label)
        self.axes.plot([0, 1], [0, 1], color="#777777", linewidth=1, linestyle="--")
        auc = result.summary.get("auc", {})
        style_axes(self.axes, "false positive rate", "true positive rate",
                   f"{result.representation} / {result.protocol}: AUC {auc.get('mean', float('nan')):.3f} ± "
                   f"{auc.get('std', float('nan')):.3f} (test predictions of all folds)")
        style_legend(self.axes, 7, loc="lower right")
        self.kind = "roc"
        self.canvas.draw_idle()

    def show_km(self, result, info) -> None:
        from sksurv.nonparametric import kaplan_meier_estimator

        self.axes.clear()
        from napari_slpd.evaluation.report import high_risk_groups

        p, data = result.predictions, info.data
        high = high_risk_groups(p, data)
        time, event = data.time[p.index], data.event[p.index]
        for group, label, color in ((~high, "low risk", "#1f77b4"), (high, "high risk", "#d62728")):
            if group.sum():
                t, s = kaplan_meier_estimator(event[group], time[group])
                self.axes.step(t, s, where="post", color=color, label=f"{label} (n={int(group.sum())})")
        ci = result.summary.get("c_index", {})
        self.axes.set_ylim(0, 1.02)
        style_axes(self.axes, "time", "survival",
                   f"{result.representation}: c-index {ci.get('mean', float('nan')):.3f} ± "
                   f"{ci.get('std', float('nan')):.3f}; split at the training median risk")
        style_legend(self.axes, 7, loc="lower right")
        self.kind = "km"
        self.canvas.draw_idle()


class EvaluationWidget(SlpdPanel):
    """Evaluate the cohort's slide representations on a labels file and show tables, curves and examples."""

    OBJECT_NAME = "slpd-evaluation"

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.result = None

        self.labels_edit = QLineEdit()
        self.labels_edit.setPlaceholderText("labels CSV/TSV (slide_id, task columns, optional case_id)")
        self.labels_edit.editingFinished.connect(lambda: self.load_tasks(quiet=True))
        browse = QPushButton("…")
        browse.setMaximumWidth(32)
        browse.clicked.connect(guarded("Labels")(lambda *_: self._choose_labels()))
        labels_row = QHBoxLayout()
        labels_row.addWidget(self.labels_edit, 1)
        labels_row.addWidget(browse)
        self.annotations_edit = QLineEdit()
        self.annotations_edit.setPlaceholderText("optional: annotations folder (SLIDE.geojson from QuPath) for Dice")
        self.annotations_edit.setToolTip("a folder of SLIDE_ID.geojson (QuPath export of classified annotations) or "
                                         "label masks with classes.csv; adds the segmentation evaluation")
        browse_annotations = QPushButton("…")
        browse_annotations.setMaximumWidth(32)
        browse_annotations.clicked.connect(guarded("Annotations")(lambda *_: self._choose_annotations()))
        annotations_row = QHBoxLayout()
        annotations_row.addWidget(self.annotations_edit, 1)
        annotations_row.addWidget(browse_annotations)
        self.task_combo = QComboBox()
        self.task_combo.setToolTip("the task to evaluate (all: every task of the labels file)")
        self.folds_spin = QSpinBox()
        self.folds_spin.setRange(1, 100)
        self.folds_spin.setSpecialValueText("auto")  # the minimum (1) reads "auto": chosen from the data
        self.folds_spin.setValue(1)
        self.folds_spin.setToolTip("folds of the cross-validation (stratified, grouped by case); auto: at most 10 "
                                   "and at most the cases of the smallest class; ignored when the labels file "
                                   "gives its own folds")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setToolTip("seed of the folds, the bootstrap and ABMIL")
        fold_row = QHBoxLayout()
        fold_row.addWidget(self.folds_spin)
        fold_row.addWidget(QLabel("seed"))
        fold_row.addWidget(self.seed_spin)
        self.repr_list = QListWidget()
        self.repr_list.setToolTip("slide representations to compare (unavailable ones say how to compute them)")
        self.repr_list.setMaximumHeight(130)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(guarded("Representations")(lambda *_: self.refresh_representations()))
        self.protocol_boxes = {}
        protocol_row = QHBoxLayout()
        for name in PROTOCOLS:
            box = QCheckBox(name)
            box.setChecked(name in DEFAULT_ON)
            self.protocol_boxes[name] = box
            protocol_row.addWidget(box)
        form = compact_form(QFormLayout())  # fits the dock (issue 26)
        form.addRow("Labels", labels_row)
        form.addRow("Annotations", annotations_row)
        form.addRow("Task", self.task_combo)
        form.addRow("Folds", fold_row)
        form.addRow("Representations", self.repr_list)
        form.addRow("", refresh)
        form.addRow("Protocols", protocol_row)

        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(guarded("Evaluation")(lambda *_: self.run_evaluation()))
        self.save_button = QPushButton("Save report…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(guarded("Evaluation report")(lambda *_: self.save_report()))
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.save_button)
        self.summary = QLabel("")
        self.summary.setWordWrap(True)
        self.segmentation = None
        self.seg_summary = QLabel("")
        self.seg_summary.setWordWrap(True)
        self.errors_button = QPushButton("Show errors on the open slide")
        self.errors_button.setToolTip("adds a layer: green correct, red wrong class (FP of the predicted, FN of the "
                                      "true class), yellow annotated but not labelled (FN)")
        self.errors_button.setVisible(False)
        self.errors_button.clicked.connect(guarded("Segmentation errors")(lambda *_: self.show_errors()))

        self.table = QTableWidget(0, len(TABLE_HEADERS))
        self.table.setHorizontalHeaderLabels(TABLE_HEADERS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(150)
        self.table.itemSelectionChanged.connect(guarded("Evaluation")(lambda *_: self._on_row_selected()))
        self.plot = ResultPlot()
        self.examples = QTreeWidget()
        self.examples.setHeaderLabels(["retrieval example", "label", "distance"])
        self.examples.setToolTip("each query slide with its nearest slides; click one to open it")
        self.examples.setMinimumHeight(120)
        self.examples.itemClicked.connect(guarded("Open slide")(lambda item, *_: self._on_example_clicked(item)))

        layout = panel_layout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.task_bar)
        layout.addWidget(self.summary)
        layout.addWidget(self.seg_summary)
        layout.addWidget(self.errors_button)
        layout.addWidget(self.table, 2)
        layout.addWidget(self.plot, 2)
        layout.addWidget(self.examples, 1)
        self._rows: list[tuple] = []  # (ProtocolResult, metric) of each table row

        self.state.cohort_changed.connect(lambda *_: self.refresh_representations())
        self.task_bar.task_finished.connect(lambda *_: self._update_buttons())
        if self.state.session is not None:
            self.refresh_representations()
        self._update_buttons()

    # -- inputs -----------------------------------------------------------------------------------------
    def _choose_labels(self) -> None:
        if choose_labels_file(self, self.labels_edit):
            self.load_tasks()

    def _choose_annotations(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of annotations (SLIDE_ID.geojson)")
        if folder:
            self.annotations_edit.setText(folder)

    def load_tasks(self, quiet: bool = False) -> list[str]:
        return fill_label_tasks(self.labels_edit, self.task_combo, quiet, all_item="(all tasks)")

    def refresh_representations(self) -> list[str]:
        """List the cohort's representations (every region-embedding version included)."""
        checked = set(self.selected_representations())
        self.repr_list.clear()
        session = self.state.session
        if session is None:
            return []
        names = []
        for info in session.representations():
            item = QListWidgetItem(f"{info.name}  ({info.n_slides} slides)" if info.available else
                                   f"{info.name}  (not computed)")
            item.setData(Qt.ItemDataRole.UserRole, info.name)
            item.setToolTip(info.description if info.available else info.note)
            flags = item.flags() | Qt.ItemFlag.ItemIsUserCheckable
            if not info.available:
                flags &= ~Qt.ItemFlag.ItemIsEnabled
            item.setFlags(flags)
            on = info.available and (info.name in checked if checked else
                                     info.name.startswith("region_mean") or info.name == "prototype_set")
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
            self.repr_list.addItem(item)
            names.append(info.name)
        return names

    def selected_representations(self) -> list[str]:
        out = []
        for i in range(self.repr_list.count()):
            item = self.repr_list.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(item.data(Qt.ItemDataRole.UserRole))
        return out

    def set_representations(self, names: list[str]) -> None:
        for i in range(self.repr_list.count()):
            item = self.repr_list.item(i)
            on = item.data(Qt.ItemDataRole.UserRole) in names
            item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)

    def selected_protocols(self) -> list[str]:
        return [name for name, box in self.protocol_boxes.items() if box.isChecked()]

    def config(self):
        from napari_slpd.evaluation import EvaluationConfig

        task = self.task_combo.currentText()
        return EvaluationConfig(
            tasks=None if not task or task.startswith("(") else [task],
            representations=self.selected_representations() or None,
            protocols=self.selected_protocols() or None,
            n_folds=None if self.folds_spin.value() < 2 else self.folds_spin.value(),
            seed=self.seed_spin.value(),
        )

    # -- running ----------------------------------------------------------------------------------------
    def run_evaluation(self):
        from napari_slpd.errors import SlpdError
        from napari_slpd.evaluation.segmentation import SegmentationConfig

        session = self.state.require_session()
        labels = self.labels_edit.text().strip()
        annotations = self.annotations_edit.text().strip()
        if not labels and not annotations:
            raise SlpdError("choose a labels file first (slide_id and task columns; optional case_id), or an "
                            "annotations folder for the segmentation evaluation")
        config = self.config()

        def work(progress, cancel):
            run = session.evaluate(labels or None, config, annotations=annotations or None,
                                   segmentation=SegmentationConfig(seed=config.seed), progress=progress,
                                   cancel=cancel)
            return run.result, run.segmentation

        task = self.run_task(work, "Evaluation", on_result=lambda pair: self.show_result(*pair))
        self._update_buttons()
        return task

    def _update_buttons(self) -> None:
        busy = self.task_bar.busy
        self.run_button.setEnabled(not busy)
        self.save_button.setEnabled(not busy and (self.result is not None or self.segmentation is not None))

    def show_segmentation(self, seg) -> None:
        self.segmentation = seg
        self.seg_summary.setText("\n".join(seg.lines()) if seg is not None else "")
        self.errors_button.setVisible(seg is not None and bool(seg.methods))

    def show_errors(self, slide_id: str | None = None, method: str | None = None):
        """Add the error layer of ``slide_id`` (default: the open slide) for ``method`` (default: the first)."""
        from napari_slpd.errors import SlpdError
        from napari_slpd.evaluation.segmentation.report import error_map

        seg = self.segmentation
        if seg is None or not seg.methods:
            raise SlpdError("run the evaluation with an annotations folder first")
        slide_id = slide_id or self.state.current_slide_id
        if slide_id not in seg.truths:
            raise SlpdError(f"open an annotated slide first (annotated: {', '.join(list(seg.truths)[:5])}, ...)")
        method = method or next((m for m in seg.methods if m in seg.predictions[slide_id]), None)
        if method is None:
            raise SlpdError(f"{slide_id}: no label map was scored on this slide")
        truth = seg.truths[slide_id]
        errors = error_map(truth.raster, seg.predictions[slide_id][method]).astype(np.int32)
        from napari.utils.colormaps import DirectLabelColormap

        colors = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: (0.2, 0.7, 0.3, 0.5), 2: (0.9, 0.1, 0.1, 0.7),
                  3: (0.95, 0.75, 0.1, 0.7)}
        kwargs = {"name": f"{slide_id} errors ({method})", "opacity": 0.6,
                  "colormap": DirectLabelColormap(color_dict=colors),
                  "metadata": {"slpd_slide": slide_id, "slpd_role": "segmentation_errors", "method": method}}
        current = self.state.current
        if current is not None and current.slide_id == slide_id:
            kwargs.update(current.geometry.raster_kwargs((0.0, 0.0), truth.downsample))
        else:
            kwargs["scale"] = (truth.downsample, truth.downsample)
        for layer in [lay for lay in self.viewer.layers if lay.name == kwargs["name"]]:
            self.viewer.layers.remove(layer)
        return self.viewer.add_labels(errors, **kwargs)

    def show_result(self, result, segmentation=None) -> None:
        """Fill the table, draw the first row, list the retrieval examples (and the segmentation figures)."""
        self.show_segmentation(segmentation)
        if result is None:
            self.table.setRowCount(0)
            self.summary.setText("")
            return
        self.result = result
        rows = []
        for r in result.results:
            others = ", ".join(f"{m} {v['mean']:.3f}" for m, v in _ordered(r.summary) if m != r.primary
                               and v.get("mean") is not None and np.isfinite(v["mean"]))
            rows.append((r, r.primary, others))
        self._rows = [(r, metric) for r, metric, _ in rows]
        self.table.setRowCount(len(rows))
        for i, (r, metric, others) in enumerate(rows):
            fig = r.summary.get(metric, {})
            ci = (f"[{fig['ci_low']:.3f}, {fig['ci_high']:.3f}]"
                  if fig.get("ci_low") is not None and np.isfinite(fig["ci_low"]) else "")
            cells = [r.task, r.representation, r.protocol, metric, f"{fig.get('mean', float('nan')):.3f} ± "
                     f"{fig.get('std', float('nan')):.3f}", ci, others]
            for j, text in enumerate(cells):
                self.table.setItem(i, j, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        report = result.report
        n_used = len(report.used) if getattr(report, "used", None) is not None else "?"
        text = f"{n_used} slides evaluated in {result.seconds:.1f} s"
        comparisons = [c for c in result.comparisons if np.isfinite(c.p_value)]
        if comparisons:
            best = min(comparisons, key=lambda c: c.p_value)
            text += (f"; largest paired difference: {best.a} - {best.b} ({best.protocol}, {best.metric}) "
                     f"{best.difference:+.3f} [{best.ci_low:+.3f}, {best.ci_high:+.3f}], p = {best.p_value:.3f}")
        tooltip = list(report.lines()) if hasattr(report, "lines") else []
        unknown = len(getattr(report, "unknown", []) or [])
        if unknown:
            text += f"; {unknown} labelled slide(s) not in this cohort, skipped"
        for task, why in (getattr(report, "skipped_tasks", None) or {}).items():
            text += f"; task {task} skipped: {why}"
        notes = list(getattr(report, "notes", None) or [])
        if notes:
            text += "; " + "; ".join(notes)
        if result.skipped:
            text += f"; {len(result.skipped)} combination(s) do not apply (tooltip)"
            tooltip += result.skipped
        self.summary.setToolTip("\n".join(tooltip))
        self.summary.setText(text)
        self._fill_examples(result)
        if rows:
            self.table.selectRow(next((i for i, (r, _m, _o) in enumerate(rows) if r.protocol != "retrieval"), 0))
        self._update_buttons()

    def _on_row_selected(self) -> None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows or self.result is None:
            return
        r, _metric = self._rows[rows[0].row()]
        info = self.result.tasks[r.task]
        if info.kind == "survival" and r.predictions.risk is not None:
            self.plot.show_km(r, info)
        elif r.predictions.proba is not None:
            self.plot.show_roc(r, info)
        else:
            self.plot.clear(f"{r.protocol}: no curve (see the retrieval examples below)")

    def _fill_examples(self, result, per_class: int = 2, top: int = 5) -> None:
        self.examples.clear()
        for r in result.results:
            if r.protocol != "retrieval" or r.predictions.retrieved is None:
                continue
            info = result.tasks[r.task]
            data, p = info.data, r.predictions
            head = QTreeWidgetItem([f"{r.representation} ({r.task})", "", ""])
            self.examples.addTopLevelItem(head)
            for c in range(len(info.classes)):
                for row in np.flatnonzero(data.y[p.index] == c)[:per_class]:
                    q = int(p.index[row])
                    query = QTreeWidgetItem([data.slide_ids[q], info.classes[data.y[q]], "query"])
                    query.setData(0, Qt.ItemDataRole.UserRole, data.slide_ids[q])
                    head.addChild(query)
                    for j, d in zip(p.retrieved[row][:top], p.distances[row][:top]):
                        if j < 0:
                            continue
                        hit = QTreeWidgetItem([data.slide_ids[j], info.classes[data.y[j]], f"{d:.4g}"])
                        hit.setData(0, Qt.ItemDataRole.UserRole, data.slide_ids[j])
                        same = data.y[j] == data.y[q]
                        hit.setForeground(1, Qt.GlobalColor.green if same else Qt.GlobalColor.red)
                        query.addChild(hit)
            head.setExpanded(True)

    def _on_example_clicked(self, item) -> None:
        slide_id = item.data(0, Qt.ItemDataRole.UserRole)
        if slide_id:
            self.open_slide(str(slide_id))

    def open_slide(self, slide_id: str) -> None:
        """Show ``slide_id`` in the viewer (with its prototypes)."""
        from napari_slpd.widgets._layers import show_slide

        show_slide(self.state, slide_id)

    def save_report(self, folder: str | None = None):
        from napari_slpd.evaluation import write_report

        if self.result is None and self.segmentation is None:
            return None
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Folder for the evaluation report")
            if not folder:
                return None
        session = self.state.require_session()
        result, seg = self.result, self.segmentation

        def work(progress, cancel):
            if result is None:
                from napari_slpd.evaluation.segmentation.report import write_segmentation_report

                return write_segmentation_report(seg, folder)
            return write_report(result, folder, cohort=session.cohort, progress=progress, segmentation=seg)

        return self.run_task(work, "Evaluation report", on_result=lambda path: show_info(f"report written: {path}"))

    def result_cells(self) -> list[list[str]]:
        return [[self.table.item(r, c).text() if self.table.item(r, c) else "" for c in range(self.table.columnCount())]
                for r in range(self.table.rowCount())]


def _ordered(summary: dict):
    known = [m for m in METRIC_ORDER if m in summary]
    return [(m, summary[m]) for m in known + sorted(m for m in summary if m not in METRIC_ORDER)]
