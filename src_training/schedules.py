"""Per-step schedules of learning rate, weight decay and teacher momentum (as DINO's utils.cosine_scheduler)."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """One value per training step: a linear warm-up, then a half cosine from ``base_value`` to ``final_value``.

    Identical to DINO's ``cosine_scheduler``: the warm-up covers ``warmup_epochs * steps_per_epoch`` steps
    from ``start_warmup_value`` to ``base_value`` (endpoints included), and the cosine part never quite
    reaches ``final_value`` (its last step is one step short of the end of the half period).
    """
    total = epochs * steps_per_epoch
    warmup_steps = min(warmup_epochs * steps_per_epoch, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps) if warmup_steps > 0 else np.array([])
    steps = np.arange(total - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """One teacher temperature per epoch: linear warm-up, then constant (DINOLoss.teacher_temp_schedule)."""
    warmup_epochs = min(warmup_epochs, epochs)
    return np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp)))


class Schedules:
    """The three per-step schedules of a run, indexed by the global step."""

    def __init__(self, optim, global_batch: int, steps_per_epoch: int):
        self.lr = cosine_schedule(
            optim.lr * global_batch / 256.0,  # linear scaling rule
            optim.min_lr,
            optim.epochs,
            steps_per_epoch,
            warmup_epochs=optim.warmup_epochs,
        )
        self.weight_decay = cosine_schedule(optim.weight_decay, optim.weight_decay_end, optim.epochs, steps_per_epoch)
        self.momentum = cosine_schedule(optim.momentum_teacher, 1.0, optim.epochs, steps_per_epoch)

    def __len__(self) -> int:
        return len(self.lr)
