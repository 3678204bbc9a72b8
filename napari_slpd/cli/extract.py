"""``slpd extract SLIDES_OR_FOLDER --out COHORT``: region features of every slide into a cohort cache.

One FeatureStore per slide (``COHORT/features/<slide_id>.h5``), written chunk by chunk: an interrupted run
resumes where it stopped, a slide already extracted with the same settings is skipped, and a slide
extracted with other settings is refused unless ``--overwrite``.

Several GPUs: ``torchrun --nproc-per-node N -m napari_slpd extract ...`` (or ``torchrun $(which slpd)``).
Each rank takes every N-th slide (slides[rank::N]) and writes only those slides' files, so the files are
the same as from one process. No process group is needed: each rank leaves a small report in
``COHORT/.extract-ranks/``; rank 0 waits for all reports, prints the whole summary and alone writes
the cohort registry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from napari_slpd.errors import SlpdError
from napari_slpd.utils.device import rank_device

log = logging.getLogger(__name__)

RANKS_DIR = ".extract-ranks"
# A rank report older than rank 0's start by more than this is left over from an earlier run.
STALE_REPORT_S = 120.0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="extract region features (ViT-256 token grids + region embeddings) into a cohort cache",
        description="Cut each slide's tissue into regions, encode every patch (ViT-256 or another patch "
        "encoder) into a token grid and every grid into a region embedding (ViT-4K or mean), and cache "
        "them per slide. Resumable; runs one process per GPU under torchrun.",
    )
    add_slide_arguments(parser)
    parser.add_argument("--out", required=True, metavar="COHORT", help="cohort folder (created if missing)")
    model = parser.add_argument_group("models")
    model.add_argument("--encoder", default="hipt_vit256", metavar="SPEC",
                       help="patch encoder: a preset (uni_v1, uni_v2, virchow2, hoptimus0, gigapath, phikon_v2, "
                       "conch_v1, ...: `slpd encoders` lists them) | timm:NAME | open_clip:NAME "
                       "(default hipt_vit256)")
    model.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="patch encoder weights: the file or folder as published (e.g. UNI's pytorch_model.bin, "
                       "Phikon-v2's folder); random init without it")
    model.add_argument("--input-size", type=int, default=None, metavar="PX",
                       help="px the patch encoder sees (default: its own, 256 for hipt_vit256)")
    model.add_argument("--normalize", default=None, metavar="PRESET",
                       help="patch normalisation preset: hipt (0.5/0.5, HIPT default) | imagenet (ImageNet mean/std: "
                       "what SLPD's own extraction used) | openai_clip")
    model.add_argument("--region-encoder", default="hipt_vit4k", choices=("hipt_vit4k", "mean"),
                       help="region encoder (default hipt_vit4k)")
    model.add_argument("--region-checkpoint", default=None, metavar="PATH", help="ViT-4K weights")
    model.add_argument("--allow-pickle", action="store_true",
                       help="load checkpoints that need full unpickling (only for files you trust)")
    grid = parser.add_argument_group("regions")
    grid.add_argument("--region-px", type=int, default=4096, help="region side at target um/px (4096)")
    grid.add_argument("--patch-px", type=int, default=256, help="patch side (256)")
    grid.add_argument("--target-mpp", type=float, default=None,
                      help="um/px regions are cut at (default: what the encoder preset was trained at, 0.5 = 20x)")
    grid.add_argument("--min-tissue", type=float, default=0.25, help="tissue fraction a region needs (0.25)")
    run = parser.add_argument_group("running")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    run.add_argument("--batch-size", type=int, default=256, help="patches per encoder batch (bounds memory)")
    run.add_argument("--workers", type=int, default=None, help="region reader threads (default: CPU cores)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: adapt to the readers; a fixed number makes CPU runs "
                     "bit-for-bit repeatable)")
    run.add_argument("--regions-per-chunk", type=int, default=16, help="regions written (resumable) at a time")
    run.add_argument("--token-dtype", choices=("float16", "float32"), default="float16",
                     help="storage dtype of the token grids (default float16)")
    run.add_argument("--no-patch-features", action="store_true",
                     help="do not also store patch features in the CLAM/TRIDENT layout")
    run.add_argument("--compile", action="store_true", help="torch.compile the patch encoder (CUDA)")
    run.add_argument("--overwrite", action="store_true", help="replace features made with other settings")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_extract)


def add_slide_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", metavar="SLIDES_OR_FOLDER",
                        help="slide files, DICOM series folders, or folders of slides")
    parser.add_argument("--mpp", type=float, default=None, help="pixel size in um/px, overrides every file")
    parser.add_argument("--mpp-fallback", choices=("none", "objective", "level0"), default="none",
                        help="when a file has no plausible pixel size: 10 / objective power, or level 0 = 0.5 um/px")


def expand_slides(items: list[str]) -> list[Path]:
    """Slide paths from files and folders, in a stable order, without duplicates."""
    from napari_slpd.slides.ids import find_slides

    out: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            raise SlpdError(f"{path} does not exist")
        if path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir() if p.is_file()):
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


# -- distributed (torchrun) ---------------------------------------------------------------------------


@dataclass
class RankInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started: float = field(default_factory=time.time)

    @classmethod
    def from_env(cls) -> "RankInfo":
        try:
            rank = int(os.environ.get("RANK", "0"))
            world = int(os.environ.get("WORLD_SIZE", "1"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise SlpdError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc})") from exc
        if world < 1 or not 0 <= rank < world:
            raise SlpdError(f"RANK {rank} does not fit WORLD_SIZE {world}")
        return cls(rank, world, local)

    def share(self, items: list) -> list:
        return items[self.rank :: self.world]


def _run_token(slides: list[Path], out: Path, world: int) -> str:
    """Same on every rank of one launch: the launcher's ids and the job itself."""
    env = "|".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
                                                   "TORCHELASTIC_RESTART_COUNT"))
    text = "\n".join([env, str(out), str(world), *(str(p.resolve()) for p in slides)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_rank_report(folder: Path, info: RankInfo, rows: list[dict]) -> None:
    from napari_slpd.utils.files import atomic_write_json

    atomic_write_json(folder / f"rank{info.rank}.json", {"rank": info.rank, "started": info.started, "rows": rows})


def _wait_for_ranks(folder: Path, info: RankInfo, poll_s: float = 0.5) -> list[dict]:
    """Rank 0: the rows of every other rank's report of this run (waits for them)."""
    rows: dict[int, list[dict]] = {}
    last_note = time.time()
    while len(rows) < info.world - 1:
        for r in range(1, info.world):
            if r in rows:
                continue
            path = folder / f"rank{r}.json"
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if float(report.get("started", 0.0)) < info.started - STALE_REPORT_S:
                continue  # a crashed earlier launch left it; this run's rank will overwrite it
            rows[r] = report["rows"]
        if len(rows) < info.world - 1:
            if time.time() - last_note > 60:
                waiting = [r for r in range(1, info.world) if r not in rows]
                print(f"rank 0: waiting for ranks {waiting} to finish their slides", file=sys.stderr)
                last_note = time.time()
            time.sleep(poll_s)
    return [row for r in sorted(rows) for row in rows[r]]


# -- the command --------------------------------------------------------------------------------------


def build_encoders(args, device: str):
    from napari_slpd.models.encoders import build_patch_encoder, build_region_encoder

    norm = {"mean": args.normalize, "std": args.normalize} if getattr(args, "normalize", None) else {}
    patch = build_patch_encoder(args.encoder, checkpoint=args.checkpoint, device=device,
                                input_size=getattr(args, "input_size", None),
                                allow_pickle=getattr(args, "allow_pickle", False), **norm)
    region = build_region_encoder(args.region_encoder, checkpoint=args.region_checkpoint, device=device,
                                  in_dim=patch.dim, allow_pickle=getattr(args, "allow_pickle", False))
    return patch, region


def extraction_config(args):
    from napari_slpd.features.engine import ExtractionConfig
    from napari_slpd.models.presets import default_mpp
    from napari_slpd.slides.grid import GridConfig

    return ExtractionConfig(
        grid=GridConfig(region_px=args.region_px, patch_px=args.patch_px,
                        target_mpp=args.target_mpp if args.target_mpp is not None else default_mpp(args.encoder),
                        min_tissue=args.min_tissue),
        batch_size=args.batch_size,
        num_workers=args.workers,
        regions_per_chunk=args.regions_per_chunk,
        device=args.device,
        compile=args.compile,
        store_patch_features=not args.no_patch_features,
        token_dtype=args.token_dtype,
        mpp=args.mpp,
        mpp_fallback=args.mpp_fallback,
        overwrite=args.overwrite,
        torch_threads=args.threads if args.threads else "auto",
    )


def _result_row(result=None, path: Path | None = None, error: str | None = None) -> dict:
    if result is None:
        from napari_slpd.slides.ids import slide_id_for

        return {"slide_id": slide_id_for(path), "path": str(path), "status": "error", "regions": 0,
                "computed": 0, "seconds": 0.0, "message": error or "", "mpp": None, "mpp_source": None}
    return {
        "slide_id": result.slide_id,
        "path": str(result.slide_path),
        "status": result.status,
        "regions": result.n_regions,
        "computed": result.n_computed,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 3),
        "message": result.message,
        "mpp": result.mpp,
        "mpp_source": result.mpp_source,
    }


def format_summary(rows: list[dict]) -> str:
    """A fixed-width table: one line per slide, then totals."""
    header = ("slide", "status", "regions", "computed", "seconds", "regions/s", "note")
    lines = []
    for row in rows:
        rate = row["computed"] / row["seconds"] if row["seconds"] and row["computed"] else 0.0
        note = row.get("message", "")
        if row.get("resumed_from"):
            note = (f"resumed after {row['resumed_from']}; " + note).rstrip("; ")
        lines.append((row["slide_id"], row["status"], str(row["regions"]), str(row["computed"]),
                      f"{row['seconds']:.1f}", f"{rate:.2f}" if rate else "-", note))
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) if lines else len(header[i])
              for i in range(len(header) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths), "----")]
    out += [fmt.format(*line) for line in lines]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    total_regions = sum(row["computed"] for row in rows)
    total_s = sum(row["seconds"] for row in rows)
    out.append(f"{len(rows)} slides: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
               + f"; {total_regions} regions computed in {total_s:.1f} s")
    return "\n".join(out)


def register_rows(cohort, rows: list[dict]) -> int:
    """Add every slide whose features are complete to the cohort registry (rank 0 only)."""
    n = 0
    for row in rows:
        if row["status"] not in ("extracted", "skipped"):
            continue
        keep_mpp = row.get("mpp_source") in ("user", "objective-power", "level0-assumed")
        cohort.add_slide(row["path"], mpp=row["mpp"] if keep_mpp else None,
                         mpp_source=row["mpp_source"] if keep_mpp else None)
        n += 1
    return n


def run_extract(args) -> int:
    from napari_slpd.cohort import Cohort

    info = RankInfo.from_env()
    cohort = Cohort(args.out)
    slides = expand_slides(args.slides)
    mine = info.share(slides)
    config = extraction_config(args)
    device = rank_device(args.device, info.local_rank, info.world)
    patch_encoder, region_encoder = build_encoders(args, device)
    prefix = f"[rank {info.rank}/{info.world}] " if info.world > 1 else ""
    if info.rank == 0:
        print(f"{prefix}{len(slides)} slides -> {cohort.root}; patch encoder {patch_encoder.model_id}, "
              f"region encoder {region_encoder.model_id}, device {device}", file=sys.stderr)

    rows: list[dict] = []
    folder = cohort.root / RANKS_DIR / _run_token(slides, cohort.root, info.world)
    try:
        for row in _extract_all(mine, cohort, patch_encoder, region_encoder, config, args, prefix):
            rows.append(row)
            if rows[-1].pop("stop", False):
                print(f"{prefix}stopped: {rows[-1]['message']}", file=sys.stderr)
                break
    except BaseException as exc:
        if info.world > 1 and info.rank != 0:
            # Rank 0 waits for this report: say what failed rather than leave it waiting (a launcher
            # other than torchrun may not stop the other ranks when one dies).
            for path in mine[len(rows):]:
                row = _result_row(path=path, error=f"rank {info.rank} stopped: {type(exc).__name__}: {exc}")
                row["path"] = str(_registry_path(path))
                rows.append(row)
            folder.mkdir(parents=True, exist_ok=True)
            _write_rank_report(folder, info, rows)
        raise

    if info.world > 1:
        folder.mkdir(parents=True, exist_ok=True)
        if info.rank != 0:
            _write_rank_report(folder, info, rows)
            print(format_summary(rows), file=sys.stderr)
            return 1 if any(r["status"] == "error" for r in rows) else 0
        rows = rows + _wait_for_ranks(folder, info)
        order = {str(_registry_path(p)): i for i, p in enumerate(slides)}
        rows.sort(key=lambda r: order.get(r["path"], len(order)))
        _remove_tree(folder)

    registered = register_rows(cohort, rows)
    print(format_summary(rows))
    print(f"registered {registered} slides in {cohort.registry_path}")
    return 1 if any(r["status"] == "error" for r in rows) else 0


def _extract_all(paths, cohort, patch_encoder, region_encoder, config, args, prefix: str):
    """Extract the slides with a tqdm bar each, one row per slide; a bad slide gives an "error" row instead
    of stopping the run. Through extract_slides: the next slide's tissue and grid are made, and its reads
    started, while the current one is encoded."""
    from tqdm import tqdm

    from napari_slpd.features.extract_many import SlideJob, extract_slides

    bars: dict = {}

    def bar_for(path: Path):
        if path not in bars:
            bars[path] = tqdm(total=0, desc=f"{prefix}{path.name}", unit="region", disable=args.quiet,
                              leave=True, dynamic_ncols=True, file=sys.stderr)
        return bars[path]

    def job(path: Path) -> SlideJob:
        def progress(done: int, total: int) -> None:
            bar = bar_for(path)
            if bar.total != total:
                bar.reset(total=total)
            bar.n = done
            bar.refresh()

        return SlideJob(path, lambda slide: cohort.features_path(slide.slide_id), config, progress)

    try:
        for item, result, error in extract_slides((job(p) for p in paths), patch_encoder, region_encoder):
            bar = bar_for(item.slide)
            if error is None:
                row = _result_row(result)
                bar.set_postfix_str(result.status)
            elif isinstance(error, SlpdError):
                # One bad slide (damaged file, unknown pixel size, other settings) does not stop the cohort.
                row = _result_row(path=item.slide, error=str(error))
                bar.set_postfix_str("error")
                if getattr(error, "kind", None) == "full":  # a full disk stops the run: the next slides cannot be written
                    row["stop"] = True
            else:
                raise error
            bars.pop(item.slide).close()
            row["path"] = str(_registry_path(item.slide))
            yield row
    finally:
        for bar in bars.values():
            bar.close()


def _registry_path(path: Path) -> Path:
    """What the cohort registers: a DICOM series by its folder (its slide id is the folder's name)."""
    path = path.expanduser().resolve()
    if path.is_file() and path.suffix.lower() == ".dcm":
        return path.parent
    return path


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # only when no other run's reports are there
    except OSError:
        pass
