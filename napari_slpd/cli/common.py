"""What the subcommands share: opening a cohort folder, a progress bar, a plain-text table."""

from __future__ import annotations

import sys

from napari_slpd.errors import SlpdError


def open_cohort(path: str):
    """The cohort folder ``path`` (never created), or SlpdError when it is not one."""
    from napari_slpd.cohort import Cohort

    cohort = Cohort(path, create=False)
    if not cohort.registry_path.exists():
        raise SlpdError(
            f"{cohort.root} is not a cohort folder (no {cohort.registry_path.name}); run `slpd extract` first"
        )
    return cohort


class ProgressBar:
    """A tqdm bar on stderr usable as a ``progress(done, total)`` callback (silent when disabled); the
    total may grow while it runs."""

    def __init__(self, description: str, enabled: bool, unit: str = "slide"):
        self.description, self.enabled, self.unit, self.bar = description, enabled, unit, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.description, unit=self.unit, file=sys.stderr, leave=False)
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def table(header: tuple, rows: list[tuple]) -> str:
    """Left-aligned columns, the last one free (it holds the longest text)."""
    rows = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)
