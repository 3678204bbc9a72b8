"""JSON-lines progress stream of a training run, for the GUI and for scripts.

One JSON object per line, written and flushed by the main process only (rank 0), to a file (appended, so a
resumed run continues the same file) or to stdout (``--events -``). Every object has:

- ``event``: the kind (below), ``v``: schema version (1), ``time``: Unix time in seconds (float).

Kinds and their other keys:

``start``
    ``run_dir``, ``device`` ("cpu", "cuda:0"...), ``world_size``, ``amp`` ("off", "bf16", "fp16"), ``preset``,
    ``n_slides``, ``n_regions``, ``grid`` (token grid side G), ``crops`` ([global, local]),
    ``steps_per_epoch``, ``epochs``, ``total_steps``, ``global_batch``, ``start_epoch``, ``start_step``
    (global step to run next), ``resumed_from`` (checkpoint path or null), ``config`` (all settings, a dict).
``data``
    ``slides`` ({slide_id: n_regions} of the slides used), ``missing`` ([{"slide_id", "reason"}]: cohort slides
    without usable token grids), ``below_min_regions`` ([{"slide_id", "n_regions"}]: slides used for the DINO
    loss but left out of the prototype losses), ``min_num_region``.
``clusters``
    After re-clustering at the start of an epoch > warm_epoch: ``epoch``, ``k``, ``n_slides_clustered``,
    ``excluded`` ([{"slide_id", "n_regions"}]), ``cluster_size_min`` / ``_mean`` / ``_max`` (regions per
    prototype), ``mean_similarity`` (mean cosine of a region to its prototype), ``mean_neighbour_similarity``
    (mean S(n, m) of each slide to its nearest slide), ``mean_prototype_distance`` (mean K - S of the same pairs),
    ``n_without_neighbour``, ``seconds``.
``step``
    ``epoch``, ``step`` (index inside the epoch), ``global_step``, ``steps_per_epoch``, ``total_steps``,
    ``loss``, ``dino_loss``, ``intra_loss``, ``inter_loss`` (floats, averaged over processes), ``prototype_losses``
    (bool: active this epoch), ``dino_target_entropy``, ``intra_target_entropy``, ``inter_target_entropy``
    (mean entropy in nats of each loss's sharpened targets, 0 when inactive: each loss term is this entropy
    plus the KL divergence of the student from the targets, so a term can rise only because its targets
    grow less peaked, e.g. as centering spreads the teacher's output), ``lr``, ``weight_decay``, ``momentum`` (teacher EMA), ``teacher_temp``,
    ``steps_per_s``, ``regions_per_s`` (global batch / step time, smoothed), ``eta_s`` (remaining seconds).
``epoch``
    End of an epoch: ``epoch``, ``loss``, ``dino_loss``, ``intra_loss``, ``inter_loss`` (means over the epoch's
    steps), ``seconds``.
``monitor``
    KNN monitor (only with ``--labels``; src_training/monitor.py), before the first step (``epoch`` -1) and
    after every epoch: ``epoch``, ``knn_auc`` (mean over the frozen folds of the one-vs-rest macro AUC of a
    k-NN vote on the slides' mean teacher region embeddings), ``knn_auc_std``, ``knn_auc_pooled`` (AUC of
    all folds' test predictions together), ``balanced_accuracy``, ``n_folds_scored``, ``task``, ``classes``,
    ``n_slides`` (labelled slides of the run), ``n_folds``, ``k``, ``n_unlabelled`` (run slides without a
    label), ``n_unknown`` (labelled slides not in the run), ``representation`` ("region_mean"), ``seconds``.
``checkpoint``
    ``path``, ``epoch`` (next epoch to run), ``global_step`` (next step to run), ``reason`` ("epoch", "step", "stop").
``export``
    ``path`` (teacher ViT-4K in the official DINO checkpoint layout), ``global_step``.
``stopped``
    A clean stop on SIGINT/SIGTERM or a cancel request: ``reason``, ``checkpoint`` (path).
``error``
    ``kind`` ("non_finite_loss", "input", "internal"), ``message``, ``checkpoint`` (last good one or null).
``done``
    Training finished: ``epochs``, ``global_step``, ``seconds``, ``export`` (path).

Nothing secret is ever written: events hold settings, paths and numbers, never environment variables;
setting names that look like credentials are masked anyway.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

EVENTS_NAME = "events.jsonl"  # the stream's file name inside a run folder

SCHEMA_VERSION = 1
_SECRET_WORDS = ("token", "secret", "password", "api_key", "apikey", "credential")


def _clean(value: Any, key: str = "") -> Any:
    """JSON-safe copy: non-finite floats become null, numpy/torch scalars become Python numbers."""
    if any(word in key.lower() for word in _SECRET_WORDS):
        return "***"
    if isinstance(value, dict):
        return {str(k): _clean(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class EventWriter:
    """Writes events as JSON lines; ``EventWriter(None)`` drops them (non-main processes, no --events)."""

    def __init__(self, target: str | Path | IO[str] | None, enabled: bool = True):
        self._lock = threading.Lock()
        self._own = False
        self._stream: IO[str] | None = None
        if not enabled or target is None:
            return
        if target == "-":
            self._stream = sys.stdout
        elif isinstance(target, (str, Path)):
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._stream = open(path, "a", encoding="utf-8")
            self._own = True
        else:
            self._stream = target

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def emit(self, event: str, **fields: Any) -> dict:
        record = {"event": event, "v": SCHEMA_VERSION, "time": round(time.time(), 3)}
        record.update(_clean(fields))
        if self._stream is not None:
            line = json.dumps(record, allow_nan=False, separators=(",", ":"))
            with self._lock:
                self._stream.write(line + "\n")
                self._stream.flush()
        return record

    def close(self) -> None:
        if self._own and self._stream is not None:
            self._stream.close()
        self._stream = None


def read_events(path: str | Path) -> list[dict]:
    """All complete events of a file (a last line cut by a kill is ignored)."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
