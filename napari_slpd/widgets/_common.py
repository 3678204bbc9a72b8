"""What every SLPD panel shares: long work off the GUI thread, progress, cancel, errors as notifications.

A panel hands :class:`TaskBar` a plain function ``fn(progress, cancel) -> result`` written against the
Qt-free core. It runs in a napari thread worker; ``progress(done, total)`` may be called from that worker
thread (a queued Qt signal carries it to the GUI thread, where the panel's bar and napari's activity dock
are updated); ``cancel`` is a :class:`threading.Event` that the Cancel button sets and the core polls.
Errors never escape into Qt: they become napari notifications with the message the core wrote for the
user, and the panel stays usable.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Callable

from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_slpd.errors import SlpdError

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
TaskFn = Callable[[ProgressFn, threading.Event], Any]


# The core's messages name the CLI command that fixes a problem; in the GUI the panel that does it is meant.
_CLI_TO_GUI = (
    (re.compile(r"run `slpd extract` again"), "compute the features again in the Features panel"),
    (re.compile(r"run `slpd extract`"), "compute the features in the Features panel"),
    (re.compile(r"`slpd extract`"), "the Features panel"),
    (re.compile(r"run `slpd prototypes`"), "compute them in the Prototypes panel"),
    (re.compile(r"`slpd prototypes`"), "the Prototypes panel"),
    (re.compile(r"`slpd evaluate`"), "the Evaluation panel"),
    (re.compile(r"`slpd finetune`"), "the fine-tune panel"),
)


def gui_wording(text: str) -> str:
    """``text`` (a message of the core) with its CLI advice said for the GUI ("run `slpd extract` ..." ->
    "compute the features in the Features panel ...")."""
    for pattern, replacement in _CLI_TO_GUI:
        text = pattern.sub(replacement, text)
    return text


def error_message(exc: BaseException, context: str = "") -> str:
    """The text a person sees for ``exc``: the core's own words for SlpdError (its CLI advice said for the
    GUI), type and text otherwise."""
    if isinstance(exc, SlpdError):
        text = gui_wording(str(exc))
    else:
        text = f"unexpected {type(exc).__name__}: {exc}" if str(exc) else f"unexpected {type(exc).__name__}"
    return f"{context}: {text}" if context else text


def show_error(exc: BaseException | str, context: str = "") -> str:
    """Report an error as a napari notification (never a modal dialog) and return the message shown."""
    from napari.utils.notifications import show_error as napari_show_error

    message = gui_wording(exc) if isinstance(exc, str) else error_message(exc, context)
    if isinstance(exc, BaseException) and not isinstance(exc, SlpdError):
        # Not an input problem the user can fix: keep the traceback for a bug report.
        log.error("%s", message, exc_info=(type(exc), exc, exc.__traceback__))
    napari_show_error(message)
    return message


# -- untrusted text: slide ids (from file names), prototype names (typed, or returned by a language model) --
# Qt guesses whether a label's or tooltip's text is HTML (Qt::mightBeRichText): "<b>x</b>" or "<img src=...>"
# in a name would render (and load) as HTML. Labels that show such text are set to plain text; tooltips
# (which have no text format) carry it escaped inside an explicit rich-text wrapper, so it shows literally.


def plain_label(label_or_text: QLabel | str = "", word_wrap: bool = False) -> QLabel:
    """A QLabel (new, or the one given) that shows its text literally, never as HTML."""
    label = label_or_text if isinstance(label_or_text, QLabel) else QLabel(str(label_or_text))
    label.setTextFormat(Qt.TextFormat.PlainText)
    if word_wrap:
        label.setWordWrap(True)
    return label


def plain_tooltip(text: str | None) -> str | None:
    """``text`` as a tooltip that shows literally: unchanged when Qt could not take it for HTML, else
    escaped (html.escape) inside ``<qt>...</qt>`` with its line breaks kept."""
    if text is None:
        return None
    text = str(text)
    if "<" not in text and "&" not in text:
        return text
    import html

    return "<qt>" + html.escape(text).replace("\n", "<br>") + "</qt>"


def set_plain_tooltip(widget, text: str | None) -> None:
    """``widget.setToolTip`` with :func:`plain_tooltip` (slide ids, prototype names, paths)."""
    widget.setToolTip(plain_tooltip(text) or "")


def main_window(napari_viewer):
    """napari's main window through public API only (``Window.main_menu`` is its menu bar; the private
    ``Window._qt_window`` warns inside plugin widgets): the widget the menu bar belongs to."""
    menu = getattr(getattr(napari_viewer, "window", None), "main_menu", None)
    try:
        return menu.window() if menu is not None else None
    except RuntimeError:  # the window is gone already
        return None


def show_info(message: str) -> None:
    from napari.utils.notifications import show_info as napari_show_info

    napari_show_info(gui_wording(message))


def show_warning(message: str) -> None:
    from napari.utils.notifications import show_warning as napari_show_warning

    napari_show_warning(gui_wording(message))


def guarded(context: str):
    """Decorate a GUI slot so that an exception becomes a notification instead of a Qt crash."""

    def wrap(fn):
        n_params = _positional_capacity(fn)

        def slot(*args, **kwargs):
            # Qt signals pass extra values (clicked passes `checked`): give fn only what it takes.
            if n_params is not None:
                args = args[:n_params]
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # a slot must never raise into the Qt event loop
                show_error(exc, context)
                return None

        slot.__name__ = getattr(fn, "__name__", "slot")
        slot.__doc__ = fn.__doc__
        return slot

    return wrap


def _positional_capacity(fn) -> int | None:
    """How many positional arguments ``fn`` accepts (None: any number)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` says the work was cancelled (by napari's activity dock, or a cancel event the core
    was handed by someone else) rather than failed: the core's cancellation errors are named so."""
    return any(cls.__name__.endswith("Cancelled") or cls.__name__ == "CancelledError" for cls in type(exc).__mro__)


class _ProgressRelay(QObject):
    """Lives in the GUI thread; signals emitted from a worker thread are queued to it by Qt."""

    progressed = Signal(int, int)


class Task:
    """One run of ``fn(progress, cancel)`` in a napari thread worker.

    ``on_result(result)`` runs in the GUI thread when ``fn`` returns without being cancelled;
    ``on_cancelled()`` when the user cancelled (whether ``fn`` then returned or raised);
    ``on_error(exc)`` after the error was shown as a notification; ``on_finished()`` always, last.
    """

    def __init__(
        self,
        fn: TaskFn,
        description: str,
        on_result: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
        on_finished: Callable[[], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        activity: bool = True,
    ):
        self.fn = fn
        self.description = description
        self.cancel_event = threading.Event()
        self.on_result = on_result
        self.on_error = on_error
        self.on_cancelled = on_cancelled
        self.on_finished = on_finished
        self.on_progress = on_progress
        self.activity = activity
        self.outcome: str | None = None  # "done" | "cancelled" | "error" once finished
        self.error: BaseException | None = None
        self.result: Any = None
        self._relay = _ProgressRelay()
        self._relay.progressed.connect(self._on_progress, Qt.ConnectionType.QueuedConnection)
        self._pbar = None
        self._holder: dict = {}
        self.worker = None
        self.finished = False

    # -- lifetime ------------------------------------------------------------------------------------
    def start(self) -> "Task":
        from napari.qt.threading import create_worker

        relay = self._relay
        cancel = self.cancel_event
        # napari keeps every worker it made (its task-status list holds worker.quit for good), so the worker
        # must not hold the work or what it returned once it ended: only this holder, emptied at the end.
        holder = {"fn": self.fn}
        self._holder = holder

        def progress(done: int, total: int) -> None:
            relay.progressed.emit(int(done), int(total))

        def work():
            return holder["fn"](progress, cancel)

        if self.activity:
            from napari.utils import cancelable_progress

            # napari's activity dock shows this bar; its own cancel button sets our event too.
            self._pbar = cancelable_progress(total=0, desc=self.description, cancel_callback=self.cancel)
        # _ignore_errors: superqt would otherwise raise the work's exception again in the GUI thread, where
        # napari shows it as a second toast (with its traceback), a cancel included; _on_errored says it once.
        self.worker = create_worker(work, _start_thread=False, _ignore_errors=True)
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)
        self.worker.finished.connect(self._on_finished)
        self.worker.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop; it stops at its next cancel check and leaves no half-written file."""
        self.cancel_event.set()

    @property
    def running(self) -> bool:
        return self.worker is not None and not self.finished

    # -- GUI-thread handlers -------------------------------------------------------------------------
    def _call(self, callback, *args) -> bool:
        """Run a panel's callback; False (and a notification) when it raised. A panel closed while its
        task ran has lost its Qt objects: that is not an error to report."""
        if callback is None:
            return True
        try:
            callback(*args)
        except RuntimeError as exc:
            if "has been deleted" in str(exc):
                return True
            show_error(exc, self.description)
            return False
        except Exception as exc:  # showing a result must not crash the viewer either
            show_error(exc, self.description)
            return False
        return True

    def _on_progress(self, done: int, total: int) -> None:
        if self._pbar is not None:
            if self._pbar.total != total:
                self._pbar.total = total
            self._pbar.n = done
            self._pbar.events.value(value=done)
        self._call(self.on_progress, done, total)

    def _on_returned(self, result: Any) -> None:
        self.result = result
        if self.cancel_event.is_set():
            self.outcome = "cancelled"
            self._call(self.on_cancelled)
        else:
            self.outcome = "done"
            if not self._call(self.on_result, result):
                self.outcome = "error"

    def _on_errored(self, exc: BaseException) -> None:
        if self.cancel_event.is_set() or _is_cancellation(exc):
            # Work that stops because it was cancelled may raise; that is not an error to report.
            self.outcome = "cancelled"
            self._call(self.on_cancelled)
            return
        self.outcome = "error"
        self.error = exc
        show_error(exc, self.description)
        self._call(self.on_error, exc)

    def _on_finished(self) -> None:
        if self.outcome is None:  # a worker quit before returning
            self.outcome = "cancelled" if self.cancel_event.is_set() else "done"
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.finished = True
        self._call(self.on_finished)
        self._holder.clear()  # the work's closure (a panel's query, a slide) is not napari's to keep
        self.fn = None

    def release(self) -> None:
        """Drop the result and the callbacks of a finished task (a newer task of the same bar replaced it);
        napari's task list may keep this object, which then costs a few hundred bytes."""
        if not self.finished:
            return
        self.result = None
        self.error = None
        self.on_result = self.on_error = self.on_cancelled = self.on_finished = self.on_progress = None


# How a finished task's bar reads (the bar's text) and whether it ends full. Set from the outcome, never
# from the last progress report: a task whose slides were all cached ends full and says "cached", one
# that failed says "failed" (the reason is in the status line below), a cancelled one "cancelled".
END_STATES = {
    "done": ("done", True),
    "cached": ("cached", True),
    "partial": ("done", True),  # finished, some items failed: the text says how many
    "failed": ("failed", False),
    "error": ("failed", False),
    "cancelled": ("cancelled", False),
}


class TaskBar(QWidget):
    """A panel's progress bar, status line and Cancel button; runs one :class:`Task` at a time.

    The end state comes from the outcome: ``on_result`` handlers call :meth:`finish` with "done",
    "cached", "partial" (some items failed) or "failed" and the text for the status line; a task that
    raised ends "failed" with its message, a cancelled one "cancelled".
    """

    task_finished = Signal(str)  # the outcome: "done", "cancelled" or "error"

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop the running work; finished slides stay cached")
        self.cancel_button.clicked.connect(self.cancel)
        self.status = plain_label("", word_wrap=True)  # shows slide ids and prototype names
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.progress_bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status)
        self.task: Task | None = None
        self.end_state: str | None = None  # "done" | "cached" | "partial" | "failed" | "cancelled", once finished
        self._final: tuple[str, str | None, str | None] | None = None
        # A panel closed while its task runs: stop the work (finished files stay, nothing half-written).
        self.destroyed.connect(lambda *_args, bar=self: bar.task.cancel() if bar.task is not None else None)

    @property
    def busy(self) -> bool:
        return self.task is not None and self.task.running

    def run(
        self,
        fn: TaskFn,
        description: str,
        on_result: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
        activity: bool = True,
    ) -> Task | None:
        """Start ``fn`` unless a task already runs here (then say so and return None). ``activity``: also
        list it in napari's activity dock (False for tasks of a fraction of a second, e.g. a query, whose
        entry would only make the window repaint)."""
        if self.busy:
            show_warning(f"{self.task.description} is still running; wait for it or cancel it first")
            return None

        def cancelled():
            self.status.setText(f"{description}: cancelled")
            if on_cancelled:
                on_cancelled()

        def errored(exc):
            self.status.setText(error_message(exc, description))
            if on_error:
                on_error(exc)

        if self.task is not None:
            self.task.release()
        task = Task(
            fn,
            description,
            on_result=on_result,
            on_error=errored,
            on_cancelled=cancelled,
            on_finished=self._finished,
            on_progress=self._progress,
            activity=activity,
        )
        self.task = task
        self.end_state = None
        self._final = None
        self.progress_bar.setFormat("%v / %m")
        self.progress_bar.setRange(0, 0)  # busy until the first progress report gives a total
        self.cancel_button.setEnabled(True)
        self.status.setText(f"{description}…")
        task.start()
        return task

    def cancel(self) -> None:
        if self.busy:
            self.task.cancel()
            self.cancel_button.setEnabled(False)
            self.status.setText(f"{self.task.description}: cancelling…")

    def finish(self, state: str, status: str | None = None, label: str | None = None) -> None:
        """Say how the running task ended (from its ``on_result``): ``state`` "done", "cached", "partial"
        or "failed"; ``status`` the line shown below the bar (e.g. the failure reasons); ``label`` the
        bar's own text (default: the state's word)."""
        if state not in END_STATES:
            raise ValueError(f"unknown end state {state!r}")
        self._final = (state, status, label)
        if status is not None:
            self.status.setText(status)

    def _progress(self, done: int, total: int) -> None:
        if not self.busy:
            return  # a report queued behind the end: the end state stays
        if total > 0:
            self.progress_bar.setRange(0, total)
            self.progress_bar.setValue(min(done, total))
            self.progress_bar.setFormat("%v / %m")

    def _finished(self) -> None:
        task = self.task
        self.cancel_button.setEnabled(False)
        if task.outcome == "cancelled":
            state, label = "cancelled", None
        elif task.outcome == "error":
            state, label = "failed", None
        else:
            state, _status, label = self._final or ("done", None, None)
        word, full = END_STATES[state]
        self.end_state = state
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(1 if full else 0)
        self.progress_bar.setFormat(label or word)
        if state in ("done", "cached") and self.status.text().endswith("…"):
            self.status.setText(f"{task.description}: {word}")
        self.task_finished.emit(task.outcome or "done")


def wait_for(task_bar: TaskBar, qtbot, timeout_ms: int = 60_000) -> str:
    """Test helper: block (processing Qt events) until ``task_bar``'s task has finished; its outcome."""
    qtbot.waitUntil(lambda: task_bar.task is not None and not task_bar.busy, timeout=timeout_ms)
    return task_bar.task.outcome


# -- labels files (the Evaluation and fine-tune panels) ----------------------------------------------------


def choose_labels_file(parent: QWidget, line_edit) -> bool:
    """Ask for a labels CSV/TSV and put its path into ``line_edit``; False when the user cancelled."""
    from qtpy.QtWidgets import QFileDialog

    path, _ = QFileDialog.getOpenFileName(parent, "Labels file", "", "Labels (*.csv *.tsv *.txt);;All files (*)")
    if path:
        line_edit.setText(path)
    return bool(path)


def fill_label_tasks(line_edit, combo, quiet: bool = False, keep: Callable[[Any], bool] | None = None,
                     all_item: str | None = None) -> list[str]:
    """Fill ``combo`` with the task columns of the labels file named in ``line_edit`` (those ``keep``
    accepts; ``all_item`` first when given), keeping the current choice when it is still there. A file that
    cannot be read raises, or with ``quiet`` warns and leaves the list empty."""
    from napari_slpd.evaluation.labels import read_labels

    path = line_edit.text().strip()
    current = combo.currentText()
    combo.clear()
    if not path:
        return []
    try:
        table = read_labels(path)
    except Exception as exc:
        if not quiet:
            raise
        show_warning(f"labels: {exc}")
        return []
    tasks = [name for name, task in table.tasks.items() if keep is None or keep(task)]
    combo.addItems(([all_item] if all_item else []) + tasks)
    if current in tasks:
        combo.setCurrentText(current)
    elif tasks and all_item:
        combo.setCurrentIndex(1)  # the first task rather than all of them
    return tasks
