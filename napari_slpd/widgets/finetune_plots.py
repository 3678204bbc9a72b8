"""What the fine-tune panel draws: the loss terms and the KNN monitor of a training run (:class:`LossPlot`)
and the before / after evaluation of two region encoders (:class:`BeforeAfterTable`)."""

from __future__ import annotations

from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

from napari_slpd.widgets._base import LABEL_COLOR, NOTE_COLOR, THEME_FONT_SIZE, dark_figure, style_axes, style_legend

TERM_LABELS = {"loss": "total", "dino_loss": "DINO", "intra_loss": "intra-slide", "inter_loss": "inter-slide"}
TERM_COLORS = {"loss": "#ffffff", "dino_loss": "#1f77b4", "intra_loss": "#ff7f0e", "inter_loss": "#2ca02c"}
LEGEND_FONT_SIZE = 6  # seven curves named in a 4-inch figure: a larger legend hides them
LEGEND_ALPHA = 0.7  # the curves stay visible under the legend


class LossPlot(QWidget):
    """Each loss term against the training step, the end of the warm-up marked (prototype losses on from
    there), the entropy of the DINO and intra-slide targets dotted (a loss term is that entropy plus the KL
    divergence the student can lower: a term that climbs with its targets' entropy is not the student
    getting worse), and below it the KNN monitor's AUC per epoch (matplotlib, dark like napari)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.figure, self.canvas = dark_figure((4, 3.4), 90)
        self.axes, self.monitor_axes = self.figure.subplots(2, 1, height_ratios=[3, 2])
        style_axes(self.axes, "step", "loss")
        self.lines = {term: self.axes.plot([], [], label=label, color=TERM_COLORS[term], linewidth=1.2)[0]
                      for term, label in TERM_LABELS.items()}
        self.entropy_lines = {
            term: self.axes.plot([], [], label=label, color=color, linewidth=1.0, linestyle=":")[0]
            for term, label, color in (("dino_target_entropy", "DINO target entropy", TERM_COLORS["dino_loss"]),
                                       ("intra_target_entropy", "intra target entropy", TERM_COLORS["intra_loss"]))
        }
        self.warmup_line = self.axes.axvline(0, color="#bbbbbb", linestyle="--", linewidth=1.0,
                                             label="warm-up ends", visible=False)
        style_legend(self.axes, LEGEND_FONT_SIZE, framealpha=LEGEND_ALPHA, loc="upper left", ncol=2)
        ax = self.monitor_axes
        # Whole epochs counted from 1 as the status line counts them ("epoch 2/4"); 0 is before training.
        style_axes(ax, "epoch (0: before training)", "KNN AUC")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0.0, 1.02)
        self.auc_line = ax.plot([], [], "o-", color="#e377c2", linewidth=1.2, markersize=3, label="KNN AUC")[0]
        self.bacc_line = ax.plot([], [], "s--", color="#17becf", linewidth=1.0, markersize=3,
                                 label="balanced accuracy")[0]
        self.monitor_warm_line = ax.axvline(0, color="#bbbbbb", linestyle="--", linewidth=1.0, visible=False)
        self.monitor_note = ax.text(0.5, 0.5, "KNN monitor off: give a labels file", transform=ax.transAxes,
                                    ha="center", va="center", color=NOTE_COLOR, fontsize=THEME_FONT_SIZE)
        style_legend(ax, LEGEND_FONT_SIZE, framealpha=LEGEND_ALPHA, loc="lower right")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.setMinimumHeight(260)

    def update_curves(self, curves, warmup_end_step: int | None = None, entropy_curves=None) -> None:
        for term, line in self.lines.items():
            steps, values = curves.get(term, ([], []))
            line.set_data(list(steps), list(values))
        for term, line in self.entropy_lines.items():
            steps, values = (entropy_curves or {}).get(term, ([], []))
            line.set_data(list(steps), list(values))
        if warmup_end_step is not None:
            self.warmup_line.set_xdata([warmup_end_step, warmup_end_step])
        self.warmup_line.set_visible(warmup_end_step is not None)
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()

    def update_monitor(self, records: list[dict], warm_epoch: int | None = None, labelled: bool = False) -> None:
        records = sorted(records, key=lambda r: r.get("epoch", -1))
        epochs = [r.get("epoch", -1) + 1 for r in records]  # records count from 0 (-1: before training)
        self.auc_line.set_data(epochs, [_nan(r.get("knn_auc")) for r in records])
        self.bacc_line.set_data(epochs, [_nan(r.get("balanced_accuracy")) for r in records])
        if warm_epoch is not None and records:
            # Prototype losses are on from epoch warm_epoch + 1: the boundary sits after epoch warm_epoch.
            self.monitor_warm_line.set_xdata([warm_epoch + 1.5, warm_epoch + 1.5])
        self.monitor_warm_line.set_visible(warm_epoch is not None and bool(records))
        if records:
            self.monitor_note.set_text("")
            last = records[-1]
            self.monitor_axes.set_title(
                f"{last.get('task')}: {last.get('n_slides')} slides, {last.get('n_folds')} frozen folds, "
                f"k={last.get('k')}", color=LABEL_COLOR, fontsize=THEME_FONT_SIZE)
        else:
            self.monitor_note.set_text("KNN monitor: waiting for the first measurement" if labelled else
                                       "KNN monitor off: give a labels file")
            self.monitor_axes.set_title("")
        self.monitor_axes.set_xlim(-0.5, max(epochs + [2]) + 0.5)
        self.canvas.draw_idle()

    def points(self, term: str) -> int:
        return len(self.lines[term].get_xdata())

    def monitor_points(self) -> int:
        return len(self.auc_line.get_xdata())


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


class BeforeAfterTable(QTableWidget):
    """The evaluation of the previous and the new region embeddings side by side."""

    HEADERS = ["protocol", "metric", "before", "after", "difference (95% CI)", "p"]

    def __init__(self, parent=None):
        super().__init__(0, len(self.HEADERS), parent)
        self.setHorizontalHeaderLabels(self.HEADERS)
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.horizontalHeader().setStretchLastSection(True)
        self.comparison = None

    def show_comparison(self, comparison) -> None:
        self.comparison = comparison
        rows = [r for r in comparison.rows if r["metric"] in ("auc", "balanced_accuracy", "weighted_f1",
                                                              "quadratic_kappa", "c_index")]
        self.setRowCount(len(rows))
        for i, r in enumerate(rows):
            ci = "" if r["ci_low"] is None else f" [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            cells = [r["protocol"], r["metric"], f"{r['before']:.3f} ± {r['before_std']:.3f}",
                     f"{r['after']:.3f} ± {r['after_std']:.3f}", f"{r['difference']:+.3f}{ci}",
                     "" if r["p_value"] is None else f"{r['p_value']:.3f}"]
            for j, text in enumerate(cells):
                self.setItem(i, j, QTableWidgetItem(text))
        self.resizeColumnsToContents()
        self.setToolTip(comparison.table())

    def cell_text(self, row: int, column: int) -> str:
        item = self.item(row, column)
        return item.text() if item is not None else ""
