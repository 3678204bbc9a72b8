"""The cohort-wide runs of a :class:`~napari_slpd.session.Session` that the CLI and the panels both start:
evaluation (slide-level tasks and segmentation), and switching the cohort's region encoder (an earlier
version, or a fine-tuned checkpoint). One path each, so ``slpd evaluate`` and the Evaluation panel see the
same representations (every region-embedding version), and ``slpd region-encoders --use`` and the
Fine-tune panel switch alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from napari_slpd.session.settings import ProgressFn


@dataclass
class EvaluationRun:
    """What :meth:`SessionRunsMixin.evaluate` answers: the slide-level result (None without labels) and the
    segmentation result (None without annotations)."""

    result: Any = None  # napari_slpd.evaluation.engine.EvaluationResult
    segmentation: Any = None  # napari_slpd.evaluation.segmentation.SegmentationResult


class SessionRunsMixin:
    """Evaluation and region-encoder switching, on ``self.cohort`` (mixed into Session)."""

    # -- evaluation ------------------------------------------------------------------------------------
    def representations(self) -> list:
        """The slide representations the cohort offers to evaluation (RepresentationInfo each), every
        region-embedding version included (``region_mean@KEY`` when the cohort holds several)."""
        from napari_slpd.evaluation.representations import list_representations

        _install_version_sources()
        return list_representations(self.cohort)

    def evaluate(self, labels=None, config=None, annotations=None, segmentation=None,
                 progress: ProgressFn | None = None, cancel=None) -> EvaluationRun:
        """Evaluate the cohort's slide representations on the tasks of ``labels`` (a labels CSV/TSV or a
        Patho-Bench split file; ``config``: an EvaluationConfig) and, with ``annotations`` (a folder of
        QuPath GeoJSON or label masks), its segmentations (``segmentation``: a SegmentationConfig; the cases
        of the labels file are used for its bootstrap). At least one of the two is needed."""
        from napari_slpd.errors import SlpdError

        if not labels and not annotations:
            raise SlpdError("a labels file (slide_id and task columns; optional case_id) or an annotations folder "
                            "(segmentation) is needed to evaluate")
        run = EvaluationRun()
        if labels:
            from napari_slpd.evaluation.engine import EvaluationConfig, evaluate

            _install_version_sources()
            run.result = evaluate(self.cohort, labels, config or EvaluationConfig(), progress=progress, cancel=cancel)
        if annotations:
            from dataclasses import replace

            from napari_slpd.evaluation.segmentation import SegmentationConfig, evaluate_segmentation

            seg_config = segmentation or SegmentationConfig()
            cases = {}
            for info in (run.result.tasks.values() if run.result is not None else []):
                cases.update(zip(info.data.slide_ids, map(str, info.data.cases)))
            if cases and seg_config.cases is None:
                seg_config = replace(seg_config, cases=cases)
            run.segmentation = evaluate_segmentation(self.cohort, annotations, seg_config, progress=progress,
                                                     cancel=cancel)
        return run

    # -- region encoders -------------------------------------------------------------------------------
    def region_encoders(self) -> list:
        """The region encoders the cohort holds embeddings of (CohortRegionEncoder each)."""
        from napari_slpd.session.versions import cohort_region_encoders

        return cohort_region_encoders(self.cohort)

    def use_region_encoder(self, version: str, progress: ProgressFn | None = None, cancel=None,
                           carry_names: bool = True):
        """Switch the cohort to the region embeddings of ``version`` (no embedding recomputed; prototypes kept
        for it restored, names carried over, the index follows). Returns a SwitchReport."""
        from napari_slpd.session.versions import use_region_encoder

        return use_region_encoder(self, version, progress=progress, cancel=cancel, carry_names=carry_names)

    def use_checkpoint(self, checkpoint: str | os.PathLike, progress: ProgressFn | None = None, cancel=None,
                       carry_names: bool = True):
        """Make a fine-tuned ViT-4K checkpoint the cohort's region encoder: re-encode every slide from its cached
        token grids, then switch to it. Returns a UseCheckpointReport."""
        from napari_slpd.session.use_checkpoint import use_checkpoint

        return use_checkpoint(self, checkpoint, progress=progress, cancel=cancel, carry_names=carry_names)

    def compare_region_encoders(self, labels, before: str, after: str, **kwargs):
        """Evaluate two region-embedding versions on the same slides and folds (a VersionComparison)."""
        from napari_slpd.session.versions import evaluate_versions

        return evaluate_versions(self.cohort, labels, before, after, **kwargs)


def _install_version_sources() -> None:
    from napari_slpd.session.versions import install_evaluation_sources

    install_evaluation_sources()
