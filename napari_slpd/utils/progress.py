"""The progress and cancellation conventions every long computation of the core follows.

``progress`` is a callable ``(done, total)``; ``cancel`` is a ``threading.Event`` or a callable returning
True when the user asked to stop. The GUI passes a worker's event, the CLI a tqdm-backed callback, and a
notebook may pass nothing.
"""

from __future__ import annotations

from typing import Any, Callable

from napari_slpd.errors import SlpdError

ProgressFn = Callable[[int, int], None]
CancelCheck = Any  # threading.Event, a callable returning bool, or None


class Cancelled(SlpdError):
    """The user cancelled a running computation; what was finished is kept, nothing is half-written."""


def is_cancelled(cancel: CancelCheck) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def progress_span(progress: ProgressFn | None, lo: int, hi: int, unit: int = 1000) -> ProgressFn:
    """A ``progress(done, total)`` for one stage of a longer run that reports in ``unit``: the stage's own
    progress mapped onto ``[lo, hi]`` of ``unit`` (nothing when ``progress`` is None)."""

    def report(done: int, total: int) -> None:
        if progress and total > 0:
            progress(int(lo + (hi - lo) * done / total), unit)

    return report


def raise_if_cancelled(cancel: CancelCheck, what: str = "the computation") -> None:
    if is_cancelled(cancel):
        raise Cancelled(f"{what} was cancelled")
