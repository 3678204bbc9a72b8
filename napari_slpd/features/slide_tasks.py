"""Which slides a run extracts: paths and folders, slide-list files, and shards for job arrays.

* A slide-list file (``--slides-from``) holds one slide path per line (``#`` starts a comment), or is a CSV
  whose header names a path column (``path``, ``wsi``, ``slide``, ``slide_path`` or ``filename``, as
  TRIDENT's list files) and optionally an ``mpp`` column (um/px for that slide, overriding its metadata).
  Relative paths are taken from the list file's folder.
* A shard (``--shard I/N``, I from 0 to N-1, or ``--shard slurm`` from SLURM_ARRAY_TASK_ID,
  SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT) is a fixed part of the slides: the slides are dealt
  largest first, each to the shard with the fewest bytes so far (ties: the lower shard), so N jobs get
  about equal work, every slide is in exactly one shard, and every job computes the same parts whatever
  the order or the mount path its list gives.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from napari_slpd.errors import SlpdError

PATH_COLUMNS = ("path", "wsi", "slide", "slide_path", "filename")


@dataclass
class SlideTask:
    path: Path  # as registered: a DICOM series by its folder
    mpp: float | None = None  # um/px given for this slide (list file), None: the file's own or the fallback
    size: int = 0  # bytes on disk (largest slides go first)
    id: str | None = None  # the slide id when known already (a registered slide), else from the path

    @property
    def slide_id(self) -> str:
        if self.id is not None:
            return self.id
        from napari_slpd.slides.ids import slide_id_for

        return slide_id_for(self.path)


def registry_path(path: Path) -> Path:
    """What the cohort registers: a DICOM series by its folder (its slide id is the folder's name)."""
    path = Path(path).expanduser().resolve()
    if path.is_file() and path.suffix.lower() == ".dcm":
        return path.parent
    return path


def slide_bytes(path: Path) -> int:
    """Bytes of a slide on disk (a folder: its files, e.g. a DICOM series or an .mrxs's data folder)."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        size = path.stat().st_size
        data = path.with_suffix("")  # .mrxs keeps its tiles in a folder of the same name
        if path.suffix.lower() == ".mrxs" and data.is_dir():
            size += sum(p.stat().st_size for p in data.iterdir() if p.is_file())
        return size
    except OSError:
        return 0


def expand_slides(items: list[str]) -> list[Path]:
    """Slide paths from files and folders, in a stable order, without duplicates."""
    from napari_slpd.slides.ids import find_slides, is_dicom_folder

    out: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            raise SlpdError(f"{path} does not exist")
        if is_dicom_folder(path):
            out.append(path)  # one DICOM series
        elif path.is_dir():
            found = find_slides(path)
            if not found:
                raise SlpdError(f"no slides in {path} (looked for .svs, .tif(f), .ndpi, .mrxs, ... and DICOM folders)")
            out.extend(found)
        else:
            out.append(path)
    seen, unique = set(), []
    for path in out:
        key = str(path.resolve())
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def read_slide_list(list_file: str | os.PathLike) -> list[tuple[Path, float | None]]:
    """(path, mpp or None) per slide of a list file (see the module's docstring)."""
    list_file = Path(list_file).expanduser()
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SlpdError(f"cannot read the slide list {list_file}: {exc.strerror or exc}") from exc
    base = list_file.resolve().parent
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise SlpdError(f"the slide list {list_file} names no slide")
    header = [h.strip().lower() for h in next(csv.reader([lines[0]]))]
    column = next((c for c in PATH_COLUMNS if c in header), None)
    rows: list[tuple[str, float | None]] = []
    if column is not None:
        mpp_col = header.index("mpp") if "mpp" in header else None
        path_col = header.index(column)
        for number, row in enumerate(csv.reader(lines[1:]), start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) <= path_col or not row[path_col].strip():
                raise SlpdError(f"{list_file} line {number}: no {column!r} value")
            mpp = None
            if mpp_col is not None and len(row) > mpp_col and row[mpp_col].strip():
                try:
                    mpp = float(row[mpp_col])
                except ValueError:
                    raise SlpdError(f"{list_file} line {number}: mpp {row[mpp_col]!r} is not a number") from None
                if not 0.01 <= mpp <= 100:
                    raise SlpdError(f"{list_file} line {number}: mpp {mpp} um/px is not a plausible pixel size")
            rows.append((row[path_col].strip(), mpp))
    elif "," in lines[0] and not Path(lines[0].strip()).expanduser().exists():
        raise SlpdError(f"{list_file} looks like a CSV but its header names no path column "
                        f"(one of {', '.join(PATH_COLUMNS)}): {lines[0].strip()!r}")
    else:
        rows = [(line.strip(), None) for line in lines]
    out = []
    for name, mpp in rows:
        path = Path(name).expanduser()
        out.append((path if path.is_absolute() else base / path, mpp))
    return out


def collect_tasks(items: list[str], slides_from: str | None = None) -> list[SlideTask]:
    """The slides of paths/folders ``items`` and of a list file, once each (a list file's mpp kept)."""
    if not items and not slides_from:
        raise SlpdError("no slides given: name slide files or folders, or a list file with --slides-from")
    tasks: dict[str, SlideTask] = {}
    listed = read_slide_list(slides_from) if slides_from else []
    missing = [str(p) for p, _ in listed if not p.exists()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise SlpdError(f"{len(missing)} slide(s) of {slides_from} do not exist: {', '.join(missing[:5])}{more}")
    for path in expand_slides(list(items)):
        tasks.setdefault(str(registry_path(path)), SlideTask(registry_path(path)))
    for path, mpp in listed:
        key = str(registry_path(path))
        task = tasks.setdefault(key, SlideTask(registry_path(path)))
        task.mpp = mpp if mpp is not None else task.mpp
    for task in tasks.values():
        task.size = slide_bytes(task.path)
    return list(tasks.values())


def largest_first(tasks: list[SlideTask]) -> list[SlideTask]:
    """Largest slide first; equal sizes by slide id (the same order on every machine)."""
    return sorted(tasks, key=lambda t: (-t.size, t.slide_id, str(t.path)))


def parse_shard(text: str | None, environ=os.environ) -> tuple[int, int] | None:
    """(index, count) from ``I/N`` (0 <= I < N) or ``slurm``; None for no sharding."""
    if text is None:
        return None
    if text.strip().lower() == "slurm":
        try:
            task = int(environ["SLURM_ARRAY_TASK_ID"])
            count = int(environ["SLURM_ARRAY_TASK_COUNT"])
            first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        except KeyError as exc:
            raise SlpdError(f"--shard slurm: ${exc.args[0]} is not set (run this inside an sbatch --array job)") from None
        except ValueError as exc:
            raise SlpdError(f"--shard slurm: the SLURM array variables are not integers ({exc})") from None
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
        if step != 1:
            raise SlpdError(f"--shard slurm needs consecutive array indices (--array=0-{count - 1}), not a step of {step}")
        index = task - first
    else:
        try:
            left, right = text.split("/")
            index, count = int(left), int(right)
        except ValueError:
            raise SlpdError(f"--shard {text!r}: write I/N (for instance 0/4 ... 3/4) or slurm") from None
    if count < 1 or not 0 <= index < count:
        raise SlpdError(f"--shard: shard {index} does not exist among {count} (shards are numbered 0 to {count - 1})")
    return index, count


def shard_tasks(tasks: list[SlideTask], index: int, count: int) -> list[SlideTask]:
    """Shard ``index`` of ``count`` (see the module's docstring), largest slide first."""
    loads = [0] * count
    mine = []
    for task in largest_first(tasks):
        target = min(range(count), key=lambda s: (loads[s], s))
        loads[target] += max(task.size, 1)
        if target == index:
            mine.append(task)
    return mine
