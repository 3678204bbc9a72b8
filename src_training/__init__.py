"""SLPD region-level self-distillation training (see ../shared/SPEC.md section 2).

Run it as ``slpd-train`` / ``python -m src_training`` (``--help`` lists the settings), or from Python::

    from napari_slpd.cohort import Cohort
    from src_training import Trainer, TokenGridIndex, preset

    cfg = preset("tiny").override({"optim.epochs": 2})
    index = TokenGridIndex.from_cohort(Cohort("COHORT", create=False))
    result = Trainer(cfg, index, "RUN_DIR", events="RUN_DIR/events.jsonl").fit(progress=None, cancel=None)
    result.export   # teacher ViT-4K in the official DINO layout, loadable by build_region_encoder

The event stream is documented in :mod:`src_training.events`.
"""

from src_training.config import TrainConfig, preset

__all__ = ["TrainConfig", "preset", "Trainer", "TrainResult", "TrainingDiverged", "TokenGridIndex"]


def __getattr__(name):
    # The trainer pulls in torch and the models: import it only when asked for.
    if name in ("Trainer", "TrainResult", "TrainingDiverged"):
        from src_training import trainer

        return getattr(trainer, name)
    if name == "TokenGridIndex":
        from src_training.data import TokenGridIndex

        return TokenGridIndex
    raise AttributeError(f"module 'src_training' has no attribute {name!r}")
