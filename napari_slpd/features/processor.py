"""The one extraction processor of a cohort: ``slpd extract`` (one process, a shard, or a torchrun rank)
and the GUI's Session.extract both run it, so both prefetch the next slide, guard fine-tuned features,
register finished slides and report errors the same way.

Per slide: the features are written by :func:`napari_slpd.features.extract_many.extract_slides` (the next
slide prepared while the current one is encoded); a finished slide ("extracted" or "skipped") is
registered in the cohort at once, by the process that made it; a failed one leaves a small error record
beside its feature file (``features/.<id>.h5.error.json``, read by ``slpd status``), cleared when it
succeeds. Which slides this process takes comes from a coordinator (napari_slpd.features.distributed):
all of them, in order, for one process; the next free one, largest first, for a torchrun rank.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from napari_slpd.errors import FeatureStoreError, SlpdError
from napari_slpd.features.engine import ExtractionConfig, ExtractionResult
from napari_slpd.features.slide_tasks import SlideTask, largest_first
from napari_slpd.utils.progress import ProgressFn

log = logging.getLogger(__name__)

# pixel sizes worth recording in the registry: the ones the slide file does not hold itself
RECORDED_MPP_SOURCES = ("user", "objective-power", "level0-assumed")
FINISHED = ("extracted", "skipped")


def error_record_path(features_path: Path) -> Path:
    return Path(features_path).with_name(f".{Path(features_path).name}.error.json")


def result_row(result: ExtractionResult, path: Path | None = None) -> dict:
    """A plain dict of one slide's result (summaries, the coordinator's gathering)."""
    return {
        "slide_id": result.slide_id,
        "path": str(path if path is not None else result.slide_path),
        "status": result.status,
        "regions": result.n_regions,
        "computed": result.n_computed,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 3),
        "message": result.message,
        "mpp": result.mpp,
        "mpp_source": result.mpp_source,
    }


@dataclass
class ProcessorRun:
    """What a run did: ``results`` of this process's slides (in the order it did them), ``rows`` of every
    slide of the launch (all ranks; plan order), ``registered`` (slides this process registered),
    ``stopped`` (why the run stopped early: a full disk), ``lost`` (ranks that died, see PeersLost)."""

    results: list[ExtractionResult] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    registered: int = 0
    stopped: str = ""
    lost: SlpdError | None = None


class ExtractionProcessor:
    """Extract slides into ``cohort``. ``config``: the run's settings (a slide's own mpp from its task
    overrides ``config.mpp``). ``keep_current``: with ``overwrite``, replace only files made with other
    settings (a current one stays cached); ``guard(slide_id)``: a message when that slide's features must
    not be replaced (features of a fine-tuned checkpoint), checked before any overwrite. ``register``:
    add finished slides to the cohort registry."""

    def __init__(self, cohort, patch_encoder, region_encoder, config: ExtractionConfig, register: bool = True,
                 keep_current: bool = False, guard: Callable[[str], str | None] | None = None, prefetch: bool = True):
        self.cohort, self.patch, self.region = cohort, patch_encoder, region_encoder
        self.config, self.register, self.keep_current = config, register, keep_current
        self.guard, self.prefetch = guard, prefetch

    def config_for(self, task: SlideTask) -> ExtractionConfig:
        config = replace(self.config)
        if task.mpp is not None:
            config.mpp = task.mpp
        return config

    def _out_path(self, task: SlideTask, config: ExtractionConfig):
        """The slide's feature file, named once the slide is open; applies keep_current and the guard."""

        def out(slide) -> Path:
            path = self.cohort.features_path(task.id if task.id is not None else slide.slide_id)
            if self.keep_current and config.overwrite and path.exists():
                from napari_slpd.features.engine import extraction_settings
                from napari_slpd.features.store import existing_store_is_current

                try:
                    current = existing_store_is_current(path, extraction_settings(slide, config, self.patch, self.region))
                except FeatureStoreError:  # other settings, incomplete or damaged: replace it
                    current = False
                message = self.guard(task.slide_id) if (self.guard is not None and not current) else None
                if message:
                    raise FeatureStoreError(message)
                config.overwrite = not current
            return path

        return out

    def run(self, tasks: Sequence[SlideTask], coordinator=None,
            progress_for: Callable[[int, SlideTask], ProgressFn | None] | None = None,
            on_result: Callable[[int, SlideTask, ExtractionResult], None] | None = None, cancel=None) -> ProcessorRun:
        """Extract the tasks this process gets from ``coordinator`` (default: all, in order).
        ``progress_for(i, task)``: a slide's progress function; ``on_result(i, task, result)`` after each
        slide (``i``: the slide's place in the plan). Errors of one slide (SlpdError) give an "error"
        result; others are raised, after telling the other ranks this process's slides will not come."""
        from napari_slpd.features.distributed import LocalCoordinator, PeersLost
        from napari_slpd.features.extract_many import SlideJob, extract_slides

        coordinator = coordinator or LocalCoordinator()
        tasks = list(tasks)
        if coordinator.world > 1:
            ids = [t.slide_id for t in tasks]
            twice = sorted({i for i in ids if ids.count(i) > 1})
            if twice:
                raise SlpdError(f"two slides share the id(s) {', '.join(twice[:5])}; rename one of each pair "
                                "(a cohort keeps one slide per id)")
            tasks = largest_first(tasks)
        plan_ids = coordinator.plan([t.slide_id for t in tasks])
        coordinator.check_shared(self.cohort.features_path("x").parent.parent)
        by_id = {t.slide_id: t for t in tasks}
        plan = [by_id[i] for i in plan_ids] if coordinator.world > 1 else tasks
        run = ProcessorRun()
        own: dict[int, dict] = {}
        claimed: list[int] = []

        def jobs():
            for index in coordinator.claims(len(plan)):
                claimed.append(index)
                task = plan[index]
                config = self.config_for(task)
                progress = progress_for(index, task) if progress_for is not None else None
                job = SlideJob(task.path, self._out_path(task, config), config, progress)
                job.index = index  # type: ignore[attr-defined]
                yield job

        try:
            for job, result, error in extract_slides(jobs(), self.patch, self.region, cancel, prefetch=self.prefetch):
                index = job.index
                task = plan[index]
                if error is not None:
                    if not isinstance(error, SlpdError):
                        raise error
                    result = ExtractionResult(task.slide_id, task.path, self.cohort.features_path(task.slide_id),
                                              "error", message=str(error))
                    if getattr(error, "kind", None) == "full":  # the next slides cannot be written either
                        run.stopped = str(error)
                self._settle(task, result, run)
                run.results.append(result)
                row = result_row(result, task.path)
                own[index] = row
                coordinator.finished(index, row)
                if on_result is not None:
                    on_result(index, task, result)
                if result.status == "cancelled" or run.stopped:
                    break
        except BaseException as exc:
            self._give_up(coordinator, plan, claimed, own, f"{type(exc).__name__}: {exc}")
            coordinator.close()
            raise
        if run.stopped or (cancel is not None and len(own) < len(claimed)):
            self._give_up(coordinator, plan, claimed, own, run.stopped or "cancelled")
        try:
            rows = coordinator.gather(own)
        except PeersLost as exc:
            run.lost = exc
            rows = {**exc.rows, **own}
        finally:
            coordinator.close()
        run.rows = [rows[i] for i in sorted(rows)]
        return run

    def _settle(self, task: SlideTask, result: ExtractionResult, run: ProcessorRun) -> None:
        """Register a finished slide; keep (or clear) the error record ``slpd status`` reads."""
        from napari_slpd.utils.files import atomic_write_json

        record = error_record_path(self.cohort.features_path(task.slide_id))
        if result.status == "error":
            with contextlib.suppress(SlpdError, OSError):
                atomic_write_json(record, {"slide_id": task.slide_id, "path": str(task.path), "message": result.message})
            if self.register:  # listed with its reason in the Cohort panel, not dropped (a later success clears it)
                self.cohort.record_skipped(task.path, "not extracted", result.message)
            return
        if result.status not in FINISHED:
            return
        with contextlib.suppress(OSError):
            record.unlink()
        if not self.register:
            return
        keep_mpp = result.mpp_source in RECORDED_MPP_SOURCES
        try:
            self.cohort.add_slide(task.path, mpp=result.mpp if keep_mpp else None,
                                  mpp_source=result.mpp_source if keep_mpp else None)
            run.registered += 1
        except SlpdError as exc:  # e.g. another file already uses this slide id
            result.status, result.message = "error", f"features written but not registered: {exc}"

    @staticmethod
    def _give_up(coordinator, plan, claimed, own, why: str) -> None:
        """Tell the other ranks this process's claimed slides will not be finished (they stop waiting)."""
        if coordinator.world == 1:
            return
        for index in claimed:
            if index in own:
                continue
            task = plan[index]
            row = {"slide_id": task.slide_id, "path": str(task.path), "status": "error", "regions": 0,
                   "computed": 0, "resumed_from": 0, "seconds": 0.0, "mpp": None, "mpp_source": None,
                   "message": f"rank {coordinator.rank} stopped: {why}"}
            own[index] = row
            with contextlib.suppress(SlpdError):
                coordinator.finished(index, row)
