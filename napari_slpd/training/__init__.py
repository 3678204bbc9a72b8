"""SLPD fine-tuning as seen from the viewer: the settings of a run and the background process that runs
``src_training``. No torch here: the trainer runs in its own process; its events are read with
:mod:`src_training.event_reader`, and its exported teacher is used by
:func:`napari_slpd.session.use_checkpoint.use_checkpoint`."""

from napari_slpd.training.run import TrainingRun, find_runs, remove_partial_files, running_runs
from napari_slpd.training.settings import (PRESETS, TrainingRunError, TrainingSettings, build_command,
                                          default_run_dir)

__all__ = ["PRESETS", "TrainingRun", "TrainingRunError", "TrainingSettings", "build_command", "default_run_dir",
           "find_runs", "remove_partial_files", "running_runs"]
