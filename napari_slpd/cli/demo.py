"""``slpd demo [--out DIR] [--screenshots-only]``: a processed sample cohort, opened in napari.

Builds a small cohort of synthetic H&E slides (different seeds draw different tissue compositions) plus the
real test slides when ``../shared/data/slides`` is there, extracts region features with small CPU-friendly
settings, computes the prototypes and the cohort index, then opens napari with the slide, its tissue
outline, region grid and prototypes, every SLPD panel docked, the most similar slides listed and the
embedding map drawn. On a synthetic slide the labeling panel names the prototypes after the tissue classes
the slide was painted with (its ground truth); the fine-tune panel is set up for a short tiny run. Without a
display (no DISPLAY / WAYLAND_DISPLAY), or with ``--screenshots-only``, the same viewer runs on a virtual X
display (Xvfb), the tiny fine-tune run trains (unless ``--no-finetune``) and screenshots of the window, of
each panel and of the labeling and fine-tune panels in use are written to ``OUT/screenshots`` instead.

Everything is cached in ``OUT/cohort``: a second run starts at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

from napari_slpd.errors import SlpdError
from napari_slpd.viewer.gl_compat import preload_triton

log = logging.getLogger(__name__)

# Synthetic slides: small enough that the whole demo runs in 2-3 minutes on 2 CPU cores.
SYNTHETIC_SIZE = (3072, 2304)
SYNTHETIC_SEEDS = (11, 12, 13, 14, 15)
REAL_SLIDES = ("cmu_small_region.svs",)  # real slides with a trustworthy pixel size
WINDOW_SIZE = (1800, 1150)
# The demo's fine-tune run: the tiny preset, short enough for a CPU (about half a minute on one thread).
FINETUNE_EPOCHS = 2
FINETUNE_BATCH = 32
FINETUNE_THREADS = 1
# Prototype colours by painted tissue class (tab10 hues that read on H&E; grey would read as background).
CLASS_COLORS = {"stroma": "#2ca02c", "tumour": "#d62728", "lymphocytes": "#1f77b4", "necrosis": "#8c564b",
                "fat": "#bcbd22"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build and process a small sample cohort, then open it in napari (or save screenshots)",
        description="Build a sample cohort (synthetic slides + the real test slides when present), extract "
        "features with small settings, compute prototypes and similar slides, and show everything in napari. "
        "Without a display, screenshots are written instead.",
    )
    parser.add_argument("--out", default="slpd-demo", metavar="DIR",
                        help="folder for the cohort and screenshots (default ./slpd-demo)")
    parser.add_argument("--screenshots-only", action="store_true",
                        help="do not open a window: write screenshots to DIR/screenshots (automatic without a display)")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="HIPT ViT-256 DINO checkpoint (without it the patch encoder is randomly initialised)")
    parser.add_argument("--region-checkpoint", default=None, metavar="PATH",
                        help="ViT-4K checkpoint (without it the region encoder is randomly initialised)")
    parser.add_argument("--slides", type=int, default=len(SYNTHETIC_SEEDS), metavar="N",
                        help=f"number of synthetic slides (default {len(SYNTHETIC_SEEDS)})")
    parser.add_argument("--no-real", action="store_true", help="leave out the real test slides")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="where models run")
    parser.add_argument("-k", type=int, default=4, help="prototypes per slide (default 4)")
    parser.add_argument("--docs-screenshots", default=None, metavar="DIR",
                        help="also write small copies of the screenshots (at most 1200 px wide) to DIR")
    parser.add_argument("--no-finetune", action="store_true",
                        help="with screenshots: do not run the short fine-tune demo (the panel is shown set up, "
                        "before Start)")
    parser.set_defaults(func=run)


# -- the cohort ----------------------------------------------------------------------------------------


def demo_settings(checkpoint: str | None = None, region_checkpoint: str | None = None, device: str = "auto",
                  k: int = 4):
    """Small settings: 256-px regions of 4 x 4 patches of 64 px at 0.5 um/px (the model sees 64 px), so a
    small slide holds dozens of regions and K-means has something to group."""
    from napari_slpd.session import FeatureSettings, PrototypeSettings, SessionSettings

    features = FeatureSettings(
        patch_checkpoint=checkpoint,
        patch_input_px=64,
        region_checkpoint=region_checkpoint,
        device=device,
        region_px=256,
        patch_px=64,
        target_mpp=0.5,
        min_tissue=0.25,
        batch_size=256,
        num_workers=1,
        overwrite=True,  # the demo owns its cohort: features made by an older version are replaced
    )
    return SessionSettings(features=features, prototypes=PrototypeSettings(k=k), top_k=10)


def build_demo_cohort(root: Path, n_synthetic: int = len(SYNTHETIC_SEEDS), include_real: bool = True,
                      say: Callable[[str], None] = print) -> list[Path]:
    """Write the synthetic slides into ``root/slides`` (once) and return every slide path of the demo."""
    from napari_slpd.samples.synthetic import real_slides_dir, write_synthetic_slide

    slides_dir = root / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    seeds = [SYNTHETIC_SEEDS[i % len(SYNTHETIC_SEEDS)] + 10 * (i // len(SYNTHETIC_SEEDS)) for i in range(n_synthetic)]
    paths = []
    for seed in seeds:
        path = slides_dir / f"synthetic-{seed}.svs"
        if not path.exists():
            t0 = time.perf_counter()
            write_synthetic_slide(path, width=SYNTHETIC_SIZE[0], height=SYNTHETIC_SIZE[1], seed=seed)
            say(f"  wrote {path.name} ({time.perf_counter() - t0:.1f} s)")
        paths.append(path)
    if include_real:
        real = real_slides_dir()
        for name in REAL_SLIDES:
            if (real / name).exists():
                paths.append(real / name)
            else:
                say(f"  (real slide {real / name} not found; the demo uses synthetic slides only)")
    return paths


def process_cohort(session, say: Callable[[str], None] = print) -> dict:
    """Extract missing features, compute missing prototypes, build the cohort index; return a summary."""
    t0 = time.perf_counter()
    last = [0.0]

    def progress(done, total):
        now = time.perf_counter()
        if now - last[0] > 5 or done == total:
            last[0] = now
            say(f"  features: {100 * done / max(total, 1):5.1f}%")

    results = session.extract(progress=progress)
    for r in results:
        extra = f" ({r.message})" if r.message and r.status != "skipped" else ""
        say(f"  {r.slide_id}: {r.status}, {r.n_regions} regions, {r.seconds:.1f} s{extra}")
    outcome = session.ensure_prototypes()
    for slide_id, message in outcome.items():
        if message != "ok":
            say(f"  {slide_id}: no prototypes: {message}")
    index = session.index()
    say(f"  cohort index: {len(index)} slides, {index.n_prototypes} prototypes "
        f"({time.perf_counter() - t0:.0f} s in all)")
    return {"features": results, "prototypes": outcome}


def pick_query_slide(session) -> str:
    """The slide the demo opens: the one with the most regions (it shows its prototypes best)."""
    best, best_n = None, -1
    for st in session.statuses():
        if st.features_done and st.prototypes_done and (st.n_regions or 0) > best_n:
            best, best_n = st.slide_id, st.n_regions or 0
    if best is None:
        raise SlpdError("no slide of the demo cohort got features and prototypes; see the messages above")
    return best


# -- prototype names from the painted tissue -----------------------------------------------------------


def synthetic_design_of(path: str | os.PathLike):
    """The design a synthetic slide of the demo was painted from, or None for any other slide.

    ``write_synthetic_slide`` is deterministic in its seed, size and pixel size, which the slide's Aperio
    description records; the demo writes its slides with the composition drawn from the seed, so painting
    the design again at low resolution gives the class map behind every pixel.
    """
    import openslide

    from napari_slpd.samples.synthetic import design_slide

    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError):  # not a file OpenSlide reads (a DICOM folder): not one of ours
        return None
    try:
        props = slide.properties
        if "napari-slpd synthetic" not in props.get("tiff.ImageDescription", ""):
            return None
        seed, mpp = int(props["aperio.Seed"]), float(props["aperio.MPP"])
        width, height = slide.dimensions
    except (KeyError, ValueError):  # a synthetic slide of an older version without its seed
        return None
    finally:
        slide.close()
    return design_slide(width, height, seed, mpp)


def tissue_class_shares(design, coords, tile_px: float, assignments, k: int):
    """``[k, classes]`` share of each painted tissue class (sample_data.TISSUE_CLASSES without background)
    in the regions of each prototype, counted on the design's class map."""
    import numpy as np

    from napari_slpd.samples.synthetic import TISSUE_CLASSES

    step = design.class_px
    counts = np.zeros((k, len(TISSUE_CLASSES)), np.float64)
    for (x, y), proto in zip(np.asarray(coords, np.int64), np.asarray(assignments, np.int64)):
        x0, y0 = int(x) // step, int(y) // step
        x1, y1 = -(-int(x + tile_px) // step), -(-int(y + tile_px) // step)
        block = design.classes[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)]
        if 0 <= proto < k and block.size:
            counts[proto] += np.bincount(block.ravel(), minlength=len(TISSUE_CLASSES))
    tissue = counts[:, 1:]  # background is no tissue class
    return tissue / np.maximum(tissue.sum(axis=1, keepdims=True), 1.0)


def names_from_shares(shares, mixed_share: float = 0.3, some_share: float = 0.15) -> list[str]:
    """A name per prototype from its tissue-class shares: the main class; "A + B" when a second class
    covers at least ``mixed_share`` of its regions, "A, some B" from ``some_share``; a name that still
    repeats gets " (2)", " (3)"."""
    import numpy as np

    from napari_slpd.samples.synthetic import TISSUE_CLASSES

    classes = TISSUE_CLASSES[1:]
    names, seen = [], {}
    for row in np.asarray(shares, np.float64):
        if row.sum() <= 0:
            name = "no tissue"
        else:
            first, second = np.argsort(-row, kind="stable")[:2]
            name = classes[first]
            if row[second] >= mixed_share:
                name += f" + {classes[second]}"
            elif row[second] >= some_share:
                name += f", some {classes[second]}"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return names


def _shade(color: str, n: int) -> str:
    """The n-th variant of a class colour: itself, then darker and lighter in turn (two prototypes of one
    class stay told apart on the slide)."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    if n == 0:
        return color
    f = 0.6 ** ((n + 1) // 2)
    if n % 2:  # darker
        r, g, b = (int(c * f) for c in (r, g, b))
    else:  # lighter
        r, g, b = (int(255 - (255 - c) * f) for c in (r, g, b))
    return f"#{r:02x}{g:02x}{b:02x}"


def name_prototypes_from_design(session, slide_id: str, annotations) -> dict[int, str]:
    """Name the prototypes of a synthetic slide after the tissue classes it was painted with (and colour
    them by class), unless a name is given already; returns {prototype: name} ({} for other slides).

    These names are the slide's ground truth, not a model's guess; real slides keep "prototype k" until a
    person or ProAlign (with a vision-language model) names them.
    """
    design = synthetic_design_of(session.cohort.slide(slide_id).path)
    if design is None:
        return {}
    protos = session.prototypes(slide_id, compute=False)
    if protos.coords is None or not protos.tile_size_level0:
        return {}
    if annotations.labels(slide_id, protos):
        return {}  # named before (by the demo or by a person): keep those names
    shares = tissue_class_shares(design, protos.coords, float(protos.tile_size_level0), protos.assignments,
                                 protos.k)
    names = names_from_shares(shares)
    used: dict[str, int] = {}
    for k, name in enumerate(names):
        main = name.split(" + ")[0].split(",")[0].split(" (")[0]
        color = CLASS_COLORS.get(main)
        if color is not None:
            color = _shade(color, used.get(main, 0))
            used[main] = used.get(main, 0) + 1
        annotations.set_label(slide_id, k, name=name, color=color, source="user", save=False)
    annotations.save()
    return dict(enumerate(names))


# -- the viewer ----------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout_s: float = 300.0, what: str = "the viewer") -> None:
    """Process Qt events until ``predicate()`` holds (the GUI stays live meanwhile)."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    t0 = time.perf_counter()
    while not predicate():
        if time.perf_counter() - t0 > timeout_s:
            raise SlpdError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        app.processEvents()
        time.sleep(0.01)


def dock_panels(viewer) -> dict:
    """Dock every SLPD panel: Cohort, Prototypes and Similar slides on the right; Features, Embedding map,
    Prototype labeling and SLPD fine-tune as tabs on the left (the slide keeps the middle)."""
    from napari_slpd.widgets.cohort import CohortWidget
    from napari_slpd.widgets.embedding import EmbeddingMapWidget
    from napari_slpd.widgets.features import FeaturesWidget
    from napari_slpd.widgets.finetune import FineTuneWidget
    from napari_slpd.widgets.labeling import LabelingWidget
    from napari_slpd.widgets.prototypes import PrototypesWidget
    from napari_slpd.widgets.similar import SimilarSlidesWidget

    panels = {}
    layout = (
        ("Cohort", CohortWidget, "right", False),
        ("Prototypes", PrototypesWidget, "right", False),
        ("Similar slides", SimilarSlidesWidget, "right", False),
        ("Features", FeaturesWidget, "left", False),
        ("Embedding map", EmbeddingMapWidget, "left", True),
        ("Prototype labeling", LabelingWidget, "left", True),
        ("SLPD fine-tune", FineTuneWidget, "left", True),
    )
    for name, cls, area, tabify in layout:
        widget = cls(viewer)
        widget.slpd_dock = viewer.window.add_dock_widget(widget, name=name, area=area, tabify=tabify)
        panels[name] = widget
    return panels


def show_demo(viewer, session, slide_id: str, panels: dict | None = None, timeout_s: float = 300.0,
              say: Callable[[str], None] = print, device: str = "auto") -> dict:
    """Drive the panels: open the cohort and ``slide_id``, list similar slides, draw the embedding map, name
    the prototypes of a synthetic slide after its painted tissue, set the fine-tune panel up."""
    panels = panels or dock_panels(viewer)
    cohort, protos = panels["Cohort"], panels["Prototypes"]
    similar, embedding = panels["Similar slides"], panels["Embedding map"]
    state = cohort.state
    state.update_settings(features=session.settings.features, prototypes=session.settings.prototypes)
    state.set_session(session)
    cohort.open_slide(slide_id)
    wait_until(lambda: cohort.task_bar.task is not None and not cohort.task_bar.busy, timeout_s, "the tissue outline")
    wait_until(lambda: state.layer("prototypes") is not None and not protos.task_bar.busy, timeout_s, "the prototypes")
    similar.query_whole_slide()
    wait_until(lambda: not similar.task_bar.busy, timeout_s, "the similar slides")
    # The features are cached: asking for them again is instant and shows that they load from the cache.
    features = panels["Features"]
    features.load_settings(session.settings.features)
    features.compute("cohort")
    wait_until(lambda: not features.task_bar.busy, timeout_s, "the cached features")
    embedding.compute()
    wait_until(lambda: not embedding.task_bar.busy, timeout_s, "the embedding map")
    if embedding.map is not None and len(embedding.rows):
        # Show the linking: select the points of the largest prototype; their regions light up on the slide.
        opened = state.current
        assignments = opened.extras["prototypes"].assignments
        largest = int(max(range(opened.extras["prototypes"].k), key=lambda k: int((assignments == k).sum())))
        regions = [int(i) for i in range(len(assignments)) if assignments[i] == largest]
        embedding.select_rows(embedding.map.rows_of(opened.slide_id, regions))
    labeling = panels.get("Prototype labeling")
    if labeling is not None and labeling.annotations is not None:
        names = name_prototypes_from_design(session, slide_id, labeling.annotations)
        if names:
            say(f"  prototypes of {slide_id} named after the tissue it was painted with: "
                + ", ".join(names.values()))
        labeling.refresh()
    if "SLPD fine-tune" in panels:
        setup_finetune(panels["SLPD fine-tune"], device)
    arrange_docks(viewer, panels)
    viewer.reset_view()
    return panels


def setup_finetune(panel, device: str = "auto") -> None:
    """Fill the fine-tune form for the demo's short run: the tiny preset with bigger batches, one thread."""
    panel.preset_combo.setCurrentText("tiny")
    panel.epochs_spin.setValue(0)  # the preset's
    panel.batch_spin.setValue(FINETUNE_BATCH)
    panel.device_combo.setCurrentText(device)
    panel.threads_spin.setValue(FINETUNE_THREADS)


def run_finetune(panel, timeout_s: float = 600.0, say: Callable[[str], None] = print) -> str:
    """Train the demo's tiny run from the panel (as its Start button does) and follow it to the end; a
    finished run found in the cohort (an earlier demo) is shown again instead. Returns the run's state."""
    run = panel.run
    if run is not None and run.state == "done":
        say(f"  fine-tune: showing the finished run in {run.run_dir}")
        return run.state
    t0 = time.perf_counter()
    run = panel.start()
    say(f"  fine-tune: tiny SLPD run in {run.run_dir}")
    try:
        wait_until(lambda: not run.is_running, timeout_s, "the fine-tune run")
    except SlpdError:
        run.stop(timeout=60)
        raise
    panel.poll()
    if run.state != "done":
        say(f"  fine-tune ended {run.state}: {run.log_tail(5)}")
    else:
        say(f"  fine-tune: {run.progress.summary()} ({time.perf_counter() - t0:.0f} s)")
    return run.state


def arrange_docks(viewer, panels: dict) -> None:
    """Give the list panels room (Cohort and Similar slides taller than Prototypes); show the embedding map
    of the left tabs."""
    from qtpy.QtCore import Qt

    window = viewer.window._qt_window
    embedding_dock = getattr(panels.get("Embedding map"), "slpd_dock", None)
    if embedding_dock is not None:
        embedding_dock.raise_()
    docks = [getattr(panels[name], "slpd_dock", None) for name in ("Cohort", "Prototypes", "Similar slides")]
    docks = [d for d in docks if d is not None]
    if len(docks) == 3:
        height = window.height()
        window.resizeDocks(docks, [int(height * 0.34), int(height * 0.28), int(height * 0.38)],
                           Qt.Orientation.Vertical)


def save_screenshots(viewer, panels: dict, folder: Path) -> list[Path]:
    """The whole window and each panel as PNG files in ``folder``."""
    from qtpy.QtWidgets import QApplication

    folder.mkdir(parents=True, exist_ok=True)
    QApplication.instance().processEvents()
    paths = [folder / "viewer.png"]
    viewer.screenshot(str(paths[0]), canvas_only=False)
    for name, widget in panels.items():
        path = folder / f"panel-{name.lower().replace(' ', '-')}.png"
        dock = getattr(widget, "slpd_dock", None)
        # Show tabbed-away panels before grabbing them (a hidden widget grabs as an empty image).
        if dock is not None:
            dock.raise_()
        QApplication.instance().processEvents()
        widget.grab().save(str(path))
        paths.append(path)
    return paths


def _close_notifications(viewer) -> None:
    """Close napari's notification toasts (one would cover the slide in a screenshot)."""
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
    except ImportError:  # napari moved it: a toast in the picture is no error
        return
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()


def _window_with_panel(viewer, panels: dict, name: str, path: Path, width: int = 760) -> Path:
    """The window with panel ``name`` raised in its tab, given the left column (``width`` px wide, the
    layer controls folded away for the screenshot)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    dock = panels[name].slpd_dock
    window = viewer.window._qt_window
    controls = getattr(getattr(viewer.window, "_qt_viewer", None), "dockLayerControls", None)
    before = dock.width()
    dock.raise_()
    if controls is not None:
        controls.hide()
    window.resizeDocks([dock], [width], Qt.Orientation.Horizontal)
    layer_list = getattr(viewer.window._qt_viewer, "dockLayerList", None)
    if layer_list is not None:
        window.resizeDocks([layer_list, dock], [150, window.height()], Qt.Orientation.Vertical)
    _close_notifications(viewer)
    QApplication.instance().processEvents()
    viewer.reset_view()
    viewer.screenshot(str(path), canvas_only=False)
    if controls is not None:
        controls.show()
    window.resizeDocks([dock], [before], Qt.Orientation.Horizontal)
    return path


def save_in_use_screenshots(viewer, panels: dict, folder: Path, timeout_s: float = 120.0) -> list[Path]:
    """The window with the labeling panel in use (the largest prototype's name previewed on the similar
    slides) as ``labeling.png`` and with the fine-tune panel as ``finetune.png``; the embedding map's
    selection is cleared and its tab shown again afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    # The map's selection outlines would hide which prototype each region has.
    panels["Cohort"].state.clear_selection()
    labeling = panels.get("Prototype labeling")
    if labeling is not None and labeling.rows:
        largest = max(labeling.rows, key=lambda r: r.regions)
        labeling.proto_combo.setCurrentIndex(labeling.rows.index(largest))
        labeling.neighbours_spin.setValue(3)
        labeling.preview_propagation()
        wait_until(lambda: not labeling.task_bar.busy, timeout_s, "the propagation preview")
        paths.append(_window_with_panel(viewer, panels, "Prototype labeling", folder / "labeling.png"))
    if "SLPD fine-tune" in panels:
        paths.append(_window_with_panel(viewer, panels, "SLPD fine-tune", folder / "finetune.png"))
    arrange_docks(viewer, panels)
    return paths


def save_neighbour_screenshot(viewer, panels: dict, folder: Path) -> Path | None:
    """Open the most similar slide (as a double-click on the list does) and take the window."""
    similar = panels["Similar slides"]
    if not similar.results():
        return None
    similar.table.cellDoubleClicked.emit(0, 1)
    viewer.reset_view()
    path = folder / "viewer-neighbour.png"
    viewer.screenshot(str(path), canvas_only=False)
    return path


def save_small_copies(paths: list[Path], folder: Path, max_width: int = 1200) -> list[Path]:
    """Copies for the documentation: at most ``max_width`` px wide, 256-colour PNG (about 150 KB)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        with Image.open(path) as im:
            image = im.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        small = image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.FLOYDSTEINBERG)
        target = folder / path.name
        small.save(target, optimize=True)
        out.append(target)
    return out


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _start_virtual_display():
    """An Xvfb display for this process (pyvirtualdisplay when installed, else the Xvfb binary directly);
    returns an object with ``stop()``, or None when no Xvfb can be started."""
    try:
        from pyvirtualdisplay import Display
    except ImportError:
        return _XvfbProcess.start()
    try:
        display = Display(visible=False, size=(1920, 1200), color_depth=24)
        display.start()
    except Exception as exc:  # pyvirtualdisplay present but failing: try Xvfb ourselves
        log.warning("pyvirtualdisplay could not start Xvfb (%s); trying Xvfb directly", exc)
        return _XvfbProcess.start()
    return display


class _XvfbProcess:
    """Xvfb on a free display number, with DISPLAY pointing at it while it runs."""

    def __init__(self, process, number: int, previous: str | None):
        self.process, self.number, self.previous = process, number, previous

    @classmethod
    def start(cls, size: str = "1920x1200x24", timeout_s: float = 10.0):
        import shutil
        import subprocess

        binary = shutil.which("Xvfb")
        if binary is None:
            return None
        for number in range(99, 199):
            if Path(f"/tmp/.X{number}-lock").exists() or Path(f"/tmp/.X11-unix/X{number}").exists():
                continue
            process = subprocess.Popen(
                [binary, f":{number}", "-screen", "0", size, "-nolisten", "tcp"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < timeout_s:
                if process.poll() is not None:
                    break  # taken meanwhile, or failing: try the next number
                if Path(f"/tmp/.X11-unix/X{number}").exists():
                    previous = os.environ.get("DISPLAY")
                    os.environ["DISPLAY"] = f":{number}"
                    return cls(process, number, previous)
                time.sleep(0.05)
            if process.poll() is None:
                process.terminate()
        return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except Exception:  # a stuck Xvfb must not hang the demo's exit
            self.process.kill()
        if self.previous is None:
            os.environ.pop("DISPLAY", None)
        else:
            os.environ["DISPLAY"] = self.previous


# -- the command ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from napari_slpd.session import Session

    for noisy in ("faiss.loader", "OpenGL.acceleratesupport"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out).expanduser().resolve()
    cohort_root = out / "cohort"
    say = print
    settings = demo_settings(args.checkpoint, args.region_checkpoint, args.device, args.k)
    if settings.features.random_init:
        which = []
        if args.checkpoint is None:
            which.append("patch encoder (HIPT ViT-256)")
        if args.region_checkpoint is None:
            which.append("region encoder (ViT-4K)")
        say(
            f"NOTE: the {' and the '.join(which)} {'are' if len(which) > 1 else 'is'} randomly initialised "
            "(no checkpoint given): the prototypes group regions by colour and texture statistics, not by "
            "learned morphology. Give --checkpoint/--region-checkpoint for meaningful features."
        )
    say(f"Building the demo cohort in {cohort_root}")
    t0 = time.perf_counter()
    paths = build_demo_cohort(cohort_root, args.slides, not args.no_real, say)
    session = Session.open(cohort_root, slides=paths, settings=settings)
    fs = settings.features
    say(f"Processing {len(session.slide_ids())} slides (regions of {fs.region_px} px cut into {fs.patch_px}-px patches "
        f"at {fs.target_mpp:g} um/px, K={args.k})")
    process_cohort(session, say)
    slide_id = pick_query_slide(session)
    for match in session.similar_slides(slide_id, top_k=3):
        say(f"  similar to {slide_id}: {match.slide_id} (distance {match.distance:.3f})")

    screenshots_only = args.screenshots_only or not _has_display()
    display = None
    if screenshots_only and not args.screenshots_only:
        say("No display found (DISPLAY/WAYLAND_DISPLAY unset): writing screenshots instead of opening a window.")
    if screenshots_only:
        display = _start_virtual_display()
        if display is None and not _has_display():
            raise SlpdError(
                "cannot take screenshots without a display: install Xvfb (apt-get install xvfb) or run under "
                "xvfb-run, e.g. `xvfb-run -a slpd demo --screenshots-only`"
            )
    try:
        import napari

        preload_triton()
        viewer = napari.Viewer(title="napari-slpd demo", show=True)
        viewer.window._qt_window.resize(*WINDOW_SIZE)
        panels = dock_panels(viewer)
        show_demo(viewer, session, slide_id, panels, say=say, device=args.device)
        say(f"Demo ready after {time.perf_counter() - t0:.0f} s")
        if screenshots_only:
            if not args.no_finetune:
                run_finetune(panels["SLPD fine-tune"], say=say)
            folder = out / "screenshots"
            paths = save_screenshots(viewer, panels, folder)
            paths += save_in_use_screenshots(viewer, panels, folder)
            neighbour = save_neighbour_screenshot(viewer, panels, folder)
            if neighbour is not None:
                paths.append(neighbour)
            for path in paths:
                say(f"  screenshot: {path}")
            if args.docs_screenshots:
                for path in save_small_copies(paths, Path(args.docs_screenshots)):
                    say(f"  small copy: {path} ({path.stat().st_size // 1024} KB)")
            viewer.close()
            return 0
        napari.run()
        return 0
    finally:
        if display is not None:
            display.stop()


def main(argv: list[str] | None = None) -> int:  # python -m napari_slpd.cli.demo
    parser = argparse.ArgumentParser(prog="slpd demo")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
