"""The ``slpd`` command line.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (called with the parsed namespace, returning an exit code). A subcommand that
fails on bad input raises :class:`napari_slpd.errors.SlpdError`; ``main`` prints its message and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from napari_slpd import __version__
from napari_slpd.errors import SlpdError

# Module names under napari_slpd.cli, in the order they appear in --help.
SUBCOMMAND_MODULES = ("info", "encoders", "extract", "registry", "import_features", "prototypes", "similar",
                      "proalign", "describe", "evaluate", "sample_cohort", "region_encoders", "export_spatialdata",
                      "import_spatialdata", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slpd",
        description="Slide-level prototypes for whole-slide images (SLPD / HIPT / ProAlign).",
    )
    parser.add_argument("--version", action="version", version=f"napari-slpd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "--cache", metavar="DIR", default=None,
        help="writable cache folder for cohorts you cannot write to (a read-only share, someone else's "
             "files): they are read where they are, and what is written goes to DIR "
             "(default: $SLPD_CACHE_DIR, else ~/.cache/napari-slpd/cohorts)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"napari_slpd.cli.{name}")
        except ModuleNotFoundError as exc:
            # A subcommand whose module is not written yet must not break the others.
            if exc.name == f"napari_slpd.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Other libraries' INFO lines (faiss's loader, numexpr's thread count) read as errors to a user: only
    # warnings unless --verbose; our own INFO messages stay. (Only where this call sets logging up: a host
    # that configured logging already, e.g. a test run, keeps its levels.)
    configuring = not logging.getLogger().handlers
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if configuring and not args.verbose:
        logging.getLogger("napari_slpd").setLevel(logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if args.cache:
        import os

        from napari_slpd.utils.storage import CACHE_ENV

        os.environ[CACHE_ENV] = str(args.cache)  # every Cohort opened by this command uses it
    try:
        return int(args.func(args) or 0)
    except SlpdError as exc:
        print(f"slpd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"slpd {args.command}: interrupted; finished work is kept in the cache", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
