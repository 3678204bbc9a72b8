"""Work-arounds for software OpenGL: load triton's LLVM before Mesa's; delete removed layers' GL objects
in the canvas's own context (:func:`delete_layer_gl_in_canvas_context`).

Triton: under software rendering (Mesa llvmpipe, as under Xvfb or on remote desktops without a GPU driver),
importing triton after napari has drawn its canvas crashes the process: two LLVMs clash. torch imports
triton through torch._dynamo, which timm and open_clip pull in (patch encoders, zero-shot names, "Use
checkpoint"). Importing triton first, before any viewer exists, avoids it. Hardware OpenGL is not affected.
"""

from __future__ import annotations

import logging
import weakref

log = logging.getLogger(__name__)


def preload_triton() -> None:
    """Import triton when installed; without it (or without a usable build) there is nothing to clash."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build raising on import
        log.debug("triton not preloaded: %s", exc)


# -- GL objects of removed layers are deleted in the canvas's own context ------------------------------
# napari deletes a removed layer's GL objects (textures, buffers, programs) at once, outside any paint:
# its canvas flushes vispy's queued deletions and calls glFinish, without making the canvas's context
# current. Under Qt 6 a QOpenGLWidget's window is composed through another GL context, current after any
# repaint of a non-GL widget (a panel updating its table or progress bar), and the deletions then run in
# that context. Mesa llvmpipe (Xvfb, remote desktops) keeps the deleted objects bound in the canvas's
# context and segfaults in glDrawArrays at the next draw; seen when a slide's layers were replaced right
# after the Cohort panel refreshed its list. Making the canvas current just before every removal keeps
# the deletions in the right context; nothing changes for hardware drivers.

_GUARDED: "weakref.WeakSet" = weakref.WeakSet()
_GUARDED_IDS: set[int] = set()


def make_canvas_current(viewer) -> bool:
    """Make the GL context of ``viewer``'s canvas current on this thread (False when it has none yet, is
    headless or already closed). Public API only: the canvas is the QOpenGLWidget in the central widget
    of the window that holds napari's menu bar (``viewer.window.main_menu``)."""
    try:
        from qtpy.QtOpenGLWidgets import QOpenGLWidget

        anchor = getattr(getattr(viewer, "window", None), "main_menu", None)
        if anchor is None:  # a ViewerModel without a window
            return False
        main = anchor.window()
        central = main.centralWidget() if hasattr(main, "centralWidget") else None
        for canvas in (central or main).findChildren(QOpenGLWidget):
            if canvas.isValid():  # initialized (shown once)
                canvas.makeCurrent()
                return True
        return False
    except Exception as exc:  # no Qt, or a window whose widgets are already deleted
        log.debug("canvas context not made current: %s", exc)
        return False


def delete_layer_gl_in_canvas_context(viewer) -> None:
    """Before each layer removal of ``viewer`` make its canvas's GL context current (once per viewer)."""
    try:
        if viewer in _GUARDED:
            return
        _GUARDED.add(viewer)
    except TypeError:  # not weakly referenceable
        if id(viewer) in _GUARDED_IDS:
            return
        _GUARDED_IDS.add(id(viewer))
    emitter = getattr(getattr(getattr(viewer, "layers", None), "events", None), "removing", None)
    if emitter is None:
        return
    try:
        ref = weakref.ref(viewer)
    except TypeError:
        ref = lambda viewer=viewer: viewer  # noqa: E731

    def before_removal(_event=None):
        target = ref()
        if target is not None:
            make_canvas_current(target)

    emitter.connect(before_removal)
