"""GUI side of the faults: untrusted text shown literally (fault 7), a long session that leaks neither
threads nor file handles nor layers (scale), a larger cohort listed at once with its statuses read later.

Small and fast (a few hundred feature-only slides, a handful of tiny slide files); marked gui.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.faults, pytest.mark.gui]

HTML_NAME = "<b>bold</b><img src=x>"


@pytest.fixture(scope="module")
def scale_module():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import scale

    return scale


@pytest.fixture
def small_scale_cohort(tmp_path, scale_module):
    root = tmp_path / "cohort"
    scale_module.write_scale_cohort(root, n_slides=320, n_real=8)
    return root


def test_plain_text_helpers(qtbot):
    from qtpy.QtCore import Qt

    from napari_slpd.widgets._common import plain_label, plain_tooltip

    label = plain_label(HTML_NAME)
    assert label.textFormat() == Qt.TextFormat.PlainText and label.text() == HTML_NAME
    tip = plain_tooltip(HTML_NAME + "\nline 2")
    assert tip.startswith("<qt>") and "<b>" not in tip and "&lt;b&gt;bold&lt;/b&gt;&lt;img src=x&gt;" in tip
    assert "<br>" in tip  # the line break kept
    assert plain_tooltip("slide_00001 (12 regions)") == "slide_00001 (12 regions)"  # plain text untouched


def test_html_like_names_show_literally(make_napari_viewer, qtbot, small_scale_cohort):
    """A prototype name from a person or a language model and a slide file named like HTML show as text."""
    import shutil

    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QLabel

    from napari_slpd.cohort import Cohort
    from napari_slpd.labeling.names import PrototypeAnnotations
    from napari_slpd.widgets.cohort import COL_SLIDE, CohortWidget
    from napari_slpd.widgets.labeling import LabelingWidget
    from napari_slpd.widgets.prototypes import PrototypesWidget

    root = small_scale_cohort
    cohort = Cohort(root)
    first = cohort.slide_ids()[0]
    PrototypeAnnotations.load(cohort).rename(first, 0, HTML_NAME)
    html_file = root / "<b onmouseover=x>bold<b>&amp;.tif"
    shutil.copyfile(cohort.slide(first).path, html_file)

    viewer = make_napari_viewer()
    panel = CohortWidget(viewer)
    protos = PrototypesWidget(viewer)
    labeling = LabelingWidget(viewer)
    for w in (panel, protos, labeling):
        viewer.window.add_dock_widget(w)
    panel.open_cohort(root)
    html_id = next(sid for sid in panel.slide_ids() if not sid.startswith(("scan_", "slide_")))
    assert "<" not in html_id  # the id is made safe; the file name is shown in the tooltip, literally
    model = panel.table.model()
    tip = model.data(model.index(panel._rows[html_id], COL_SLIDE), Qt.ItemDataRole.ToolTipRole)
    assert "<b" not in tip and "&lt;b onmouseover=x&gt;bold&lt;b&gt;&amp;amp;.tif" in tip, tip
    panel.open_slide(first, detect_tissue=False)
    qtbot.waitUntil(lambda: labeling.table.rowCount() > 0, timeout=20_000)
    shown = [labeling.table.item(r, 1).text() for r in range(labeling.table.rowCount())]
    assert HTML_NAME in shown
    # Every label of the panels that shows the name shows it as plain text.
    labeling.task_bar.status.setText(f"'{HTML_NAME}': 0 of 3 similar slides would change")
    protos.hover.setText(f"region 3: {HTML_NAME}")
    holders = [lab for w in (panel, protos, labeling) for lab in w.findChildren(QLabel) if "<img" in lab.text()]
    assert holders, "no label showed the name"
    for lab in holders:
        assert lab.textFormat() == Qt.TextFormat.PlainText, (lab.objectName(), lab.text())


def _counts():
    import psutil

    gc.collect()
    proc = psutil.Process()
    files = [f.path for f in proc.open_files()]
    return proc.num_threads(), proc.num_fds(), sum(p.endswith((".h5", ".tif")) for p in files)


def test_long_session_leaks_no_threads_handles_or_layers(make_napari_viewer, qtbot, small_scale_cohort,
                                                          scale_module):
    """A larger cohort lists at once (statuses filled in later); opening slides one after another through
    the Cohort panel and querying each keeps threads, file handles and open slide/cache files flat."""
    from napari_slpd.widgets._common import wait_for
    from napari_slpd.widgets.cohort import LAZY_ROWS, CohortWidget
    from napari_slpd.widgets.similar import SimilarSlidesWidget

    viewer = make_napari_viewer()
    panel = CohortWidget(viewer)
    similar = SimilarSlidesWidget(viewer)
    viewer.window.add_dock_widget(panel)
    viewer.window.add_dock_widget(similar)
    refreshes = []
    listing = panel.refresh
    panel.refresh = lambda: (refreshes.append(1), listing())[1]
    panel.open_cohort(small_scale_cohort)
    assert len(refreshes) == 1  # listed once: the cohort's own settings do not list it again
    assert panel.table.rowCount() == 320 > LAZY_ROWS
    qtbot.waitUntil(lambda: len(panel.statuses) == 320, timeout=60_000)
    assert "reading" not in panel.summary.text()
    # The pixel size and status columns (measured by the panel, not by Qt at each layout) hold their texts.
    from napari_slpd.widgets.cohort import COL_MPP, COL_PROTOS

    metrics, header = panel.table.fontMetrics(), panel.table.horizontalHeader()
    for column in range(COL_MPP, COL_PROTOS + 1):
        widest = max(metrics.horizontalAdvance(panel.cell_text(sid, column)) for sid in panel.slide_ids())
        assert widest < header.sectionSize(column), (column, widest, header.sectionSize(column))
    panel.state.update_settings(top_k=7)  # a setting no status depends on: not listed again
    assert len(refreshes) == 1
    real = [sid for sid in panel.slide_ids() if sid.startswith("scan_")]
    assert len(real) == 8

    def visit(sid):
        panel.select_slide(sid)
        panel.open_slide_button.click()
        qtbot.waitUntil(lambda: panel.state.current_slide_id == sid, timeout=20_000)
        assert wait_for(panel.task_bar, qtbot, 30_000) == "done"
        similar.whole_button.click()
        assert wait_for(similar.task_bar, qtbot, 30_000) == "done"
        assert len(similar.results()) > 0

    for sid in real[:3]:
        visit(sid)
    qtbot.wait(200)
    threads, fds, open_files = before = _counts()
    for sid in real[3:] + real[:3]:
        visit(sid)
    qtbot.wait(200)
    after = _counts()
    assert after[0] <= threads + 1, ("threads", before, after)
    assert after[1] <= fds + 1, ("file descriptors", before, after)
    assert after[2] <= max(open_files, 2), ("slide/cache files left open", before, after)
    assert len(viewer.layers) <= 5


def test_objects_frozen_while_the_panel_is_docked_and_slide_layers_still_freed(
        make_napari_viewer, qtbot, small_scale_cohort, monkeypatch):
    """napari collects garbage at every layer removal: the objects alive when the first panel docks are
    frozen (gc_policy.py) and frozen again at a slide's opening when modules were imported since (here at
    every opening), yet every replaced slide's layers are freed (at the latest by the next freeze) and the
    close of the viewer hands everything back to the collector (napari's fixture then checks that the viewer
    itself was freed)."""
    import weakref

    from napari_slpd.widgets import gc_policy
    from napari_slpd.widgets._common import wait_for
    from napari_slpd.widgets.cohort import CohortWidget

    gc.unfreeze()  # another test's viewer may have left objects frozen if it never closed its window
    viewer = make_napari_viewer()
    panel = CohortWidget(viewer)
    viewer.window.add_dock_widget(panel)
    assert gc.get_freeze_count() > 10_000
    monkeypatch.setattr(gc_policy, "REFREEZE_MODULES", 0)
    panel.open_cohort(small_scale_cohort)
    real = [sid for sid in panel.slide_ids() if sid.startswith("scan_")]

    def open_(sid):
        panel.select_slide(sid)
        panel.open_slide_button.click()
        qtbot.waitUntil(lambda: panel.state.current_slide_id == sid, timeout=20_000)
        assert wait_for(panel.task_bar, qtbot, 30_000) == "done"
        qtbot.wait(50)
        return [weakref.ref(layer) for layer in viewer.layers]

    layers = [open_(sid) for sid in real[:4]]
    assert len(layers[0]) >= 2
    gc.collect()  # a removed layer's controls go at Qt's deferred deletion: collected at the next pass
    for refs in layers[:-2]:  # the last-but-one slide's layers may be frozen until the next opening
        assert all(ref() is None for ref in refs), [ref() for ref in refs if ref() is not None]
    assert all(ref() is not None for ref in layers[-1])
    viewer.close()
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert all(ref() is None for ref in layers[-2])


def test_read_only_cohort_in_the_cohort_panel(make_napari_viewer, qtbot, small_disk, tmp_path, monkeypatch,
                                              scale_module):
    """Fault 3, GUI side: a cohort on a read-only mount opens in the Cohort panel with a plain-text note that
    names the cache folder; another cache folder chosen in the panel is applied (as --cache), kept in the
    user config (the cohort cannot hold it) and used at once; prototypes are computed into it."""
    import json
    import os

    from qtpy.QtCore import Qt

    from napari_slpd.widgets._common import wait_for
    from napari_slpd.widgets.cohort import CohortWidget
    from napari_slpd.widgets.prototypes import PrototypesWidget

    disk = small_disk(16 << 20)
    root = disk.path / "cohort"
    scale_module.write_scale_cohort(root, n_slides=6, n_real=0)
    before = {str(p): p.read_bytes() for p in disk.path.rglob("*") if p.is_file()}
    disk.read_only()
    first = tmp_path / "first-cache"
    monkeypatch.setenv("SLPD_CACHE_DIR", str(first))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))

    viewer = make_napari_viewer()
    panel = CohortWidget(viewer)
    protos = PrototypesWidget(viewer)
    viewer.window.add_dock_widget(panel)
    viewer.window.add_dock_widget(protos)
    panel.open_cohort(root)
    note = panel.notes.text()
    assert not panel.notes.isHidden() and "read-only" in note and str(first.resolve()) in note, note
    assert panel.notes.textFormat() == Qt.TextFormat.PlainText
    assert panel.cache_edit.text().startswith(str(first.resolve()))

    chosen = tmp_path / "chosen-cache"
    panel.cache_edit.setText(str(chosen))
    panel.set_cache_folder(panel.cache_edit.text())
    assert os.environ["SLPD_CACHE_DIR"] == str(chosen)
    config = json.loads((tmp_path / "config" / "napari-slpd" / "config.json").read_text())
    assert config["cache_folder"] == str(chosen)
    session = panel.state.session
    assert session.cohort.read_only and session.cohort.cache_root.parent == chosen.resolve()
    assert str(chosen.resolve()) in panel.notes.text() and str(first.resolve()) not in panel.notes.text()

    protos.k_spin.setValue(3)
    protos.compute_all_button.click()
    assert wait_for(protos.task_bar, qtbot, 60_000) == "done", protos.task_bar.status.text()
    written = sorted(p.name for p in (session.cohort.cache_root / "prototypes").glob("*.h5"))
    assert len(written) == 6, written
    assert all(session.prototypes_current(sid) for sid in session.slide_ids())
    assert {str(p): p.read_bytes() for p in disk.path.rglob("*") if p.is_file()} == before  # the share untouched

