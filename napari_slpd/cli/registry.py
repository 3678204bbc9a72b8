"""``slpd register OUT SLIDES...`` and ``slpd status OUT``: the cohort registry without the models.

``register`` adds slides whose feature files already exist in ``OUT/features`` (written by jobs that did
not register them, copied from elsewhere, or extracted before a crash) after checking each file is
complete; no model is loaded. ``status`` says for every slide whether its features are done, partial (a
run stopped or is running: regions done so far), failed (the last run's error) or missing, whether it is
registered, and which process holds its lock.
"""

from __future__ import annotations

import json
import sys

from napari_slpd.cli.common import add_cohort_argument, add_command, add_output_flags, table
from napari_slpd.errors import SlpdError


def register(subparsers) -> None:
    reg = add_command(
        subparsers, "register", run_register,
        help="register slides whose feature files already exist (no models loaded)",
        description="Add slides to the cohort registry when OUT/features/<slide_id>.h5 is complete (e.g. "
        "written by `slpd extract` jobs on other machines). Slides without a complete file are listed, not added.")
    add_cohort_argument(reg, dest="out", metavar="OUT")
    reg.add_argument("slides", nargs="*", metavar="SLIDES_OR_FOLDER", help="slide files or folders of slides")
    reg.add_argument("--slides-from", default=None, metavar="FILE",
                     help="a slide list (one path per line, or a CSV with a path column and an optional mpp column)")

    st = add_command(
        subparsers, "status", run_status, help="done / partial / failed / missing per slide, and who holds a lock",
        description="The extraction state of every slide of a cohort (registered, with feature files, or "
        "named here): done, partial (regions done), failed (last error), missing; and lock holders.")
    add_cohort_argument(st, dest="out", metavar="OUT")
    st.add_argument("slides", nargs="*", metavar="SLIDES_OR_FOLDER", help="also report these slides")
    st.add_argument("--slides-from", default=None, metavar="FILE", help="also report the slides of this list")
    add_output_flags(st, quiet=False)


def run_register(args) -> int:
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.processor import RECORDED_MPP_SOURCES
    from napari_slpd.features.slide_tasks import collect_tasks
    from napari_slpd.features.store import read_store_attrs

    cohort = Cohort(args.out)
    tasks = collect_tasks(args.slides, args.slides_from)
    added, problems = 0, []
    for task in tasks:
        path = cohort.features_path(task.slide_id)
        try:
            attrs = read_store_attrs(path)
        except SlpdError as exc:
            problems.append(f"{task.slide_id}: {exc}")
            continue
        if not attrs.get("complete"):
            problems.append(f"{task.slide_id}: {path} is not complete; run `slpd extract` to finish it")
            continue
        settings = attrs.get("settings") if isinstance(attrs.get("settings"), dict) else {}
        source = attrs.get("mpp_source", settings.get("mpp_source"))
        mpp = attrs.get("mpp", settings.get("mpp"))
        if task.mpp is not None:
            mpp, source = task.mpp, "user"
        keep = source in RECORDED_MPP_SOURCES and mpp is not None
        try:
            cohort.add_slide(task.path, mpp=float(mpp) if keep else None, mpp_source=source if keep else None)
        except SlpdError as exc:
            problems.append(f"{task.slide_id}: {exc}")
            continue
        added += 1
    for line in problems:
        print(f"not registered: {line}", file=sys.stderr)
    print(f"registered {added} of {len(tasks)} slides in {cohort.root}")
    return 1 if problems else 0


def slide_states(cohort, extra: list | None = None) -> list[dict]:
    """One dict per slide: slide_id, state, registered, regions, message, lock (holder) and lock_state."""
    from napari_slpd.features.processor import error_record_path
    from napari_slpd.features.store import partial_path_for, read_store_attrs
    from napari_slpd.features.store_writer import lock_path_for
    from napari_slpd.utils.locks import lock_status

    registered = set(cohort.slide_ids())
    ids = set(registered) | {t.slide_id for t in (extra or [])}
    folder = cohort.features_path("x").parent
    for features in {folder, cohort.root / "features"}:
        if features.is_dir():
            for entry in features.iterdir():
                name = entry.name
                if name.endswith(".h5") and not name.startswith("."):
                    ids.add(name[:-3])
                elif name.endswith(".h5.partial") and not name.startswith("."):
                    ids.add(name[: -len(".h5.partial")])
                elif name.startswith(".") and name.endswith(".h5.error.json"):
                    ids.add(name[1: -len(".h5.error.json")])
    rows = []
    for slide_id in sorted(ids):
        final = cohort.features_path(slide_id)
        row = {"slide_id": slide_id, "state": "missing", "registered": slide_id in registered, "regions": "",
               "message": "", "lock": "", "lock_state": ""}
        partial = partial_path_for(final)
        error = error_record_path(final)
        if final.exists():
            try:
                attrs = read_store_attrs(final)
                row["state"] = "done" if attrs.get("complete") else "damaged"
                row["regions"] = str(attrs.get("n_regions", ""))
            except SlpdError as exc:
                row["state"], row["message"] = "damaged", str(exc)
        elif partial.exists():
            row["state"] = "partial"
            try:
                attrs = read_store_attrs(partial)
                row["regions"] = f"{attrs.get('n_regions_done', '?')}/{attrs.get('n_regions_total', '?')}"
            except SlpdError:
                row["regions"] = "?"
        if row["state"] != "done" and error.exists():
            try:
                row["message"] = json.loads(error.read_text(encoding="utf-8")).get("message", "")
            except (OSError, ValueError):
                row["message"] = "(unreadable error record)"
            if row["state"] == "missing":
                row["state"] = "failed"
        holder, state = lock_status(lock_path_for(final))
        if state != "free":
            row["lock_state"] = state
            row["lock"] = holder.describe() if holder is not None else "unknown holder"
        rows.append(row)
    return rows


def run_status(args) -> int:
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.slide_tasks import collect_tasks

    cohort = Cohort(args.out, create=False)
    extra = collect_tasks(args.slides, args.slides_from) if (args.slides or args.slides_from) else []
    rows = slide_states(cohort, extra)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    if args.json:
        print(json.dumps({"cohort": str(cohort.root), "slides": rows, "counts": counts}, indent=2))
        return 0
    print(table(("slide", "state", "registered", "regions", "lock", "note"),
                [(r["slide_id"], r["state"], "yes" if r["registered"] else "no", r["regions"],
                  f"{r['lock_state']}: {r['lock']}" if r["lock"] else "", r["message"]) for r in rows]))
    print(f"{len(rows)} slides: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")
          + f" ({cohort.root})")
    return 0


__all__ = ["register", "run_register", "run_status", "slide_states"]
