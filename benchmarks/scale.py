"""The GUI at cohort scale and through a long session (issue 16, "Scale").

A cohort of N feature-only slides (default 10,000) is written at run time: each slide gets a feature file
(region embeddings, E=192) and a prototypes file (K=4) written directly, without slide images; the first
``--session-slides`` slides (default 100) also get a small real slide file (one synthetic 2048 x 2048
slide copied under 100 names) so they can be opened in the viewer. The cohort index is built once (its
time is reported) as a lab's would already be.

Measured, with napari on a virtual X display (Xvfb) and the Cohort panel docked:

- ``read_json_s``: reading the cohort file (``Cohort.slides()``: parse + records), the floor;
- ``cohort_open_s``: Cohort panel "Open" until every row is listed (rows come from the registry; statuses
  and thumbnails are filled in later, for the rows on screen first); ``cohort_open_vs_read_json`` the ratio;
- ``statuses_filled_s``: until every row's status is filled in (off the GUI thread);
- ``scroll_frame_ms_p90``: the table scrolled page by page from top to bottom, time per page (paint included);
- ``select_ms`` (selecting a row) and ``similar_query_ms``: the Similar slides panel's query of the selected
  slide, from the click to the listed neighbours (median over several slides);
- ``peak_rss_mb``: the process's peak resident memory;
- a long session: ``--session-slides`` slides opened one after another through the Cohort panel (image,
  regions, prototypes, tissue), each queried for similar slides; resident memory, threads and open file
  handles after the 10th and after the last; growth per slide. Between two actions the benchmark runs what
  napari's event loop runs (pending events and the deferred deletions of removed layers' controls);
  the growth is split into napari's dask cache of image chunks (``napari_dask_cache_mb``: emptied when a
  slide is closed), the rest, and the count of thread workers napari's task list keeps
  (``napari_workers_kept``; each of ours an empty shell there).

``--quick``: 2,000 slides and 20 session slides (same keys: the per-slide growth is scaled to 100 slides,
the open time to 10,000 slides by its measured per-slide rate), under 4 minutes.

Usage: python benchmarks/scale.py [--quick] [--n-slides N] [--session-slides N] [--keep DIR]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

K = 4
DIM = 192
SLIDE_PX = 2048
REGION_PX = 512  # level-0 px of a region of the small slides (4 x 4 regions)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def write_scale_cohort(root: Path, n_slides: int, n_real: int, seed: int = 0) -> dict:
    """Feature-only cohort of ``n_slides`` (the first ``n_real`` with a small slide file). Returns timings."""
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.store import RegionChunk, StoreLayout, read_store_attrs, write_store
    from napari_slpd.prototypes.cache import save_prototypes
    from napari_slpd.prototypes.kmeans import SlidePrototypes
    from napari_slpd.samples.synthetic import write_synthetic_slide
    from napari_slpd.slides.ids import slide_id_for
    from napari_slpd.utils.files import atomic_write_json

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    cohort = Cohort(root)
    registry = {"slides": {}}
    slides_dir = root / "slides"
    slides_dir.mkdir(exist_ok=True)
    template = None
    if n_real:
        template = slides_dir / "template.tif.src"
        write_synthetic_slide(template, width=SLIDE_PX, height=SLIDE_PX, seed=seed, mpp=0.5)
    types = _unit(rng.standard_normal((64, DIM)))
    side = SLIDE_PX // REGION_PX
    for i in range(n_slides):
        if i < n_real:
            path = slides_dir / f"scan_{i:05d}.tif"
            shutil.copyfile(template, path)
            slide_id = slide_id_for(path)
            stored = str(path.relative_to(root))
            m = side * side
            coords = np.stack([np.arange(m) % side, np.arange(m) // side], 1).astype(np.int64) * REGION_PX
        else:
            slide_id = f"slide_{i:05d}"
            stored = f"slides/{slide_id}.svs"  # no image: a feature-only entry
            m = int(rng.integers(16, 33))
            coords = np.stack([np.arange(m) % 8, np.arange(m) // 8], 1).astype(np.int64) * REGION_PX
        registry["slides"][slide_id] = {"path": stored}
        own = rng.choice(len(types), size=K, replace=False)
        labels = rng.integers(0, K, m)
        emb = _unit(types[own][labels] + 0.3 * rng.standard_normal((m, DIM)).astype(np.float32))
        layout = StoreLayout(m, 4, 1, DIM, token_dtype="float16", patch_features=False)
        chunk = RegionChunk(np.zeros((m, 4, 1, 1), np.float32), emb, coords, np.ones(m, np.float32))
        fpath = cohort.features_path(slide_id)
        write_store(fpath, layout, {"synthetic": True, "seed": seed},
                    chunk, attrs={"slide_id": slide_id, "region_size_level0": float(REGION_PX),
                                  "region_encoder": "mean"},
                    coords_attrs={"patch_size_level0": float(REGION_PX), "patch_level": 0})
        if i == 0:
            features_key = str(read_store_attrs(fpath)["settings_key"])
        centroids = np.stack([emb[labels == k].mean(0) if (labels == k).any() else types[own[k]] for k in range(K)])
        centroids = _unit(centroids)
        sims = (emb * centroids[labels]).sum(1)
        sizes = np.bincount(labels, minlength=K) / m
        protos = SlidePrototypes(centroids, labels.astype(np.int64), sims.astype(np.float32), sizes, k_requested=K,
                                 slide_id=slide_id, source="region_embeddings", coords=coords,
                                 tile_size_level0=float(REGION_PX), features_settings_key=features_key)
        save_prototypes(cohort.prototypes_path(slide_id), protos)
    from napari_slpd.session import FeatureSettings, SessionSettings

    registry["settings"] = SessionSettings(features=FeatureSettings(region_encoder="mean")).to_dict()
    atomic_write_json(cohort.registry_path, registry)
    if template is not None:
        template.unlink()
    written_s = time.perf_counter() - t0
    from napari_slpd.similarity.index import CohortIndex

    t0 = time.perf_counter()
    CohortIndex.open(cohort)
    return {"write_s": round(written_s, 1), "index_build_s": round(time.perf_counter() - t0, 2)}


# -- measuring in napari ---------------------------------------------------------------------------------


def _process_snapshot() -> dict:
    import psutil

    gc.collect()
    proc = psutil.Process()
    files = [f.path for f in proc.open_files()]
    from napari.layers import Layer

    from napari.utils._dask_utils import _DASK_CACHE  # napari's chunk cache (bounded: its dask setting)

    from napari.utils.task_status import TaskStatusItem  # napari keeps one per worker it ever made

    objects = gc.get_objects()
    alive = sum(isinstance(o, Layer) for o in objects)
    workers = sum(isinstance(o, TaskStatusItem) for o in objects)
    dask_mb = getattr(getattr(_DASK_CACHE, "cache", None), "total_bytes", 0) / 2**20
    return {"rss_mb": proc.memory_info().rss / 2**20, "threads": proc.num_threads(), "fds": proc.num_fds(),
            "layers_alive": alive, "napari_dask_cache_mb": dask_mb, "napari_workers_kept": workers,
            "open_files": len(files), "slide_or_cache_files": sorted(p for p in files if p.endswith((".h5", ".tif", ".svs")))}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Gui:
    def __init__(self):
        from napari_slpd.testing.xvfb import has_display, start_virtual_display

        self.display = None if has_display() else start_virtual_display()
        if self.display is None and not has_display():
            raise SystemExit("no display and no Xvfb: install xvfb (apt-get install xvfb) or run under xvfb-run")
        import napari
        from qtpy.QtWidgets import QApplication

        from napari_slpd.widgets.cohort import CohortWidget
        from napari_slpd.widgets.similar import SimilarSlidesWidget

        self.viewer = napari.Viewer(show=True)
        self.app = QApplication.instance()
        self.cohort = CohortWidget(self.viewer)
        self.similar = SimilarSlidesWidget(self.viewer)
        self.viewer.window.add_dock_widget(self.cohort, name="Cohort", area="right")
        self.viewer.window.add_dock_widget(self.similar, name="Similar", area="right")
        self.viewer.window._qt_window.resize(1600, 1000)  # benchmark only: a fixed window size
        self.pump(0.3)

    def events(self) -> None:
        """What napari's event loop does between two user actions: pending events, then the widgets
        deleted later (deleteLater: napari deletes a removed layer's controls so; processEvents alone never
        runs those deletions, which made every removed layer look leaked)."""
        from qtpy.QtCore import QEvent

        self.app.processEvents()
        self.app.sendPostedEvents(None, QEvent.Type.DeferredDelete)

    def pump(self, seconds: float = 0.0) -> None:
        end = time.perf_counter() + seconds
        while True:
            self.events()
            if time.perf_counter() >= end:
                return
            time.sleep(0.005)

    def wait(self, predicate, timeout: float = 120.0, what: str = "") -> float:
        t0 = time.perf_counter()
        while not predicate():
            self.app.processEvents()
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}")
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        self.events()
        return elapsed

    def close(self) -> None:
        self.viewer.close()
        if self.display is not None:
            self.display.stop()


def _query(gui) -> float:
    """Whole-slide similar query of the open slide, from the click to the listed rows (ms)."""
    bar = gui.similar.task_bar
    t0 = time.perf_counter()
    gui.similar.whole_button.click()
    gui.wait(lambda: bar.task is not None and not bar.busy, what="the similar query")
    gui.app.processEvents()
    if bar.task.outcome != "done":
        raise RuntimeError(f"similar query ended {bar.task.outcome}: {bar.status.text()}")
    return (time.perf_counter() - t0) * 1000


def _open(gui, slide_id: str) -> float:
    bar = gui.cohort.task_bar
    t0 = time.perf_counter()
    gui.cohort.select_slide(slide_id)
    gui.cohort.open_slide_button.click()
    gui.wait(lambda: gui.cohort.state.current_slide_id == slide_id and bar.task is not None and not bar.busy,
             what=f"opening {slide_id}")
    return (time.perf_counter() - t0) * 1000


def measure(root: Path, n_slides: int, session_ids: list[str], n_queries: int) -> dict:
    from napari_slpd.cohort import Cohort

    out: dict = {}
    reads = []
    for _ in range(3):
        t0 = time.perf_counter()
        Cohort(root).slides()
        reads.append(time.perf_counter() - t0)
    out["read_json_s"] = min(reads)
    gui = _Gui()
    import napari_slpd.session.versions  # noqa: F401 (imported once per process by the first open)

    try:
        panel = gui.cohort
        t0 = time.perf_counter()
        panel.open_cohort(root)
        gui.app.processEvents()  # the list painted once
        out["cohort_open_s"] = time.perf_counter() - t0
        assert panel.table.rowCount() == n_slides, panel.table.rowCount()
        out["statuses_filled_s"] = out["cohort_open_s"] + gui.wait(lambda: len(panel.statuses) == n_slides,
                                                                   what="statuses")
        gui.pump(0.5)
        # Scrolling: page by page to the bottom, each page painted.
        bar = panel.table.verticalScrollBar()
        frames = []
        value = 0
        while value < bar.maximum():
            value = min(bar.maximum(), value + bar.pageStep())
            t0 = time.perf_counter()
            bar.setValue(value)
            panel.table.viewport().repaint()
            gui.app.processEvents()
            frames.append((time.perf_counter() - t0) * 1000)
        out["scroll_pages"] = len(frames)
        out["scroll_frame_ms_median"] = float(np.median(frames)) if frames else 0.0
        out["scroll_frame_ms_p90"] = float(np.percentile(frames, 90)) if frames else 0.0
        out["scroll_frame_ms_max"] = float(np.max(frames)) if frames else 0.0
        bar.setValue(0)
        gui.pump(0.2)
        # Selecting rows far apart.
        ids = panel.slide_ids()
        selects = []
        for sid in ids[:: max(1, len(ids) // 20)]:
            t0 = time.perf_counter()
            panel.select_slide(sid)
            gui.app.processEvents()
            selects.append((time.perf_counter() - t0) * 1000)
        out["select_ms_median"] = float(np.median(selects))
        out["select_ms_max"] = float(np.max(selects))
        # Queries at full size: open a slide through the panel, "Whole slide" in the Similar panel.
        queries, opens = [], []
        for sid in session_ids[:n_queries]:
            opens.append(_open(gui, sid))
            queries.append(_query(gui))
        out["similar_query_ms_first"] = queries[0]
        out["similar_query_ms"] = float(np.median(queries[1:] or queries))
        out["open_slide_ms_median"] = float(np.median(opens))
        out["peak_rss_mb_after_cohort"] = _peak_rss_mb()
        # The long session: every session slide opened through the Cohort panel and queried.
        snapshots = {}
        t0 = time.perf_counter()
        for i, sid in enumerate(session_ids, 1):
            _open(gui, sid)
            _query(gui)
            if i == 10:
                gui.pump(0.2)
                snapshots["after_10"] = _process_snapshot()
        gui.pump(0.5)
        snapshots["at_end"] = _process_snapshot()
        out["session_s"] = time.perf_counter() - t0
        out["session_slides"] = len(session_ids)
        out["snapshots"] = snapshots
        out["peak_rss_mb"] = _peak_rss_mb()
        out["layers_at_end"] = len(gui.viewer.layers)
    finally:
        gui.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 slides, 20 session slides (< 4 minutes)")
    parser.add_argument("--n-slides", type=int, default=None)
    parser.add_argument("--session-slides", type=int, default=None)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--keep", default=None, help="write the cohort here and keep it (reused when present)")
    args = parser.parse_args(argv)
    n_slides = args.n_slides or (2000 if args.quick else 10_000)
    n_session = args.session_slides or (20 if args.quick else 100)
    n_session = max(11, min(n_session, n_slides))
    tmp = None
    if args.keep:
        root = Path(args.keep)
    else:
        tmp = tempfile.mkdtemp(prefix="slpd-scale-")
        root = Path(tmp) / "cohort"
    os.environ.setdefault("SLPD_CACHE_DIR", str(Path(tmp or root.parent) / "cache"))
    try:
        result: dict = {"n_slides": n_slides, "session_slides": n_session, "quick": bool(args.quick)}
        if (root / "cohort.json").exists():
            result.update(reused_cohort=True)
        else:
            print(f"writing a cohort of {n_slides} slides in {root} ...", file=sys.stderr)
            result.update(write_scale_cohort(root, n_slides, n_session))
        from napari_slpd.cohort import Cohort

        session_ids = [r.slide_id for r in Cohort(root).slides() if r.path.exists()][:n_session]
        m = measure(root, n_slides, session_ids, min(args.queries, n_session))
        snaps = m.pop("snapshots")
        a, b = snaps["after_10"], snaps["at_end"]
        per_slide = 100 / max(1, n_session - 10)  # growth from the 10th to the last slide, scaled to 90 more slides
        scale_open = 10_000 / n_slides
        result.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()})
        result.update({
            "cohort_open_s_10k": round(m["cohort_open_s"] * scale_open, 3),
            "cohort_open_vs_read_json": round(m["cohort_open_s"] / max(m["read_json_s"], 1e-6), 2),
            "similar_query_ms_10k": round(m["similar_query_ms"], 1),
            "rss_growth_mb_100_slides": round((b["rss_mb"] - a["rss_mb"]) * per_slide * 0.9, 1),
            "open_files_growth_100_slides": round((b["fds"] - a["fds"]) * per_slide * 0.9, 1),
            "threads_growth_100_slides": round((b["threads"] - a["threads"]) * per_slide * 0.9, 1),
            # napari keeps computed image chunks in its dask cache up to its own bound (Preferences >
            # Application > dask cache, 1/8 of RAM by default): the growth that is not in it:
            "rss_growth_mb_100_slides_outside_dask_cache": round(
                ((b["rss_mb"] - a["rss_mb"]) - (b["napari_dask_cache_mb"] - a["napari_dask_cache_mb"]))
                * per_slide * 0.9, 1),
            "layers_alive_growth_100_slides": round((b["layers_alive"] - a["layers_alive"]) * per_slide * 0.9, 1),
            # napari's task-status list keeps every thread worker (our tasks leave only an empty shell in it)
            "napari_workers_kept_growth_100_slides": round(
                (b["napari_workers_kept"] - a["napari_workers_kept"]) * per_slide * 0.9, 1),
            "after_10th": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in a.items()},
            "at_end": {k: (round(v, 1) if isinstance(v, float) else v) for k, v in b.items()},
        })
        if n_slides != 10_000:
            result["note"] = (f"{n_slides} slides: cohort_open_s_10k is the open time scaled by 10,000/{n_slides}; "
                              f"growth figures scaled from {n_session - 10} slides after the 10th to 90")
        print(json.dumps(result))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
