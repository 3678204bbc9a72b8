"""A virtual X display (Xvfb) for screenshots without a screen: ``slpd demo`` on a headless machine and the
GUI tests' helpers. pyvirtualdisplay when installed, else the Xvfb binary on a free display number."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["XvfbProcess", "has_display", "start_virtual_display"]


def has_display() -> bool:
    """Whether this process has a display to draw on (X11 or Wayland)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def start_virtual_display():
    """An Xvfb display for this process (pyvirtualdisplay when installed, else the Xvfb binary directly);
    returns an object with ``stop()``, or None when no Xvfb can be started."""
    try:
        from pyvirtualdisplay import Display
    except ImportError:
        return XvfbProcess.start()
    try:
        display = Display(visible=False, size=(1920, 1200), color_depth=24)
        display.start()
    except Exception as exc:  # pyvirtualdisplay present but failing: try Xvfb ourselves
        log.warning("pyvirtualdisplay could not start Xvfb (%s); trying Xvfb directly", exc)
        return XvfbProcess.start()
    return display


class XvfbProcess:
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
