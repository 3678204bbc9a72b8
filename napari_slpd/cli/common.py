"""What the subcommands share: the arguments several of them take, opening a cohort folder, a progress bar,
a plain-text table."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from napari_slpd.errors import SlpdError
from napari_slpd.slides.pixel_size import MPP_FALLBACKS


# -- arguments ----------------------------------------------------------------------------------------

COHORT_HELP = "cohort folder (made by `slpd extract`)"
NEW_COHORT_HELP = "cohort folder (created if missing)"
JSON_HELP = "print JSON instead of a table"
QUIET_HELP = "no progress bar"


def add_command(subparsers, name: str, func: Callable[[argparse.Namespace], int], help: str,
                description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (listed with ``help``), which runs ``func(args)``; ``kwargs`` go to
    ``add_parser`` (epilog, formatter_class)."""
    parser = subparsers.add_parser(name, help=help, description=description, **kwargs)
    parser.set_defaults(func=func)
    return parser


def add_cohort_argument(parser, help: str | None = None, *, dest: str = "cohort", metavar: str = "COHORT") -> None:
    """The positional cohort folder the command reads (``help`` where it says more than the usual text)."""
    parser.add_argument(dest, metavar=metavar, help=help or COHORT_HELP)


def add_new_cohort_option(parser, help: str | None = None) -> None:
    """``--out COHORT``: the cohort folder a command writes into (created if missing)."""
    parser.add_argument("--out", required=True, metavar="COHORT", help=help or NEW_COHORT_HELP)


def add_output_flags(parser, *, json: bool = True, quiet: bool = True, json_help: str | None = None,
                     quiet_help: str | None = None) -> None:
    """``--json`` (machine-readable output instead of the table) and ``--quiet`` (no progress on stderr);
    ``json`` / ``quiet`` False leaves that flag out, where the command has no table or no progress."""
    if json:
        parser.add_argument("--json", action="store_true", help=json_help or JSON_HELP)
    if quiet:
        parser.add_argument("--quiet", action="store_true", help=quiet_help or QUIET_HELP)


def add_pixel_size_arguments(parser, overrides: str = "every slide file", *, fallback: bool = True) -> None:
    """``--mpp`` (which wins over what ``overrides`` state) and, with ``fallback``, ``--mpp-fallback`` for
    files without a plausible pixel size (the choices ``open_slide`` takes)."""
    parser.add_argument("--mpp", type=float, default=None, help=f"pixel size in um/px, overrides {overrides}")
    if fallback:
        parser.add_argument("--mpp-fallback", choices=MPP_FALLBACKS, default="none",
                            help="when a file has no plausible pixel size: 10 / objective power, or level 0 = "
                            "0.5 um/px")


# -- opening a cohort ----------------------------------------------------------------------------------


def open_cohort(path: str):
    """The cohort folder ``path`` (never created), or SlpdError when it is not one."""
    from napari_slpd.cohort import Cohort

    cohort = Cohort(path, create=False)
    if not cohort.registry_path.exists():
        raise SlpdError(
            f"{cohort.root} is not a cohort folder (no {cohort.registry_path.name}); run `slpd extract` first"
        )
    return cohort


def open_session(path: str):
    """The :class:`~napari_slpd.session.Session` of the cohort folder ``path`` (never created), with the
    settings saved in it, as the panels open it (an interrupted switch or update is settled first; what opening
    found is printed on stderr)."""
    from napari_slpd.session import Session

    cohort = open_cohort(path)
    session = Session.open(cohort.root, slides=())
    for note in session.notices:
        print(f"note: {note}", file=sys.stderr)
    return session


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


def table(header: tuple, rows: list[tuple], *, rule: bool = False, right: tuple[str, ...] = (),
          last_free: bool = True) -> str:
    """Columns two spaces apart, left-aligned except those whose header is in ``right`` (figures), lines
    rstripped. ``rule``: a dashed line under the header. ``last_free``: the last column holds free text
    (notes, explanations) of any length, so its rule spans its header only; False treats it as a column
    like the others (its rule spans its widest cell)."""
    rows = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    if last_free:
        widths[-1] = len(rows[0][-1])
    aligned = [str.rjust if name in right else str.ljust for name in rows[0]]
    lines = ["  ".join(align(c, w) for c, w, align in zip(row, widths, aligned)) for row in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


# pixel sizes that do not come from the slide file: kept in the registry so the next command uses them too
RECORDED_PIXEL_SIZE_SOURCES = ("user", "objective-power", "level0-assumed")


def record_import(cohort, row: dict, result, slide_path, pixel_size, summary: str, unregistered_note: str) -> int:
    """Fill a summary row from an import's result (``summary`` when it has no message) and register its
    slide; 1 when a slide was registered."""
    row.update(status=result.status, regions=result.n_regions,
               computed=result.n_regions if result.status == "imported" else 0, message=result.message or summary)
    if result.status not in ("imported", "skipped"):
        return 0
    if slide_path is None:
        row["message"] += f"; {unregistered_note}: not registered in the cohort"
        return 0
    keep = pixel_size.source in RECORDED_PIXEL_SIZE_SOURCES
    cohort.add_slide(slide_path, mpp=pixel_size.mpp if keep else None, mpp_source=pixel_size.source if keep else None)
    return 1
