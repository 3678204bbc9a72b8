"""The prototype labeling panel in a real napari viewer (under Xvfb): rename and recolour a prototype and
find it again after re-opening the cohort; compute ProAlign zero-shot names with a small open_clip model
built here and accept them; propagate a name to similar slides through the preview; export GeoJSON and
a label-map TIFF and validate them; a screenshot of the panel in use."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from test_annotations import SLIDE_H, SLIDE_W, TYPE_NAMES, build_labeled_cohort, type_of_prototypes

pytestmark = pytest.mark.gui

DESCRIPTIONS = """
organ: test tissue
version: 1
prototypes:
  - name: tumour
    color: "#d62728"
    descriptions: [an H&E image of carcinoma, sheets of malignant epithelial cells]
  - name: stroma
    color: "#2ca02c"
    descriptions: [an H&E image of fibrous stroma, collagen bundles with spindle cells]
  - name: necrosis
    color: "#7f7f7f"
    descriptions: [an H&E image of necrosis, eosinophilic debris with nuclear dust]
"""
assert [line.split(": ", 1)[1] for line in DESCRIPTIONS.splitlines() if "- name:" in line] == list(TYPE_NAMES)


@pytest.fixture(scope="module")
def clip_cohort(tmp_path_factory):
    """A cohort whose patch features live in a tiny CLIP's space: type t = text prototype t + noise."""
    from napari_slpd.proalign import VisionLanguageModel, parse_descriptions, text_prototypes
    from napari_slpd.testing.tiny_clip import write_tiny_clip

    base = tmp_path_factory.mktemp("labeling")
    tiny = write_tiny_clip(base / "clip", seed=0)
    vlm = VisionLanguageModel.load(tiny.model_name, tiny.checkpoint, device="cpu")
    desc_path = base / "test_tissue.yaml"
    desc_path.write_text(DESCRIPTIONS)
    texts = text_prototypes(parse_descriptions(DESCRIPTIONS), vlm)
    lab = build_labeled_cohort(base / "cohort", directions=texts.embeddings, patch_encoder=vlm.model_id,
                               patch_encoder_sha256=vlm.checkpoint_sha256, rows=4, cols=6, noise=0.03)
    return lab, tiny, desc_path


@pytest.fixture
def lab(clip_cohort, tmp_path):
    src, tiny, desc = clip_cohort
    root = tmp_path / "cohort"
    shutil.copytree(src.cohort.root, root)
    from napari_slpd.cohort import Cohort
    from test_annotations import LabeledCohort

    return LabeledCohort(Cohort(root), list(src.slide_ids), dict(src.types), src.directions), tiny, desc


def _session_settings():
    from napari_slpd.session import FeatureSettings, PrototypeSettings, SessionSettings

    return SessionSettings(
        features=FeatureSettings(patch_encoder="open_clip:slpd-tiny-clip", region_px=256, patch_px=64, device="cpu"),
        prototypes=PrototypeSettings(k=3),
    )


def _open(viewer, root, slide_id):
    from napari_slpd.session import Session
    from napari_slpd.widgets._layers import show_slide
    from napari_slpd.widgets.state import SlpdState

    state = SlpdState.for_viewer(viewer)
    state.update_settings(features=_session_settings().features, prototypes=_session_settings().prototypes)
    if state.session is None or Path(state.session.root) != Path(root).resolve():
        state.set_session(Session(root, state.settings))
    show_slide(state, slide_id)
    return state


def _layer_color_of_prototype(state, k):
    from napari_slpd.widgets.state import ROLE_PROTOTYPES

    layer = state.layer(ROLE_PROTOTYPES)
    protos = state.current.extras["prototypes"]
    region = int(np.flatnonzero(np.asarray(protos.assignments) == k)[0])
    return tuple(np.round(np.asarray(layer.colormap.map(region + 1))[:3], 2))


def test_rename_recolour_and_find_them_after_reopening(make_napari_viewer, qtbot, lab):
    from napari_slpd.labeling import PrototypeAnnotations
    from napari_slpd.cohort import Cohort
    from napari_slpd.widgets.labeling import COL_NAME, LabelingWidget

    lab, _, _ = lab
    sid = lab.slide_ids[0]
    viewer = make_napari_viewer()
    state = _open(viewer, lab.cohort.root, sid)
    widget = LabelingWidget(viewer)
    qtbot.addWidget(widget)
    assert [r.name for r in widget.rows] == ["prototype 0", "prototype 1", "prototype 2"]
    assert widget.table.rowCount() == 3 and not widget.stale_box.isVisible()

    widget.table.item(1, COL_NAME).setText("tumour bed")  # what typing in the table does
    qtbot.waitUntil(lambda: widget.rows[1].name == "tumour bed", timeout=5000)
    widget.set_color(1, "#00ff00")
    assert state.prototype_name(1) == "tumour bed"
    assert _layer_color_of_prototype(state, 1) == (0.0, 1.0, 0.0)  # the map on the slide follows
    assert "1 named" in widget.title.text()

    # Re-open the cohort (a new Session read from disk, a new panel: what a restart of napari does).
    stored = PrototypeAnnotations.load(Cohort(lab.cohort.root, create=False)).labels(sid)
    assert stored[1].name == "tumour bed" and stored[1].color == "#00ff00"
    from napari_slpd.session import Session

    state.set_session(None)
    widget.close()
    assert widget.rows == [] and state.prototype_name(1) == "prototype 1"  # nothing held without a cohort
    state.set_session(Session(lab.cohort.root, state.settings))
    state2 = _open(viewer, lab.cohort.root, sid)
    widget2 = LabelingWidget(viewer)
    qtbot.addWidget(widget2)
    assert widget2.rows[1].name == "tumour bed" and widget2.rows[1].color == "#00ff00"
    assert widget2.table.item(1, COL_NAME).text() == "tumour bed"
    assert _layer_color_of_prototype(state2, 1) == (0.0, 1.0, 0.0)

    widget2.table.item(0, COL_NAME).setText("   ")  # refused with a message, the old name comes back
    qtbot.waitUntil(lambda: widget2.table.item(0, COL_NAME).text() == "prototype 0", timeout=5000)
    assert 0 not in PrototypeAnnotations.load(lab.cohort).labels(sid)


def test_zero_shot_names_propagation_export_and_screenshot(make_napari_viewer, qtbot, lab, artifacts_dir, tmp_path):
    from napari_slpd.labeling import PrototypeAnnotations
    from napari_slpd.export.geojson import read_geojson
    from napari_slpd.widgets._common import wait_for
    from napari_slpd.widgets.labeling import COL_ACCEPT, LabelingWidget

    lab, tiny, desc = lab
    src, other1, other2 = lab.slide_ids
    viewer = make_napari_viewer(show=True)
    state = _open(viewer, lab.cohort.root, src)
    widget = LabelingWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Prototype labeling", area="right")
    protos = state.current.extras["prototypes"]
    truth = type_of_prototypes(lab, src, protos)

    # -- zero-shot names from the tiny CLIP (ProAlign run by the panel) --------------------------------
    widget.vlm_edit.setText(tiny.model_name)
    widget.checkpoint_edit.setText(str(tiny.checkpoint))
    widget.descriptions_combo.setCurrentText(str(desc))
    widget.compute_zero_shot()
    assert wait_for(widget.task_bar, qtbot, 60_000) == "done", widget.task_bar.status.text()
    assert lab.cohort.proalign_path(src).exists()
    assert {s.proto_idx: s.name for s in widget.suggestions} == {k: TYPE_NAMES[t] for k, t in truth.items()}
    assert all(0.5 < s.confidence <= 1.0 for s in widget.suggestions)
    first = widget.suggestions[0]
    assert first.name in widget.table.item(first.proto_idx, 4).text()
    widget.table.cellWidget(first.proto_idx, COL_ACCEPT).click()  # accept one
    labels = PrototypeAnnotations.load(lab.cohort).labels(src)
    assert list(labels) == [first.proto_idx] and labels[first.proto_idx].source == "proalign"
    widget.accept_all_button.click()  # and the others
    labels = PrototypeAnnotations.load(lab.cohort).labels(src)
    assert {k: l.name for k, l in labels.items()} == {k: TYPE_NAMES[t] for k, t in truth.items()}
    assert state.prototype_name(first.proto_idx) == first.name

    # -- propagate "tumour" to the similar slides, with a preview; apply only the checked row -----------
    k_tumour = next(k for k, t in truth.items() if t == 0)
    widget.proto_combo.setCurrentIndex(k_tumour)
    widget.neighbours_spin.setValue(2)
    widget.preview_propagation()
    assert wait_for(widget.task_bar, qtbot, 60_000) == "done", widget.task_bar.status.text()
    assert sorted(c.slide_id for c in widget.plan) == sorted([other1, other2])
    assert all(c.action == "set" and c.new.name == "tumour" for c in widget.plan)
    assert widget.preview.rowCount() == 2 and widget.apply_button.isEnabled()
    from qtpy.QtCore import Qt

    skipped = widget.plan[1].slide_id
    widget.preview.item(1, 0).setCheckState(Qt.CheckState.Unchecked)
    widget.apply_button.click()
    applied = widget.plan[0] if widget.plan else None
    assert applied is None  # the preview is cleared after applying
    target = other1 if skipped == other2 else other2
    t_protos = state.session.prototypes(target, compute=False)
    t_truth = type_of_prototypes(lab, target, t_protos)
    t_labels = PrototypeAnnotations.load(lab.cohort).labels(target)
    assert [(t_truth[k], l.name, l.source) for k, l in t_labels.items()] == [(0, "tumour", "propagated")]
    assert PrototypeAnnotations.load(lab.cohort).labels(skipped) == {}

    # -- export GeoJSON (QuPath) and the label map ---------------------------------------------------------
    result = widget.export_geojson(str(tmp_path / "src.geojson"))
    features = read_geojson(result.geojson)
    assert sorted(f["properties"]["classification"]["name"] for f in features) == sorted(TYPE_NAMES)
    coords = np.asarray(state.current.regions.coords)
    assignments = np.asarray(protos.assignments)
    for f in features:
        props = f["properties"]
        assert props["objectType"] == "annotation" and len(props["classification"]["color"]) == 3
        k = int(props["metadata"]["prototype"])
        assert props["classification"]["name"] == labels[k].name and props["metadata"]["source"] == "proalign"
        geom = f["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        pts = np.concatenate([np.asarray(r) for p in polys for r in p])
        assert (pts >= 0).all() and (pts[:, 0] <= SLIDE_W).all() and (pts[:, 1] <= SLIDE_H).all()
        from test_export import _covers

        centres = coords + 128
        covered = np.array([any(_covers(p, x, y) for p in polys) for x, y in centres])
        np.testing.assert_array_equal(covered, assignments == k)
    tiff = widget.export_tiff(str(tmp_path / "src.tif"))
    import tifffile

    with tifffile.TiffFile(tiff.tiff) as tif:
        image = tif.pages[0].asarray()
    assert image.shape == (4, 6) and set(np.unique(image)) == {1, 2, 3}  # k + 1 on every region
    cells = (coords - coords.min(0)) // 256
    np.testing.assert_array_equal(image[cells[:, 1], cells[:, 0]], assignments + 1)

    # -- screenshot of the panel in use -----------------------------------------------------------------
    widget.proto_combo.setCurrentIndex(k_tumour)
    widget.neighbours_spin.setValue(2)
    widget.overwrite_check.setChecked(True)
    widget.preview_propagation()
    wait_for(widget.task_bar, qtbot, 60_000)
    _screenshot(viewer, qtbot, artifacts_dir / "labeling_panel.png")


def _screenshot(viewer, qtbot, path: Path) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    window = viewer.window._qt_window
    window.resize(1500, 900)
    viewer.reset_view()
    for toast in window.findChildren(NapariQtNotification):  # no notification over the slide
        toast.close()
    qtbot.wait(400)
    image = window.grab().toImage().scaledToWidth(1200)
    assert image.save(str(path)) and path.stat().st_size > 20_000
