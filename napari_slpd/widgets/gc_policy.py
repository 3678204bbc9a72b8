"""Python's cyclic garbage collector kept off the objects that live as long as the viewer.

napari runs a full ``gc.collect()`` at every layer removal (napari/_vispy/canvas.py, so that a removed
layer's GL objects go at once). With torch, scipy, scikit-learn and faiss imported the collector walks
~360,000 objects each time, ~0.25 s on 2 cores, and opening another slide replaces four layers. Opening
and querying a small slide of a 2,000-slide cohort from the Cohort panel took 2.6-3.2 s; 2.0-2.1 s with the
objects alive at docking frozen; 1.5-1.6 s with the modules imported later frozen too (same process).

``gc.freeze`` moves every object alive when the first SLPD panel docks in a viewer (imported modules, the
viewer and its widgets) to a permanent generation the collector skips; objects made afterwards (every
slide's layers) are collected as before. When that viewer's window closes, everything is handed back to
the collector (``gc.unfreeze``), so the closed viewer, and any layer that was already there when the panel
docked and was removed since, are freed as they would have been."""

from __future__ import annotations

import gc
import sys
import weakref

from qtpy.QtCore import QEvent, QObject

from napari_slpd.widgets._common import main_window

_owner: "weakref.ref | None" = None  # the main window of the viewer whose panel froze the objects
_modules_at_freeze = 0
# Modules imported since the last freeze that make another freeze worth its full collection (~0.3 s).
REFREEZE_MODULES = 50


class _ReleaseOnClose(QObject):
    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Close:
            release()
        return False


def freeze_for(viewer) -> bool:
    """Freeze the objects alive now, once, for ``viewer`` (a napari Viewer with a Qt window); False when
    nothing was frozen (already frozen for a living viewer, or no window to release it at close)."""
    global _owner
    if _owner is not None and _owner() is not None:
        return False
    window = main_window(viewer)  # public API: a plugin's viewer is napari's PublicOnlyProxy
    if window is None:
        return False
    _freeze()
    _owner = weakref.ref(window)  # the window, not the viewer: a proxy viewer can be a passing object
    window.installEventFilter(_ReleaseOnClose(window))  # parented to the window: lives as long as it
    return True


def refreeze_if_imports_grew() -> bool:
    """Freeze again when many modules were imported since the last freeze: the first slide, query and
    embedding map import torch's, pandas', numba's... modules lazily, ~300,000 objects more, walked again at
    every layer removal (opening and querying a slide of a 2,000-slide cohort: 2.0-2.1 s, 1.5-1.6 s with
    them frozen, measured). Called between the removal of a slide's layers and the addition of the next
    one's: a removed layer stays referenced by its controls until Qt's deferred deletions and is then
    frozen with the rest, freed at the next freeze or when the viewer closes (one slide's layers at most;
    its file is closed)."""
    if _owner is None or _owner() is None or len(sys.modules) - _modules_at_freeze < REFREEZE_MODULES:
        return False
    gc.unfreeze()
    _freeze()
    return True


def _freeze() -> None:
    global _modules_at_freeze
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()
    _modules_at_freeze = len(sys.modules)


def release() -> None:
    """Hand every frozen object back to the collector (the viewer that froze them is closing)."""
    global _owner
    if _owner is None:
        return
    _owner = None
    gc.unfreeze()
