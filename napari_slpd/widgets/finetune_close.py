"""Closing napari while a fine-tune run trains: the panel sees the main window's Close event first and asks
whether to stop the run (with a clean checkpoint, so it can be resumed) or to leave it running."""

from __future__ import annotations

import time

from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QApplication, QMessageBox


class MainWindowCloseFilter(QObject):
    """Event filter for napari's main window: hands its Close event to ``panel.handle_close`` before napari
    closes (a child of the panel, so it goes when the panel goes)."""

    def __init__(self, panel):
        super().__init__(panel)
        self.panel = panel

    def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Close:
            return self.panel.handle_close(event)
        return False


def ask_stop_or_leave(parent, run_dir) -> str:
    """'stop', 'leave' or 'cancel': what to do with the run training in ``run_dir`` as napari closes."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("SLPD training is running")
    box.setText(f"A fine-tune run is still training in\n{run_dir}.")
    box.setInformativeText("Stop it (after a checkpoint, so it can be resumed), or leave it running in the "
                           "background (reopen this panel on the cohort to follow it again)?")
    stop = box.addButton("Stop training", QMessageBox.ButtonRole.DestructiveRole)
    leave = box.addButton("Leave running", QMessageBox.ButtonRole.AcceptRole)
    box.addButton(QMessageBox.StandardButton.Cancel)
    box.exec()
    clicked = box.clickedButton()
    return "stop" if clicked is stop else "leave" if clicked is leave else "cancel"


def stop_and_wait(run, stop_timeout: float) -> None:
    """Stop ``run`` with a checkpoint and wait for its process to end, the window staying responsive."""
    run.stop_timeout = stop_timeout
    run.request_stop()
    deadline = time.monotonic() + 3 * stop_timeout + 10
    while run.is_running and time.monotonic() < deadline:
        run.poll()  # escalates to SIGTERM / SIGKILL when the stop takes too long
        QApplication.processEvents()
        time.sleep(0.05)
