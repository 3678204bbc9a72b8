"""``slpd extract SLIDES_OR_FOLDER --out COHORT``: region features of every slide into a cohort cache.

One FeatureStore per slide (``COHORT/features/<slide_id>.h5``), written chunk by chunk: an interrupted run
resumes where it stopped, a slide already extracted with the same settings is skipped, and a slide
extracted with other settings is refused unless ``--overwrite``.

Several GPUs or machines: ``torchrun --nproc-per-node N [--nnodes M ...] -m napari_slpd extract ...``. The
ranks meet in torch.distributed's store (napari_slpd.features.distributed): a free rank takes the next
slide, largest first; each rank registers the slides it finished; a rank that dies is named by the others
within ``--peer-timeout`` seconds, and they exit non-zero; a rerun finishes the rest. Job arrays (SLURM and
others): ``--shard I/N`` or ``--shard slurm`` gives each job a fixed part; the jobs' cohort is the same as
one run's. The per-slide work itself is napari_slpd.features.processor's, shared with the GUI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from napari_slpd.cli.common import (add_command, add_new_cohort_option, add_output_flags, add_pixel_size_arguments,
                                    table)
from napari_slpd.errors import SlpdError
from napari_slpd.features.distributed import RankInfo
from napari_slpd.features.slide_tasks import registry_path
from napari_slpd.utils.device import rank_device


def register(subparsers) -> None:
    parser = add_command(
        subparsers, "extract", run_extract,
        help="extract region features (ViT-256 token grids + region embeddings) into a cohort cache",
        description="Cut each slide's tissue into regions, encode every patch (ViT-256 or another patch "
        "encoder) into a token grid and every grid into a region embedding (ViT-4K or mean), and cache "
        "them per slide. Resumable; runs one process per GPU under torchrun.",
    )
    add_slide_arguments(parser)
    add_new_cohort_option(parser)
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
    add_output_flags(run, json=False, quiet_help="no progress bars")
    many = parser.add_argument_group("several processes and machines")
    many.add_argument("--shard", default=None, metavar="I/N",
                      help="extract only part I of N (0 <= I < N) of the slides, e.g. one task of a job array; "
                      "'slurm' reads SLURM_ARRAY_TASK_ID / _MIN / _COUNT. Every slide is in one part")
    many.add_argument("--peer-timeout", type=float, default=None, metavar="S",
                      help="under torchrun: a rank silent this long is judged lost (default 120, "
                      "$SLPD_PEER_TIMEOUT_S)")
    many.add_argument("--join-timeout", type=float, default=None, metavar="S",
                      help="under torchrun: how long to wait for every rank to start (default 900, $SLPD_JOIN_TIMEOUT_S)")


def add_slide_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="*", metavar="SLIDES_OR_FOLDER",
                        help="slide files, DICOM series folders, or folders of slides")
    parser.add_argument("--slides-from", default=None, metavar="FILE",
                        help="a list of slides: one path per line, or a CSV with a path column (path, wsi, slide, "
                        "slide_path or filename) and an optional mpp column, as TRIDENT's list files; relative "
                        "paths are taken from the file's folder")
    add_pixel_size_arguments(parser, "every file")


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
    from napari_slpd.features.processor import result_row

    return result_row(result)


def format_summary(rows: list[dict]) -> str:
    """A table: one line per slide, then totals."""
    lines = []
    for row in rows:
        rate = row["computed"] / row["seconds"] if row["seconds"] and row["computed"] else 0.0
        note = row.get("message", "")
        if row.get("resumed_from"):
            note = (f"resumed after {row['resumed_from']}; " + note).rstrip("; ")
        lines.append((row["slide_id"], row["status"], row["regions"], row["computed"], f"{row['seconds']:.1f}",
                      f"{rate:.2f}" if rate else "-", note))
    out = [table(("slide", "status", "regions", "computed", "seconds", "regions/s", "note"), lines, rule=True)]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    total_regions = sum(row["computed"] for row in rows)
    total_s = sum(row["seconds"] for row in rows)
    out.append(f"{len(rows)} slides: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
               + f"; {total_regions} regions computed in {total_s:.1f} s")
    return "\n".join(out)


def run_extract(args) -> int:
    from napari_slpd.cohort import Cohort
    from napari_slpd.features.distributed import PeersLost, Timeouts, coordinator_for
    from napari_slpd.features.processor import ExtractionProcessor
    from napari_slpd.features.slide_tasks import collect_tasks, parse_shard, shard_tasks

    info = RankInfo.from_env()
    shard = parse_shard(args.shard)
    if shard is not None and info.world > 1:
        raise SlpdError("--shard and torchrun split the slides two ways: use one of them")
    timeouts = Timeouts(**{k: v for k, v in (("peer_s", args.peer_timeout), ("join_s", args.join_timeout))
                           if v is not None})
    cohort = Cohort(args.out)
    tasks = collect_tasks(args.slides, args.slides_from)
    if shard is not None:
        tasks = shard_tasks(tasks, *shard)
    config = extraction_config(args)
    device = rank_device(args.device, info.local_rank, info.world)
    coordinator = coordinator_for(info, timeouts)  # before the models: a missing rank is named at once
    patch_encoder, region_encoder = build_encoders(args, device)
    prefix = f"[rank {info.rank}/{info.world}] " if info.world > 1 else ""
    part = f" (shard {shard[0]}/{shard[1]})" if shard is not None else ""
    if info.rank == 0:
        print(f"{prefix}{len(tasks)} slides{part} -> {cohort.root}; patch encoder {patch_encoder.model_id}, "
              f"region encoder {region_encoder.model_id}, device {device}", file=sys.stderr)

    processor = ExtractionProcessor(cohort, patch_encoder, region_encoder, config)
    bars = _Bars(prefix, args.quiet)
    try:
        run = processor.run(tasks, coordinator, progress_for=bars.progress_for, on_result=bars.done)
    finally:
        bars.close()
    if run.stopped:
        print(f"{prefix}stopped: {run.stopped}", file=sys.stderr)
    order = {str(t.path): i for i, t in enumerate(tasks)}
    rows = sorted(run.rows, key=lambda r: order.get(r["path"], len(order)))
    if info.rank != 0:
        print(f"{prefix}registered {run.registered} slides", file=sys.stderr)
    else:
        print(format_summary(rows))
        print(f"registered {sum(r['status'] in ('extracted', 'skipped') for r in rows)} slides in {cohort.root}")
    if run.lost is not None:
        print(f"{prefix}{run.lost}", file=sys.stderr)
        return 3 if isinstance(run.lost, PeersLost) else 1
    return 1 if any(r["status"] == "error" for r in rows) else 0


class _Bars:
    """One tqdm bar per slide being extracted (stderr)."""

    def __init__(self, prefix: str, quiet: bool):
        self.prefix, self.quiet, self.bars = prefix, quiet, {}

    def _bar(self, task):
        from tqdm import tqdm

        if task.path not in self.bars:
            self.bars[task.path] = tqdm(total=0, desc=f"{self.prefix}{task.path.name}", unit="region",
                                        disable=self.quiet, leave=True, dynamic_ncols=True, file=sys.stderr)
        return self.bars[task.path]

    def progress_for(self, index, task):
        def progress(done: int, total: int) -> None:
            bar = self._bar(task)
            if bar.total != total:
                bar.reset(total=total)
            bar.n = done
            bar.refresh()

        return progress

    def done(self, index, task, result) -> None:
        bar = self._bar(task)
        bar.set_postfix_str(result.status)
        self.bars.pop(task.path).close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _registry_path(path: Path) -> Path:
    """What the cohort registers: a DICOM series by its folder (its slide id is the folder's name)."""
    return registry_path(path)
