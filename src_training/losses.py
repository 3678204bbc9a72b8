"""The SLPD loss terms: DINO self-distillation and the intra-/inter-slide prototype distillation.

All three are the DINO cross-entropy H(t, s) = sum_d -softmax((t - c) / tau_t)_d * log_softmax(s / tau_s)_d,
averaged over rows and over the (teacher target, student view) pairs, with a center c that is an EMA of the
mean teacher output, summed over all processes (SPEC section 2; Carboxy/SLPD ``losses.py``).

Official quirk, kept by default and switchable (``official_view_skip``): DINO skips the pairs in which the
teacher and the student see the same view, i.e. teacher chunk ``iq`` is not compared with student view
``iq``. The official prototype loss reuses that rule although a prototype target is no view of the region,
so for prototype target 0 the student's first global view is dropped and 9 of the 10 views are used. With
``official_view_skip=False`` every prototype target is compared with all student views.

Distributed weighting (our design): the DINO loss has the same number of rows on every process, so the
gradient average of DDP already equals the global mean. The prototype losses only use regions of slides
that have prototypes, so their row count differs between processes; each process therefore divides its row
sum by the *global* row count and multiplies by the world size, which makes DDP's gradient average the exact
mean over the global batch (the official code averages per process, which over-weights the regions of a
process with few eligible regions). The returned value of each loss is the process's share; an all-reduce
sum divided by the world size gives the global value (the trainer does that for logging).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from src_training import distributed


def pairwise_cross_entropy(
    student_chunks: list[torch.Tensor] | tuple[torch.Tensor, ...],
    teacher_probs_chunks: list[torch.Tensor] | tuple[torch.Tensor, ...],
    student_temp: float,
    skip_same_index: bool,
) -> tuple[torch.Tensor, int]:
    """(sum over pairs of the row-summed cross-entropy, number of pairs).

    ``student_chunks[v]`` are raw logits of student view v [B, D]; ``teacher_probs_chunks[i]`` are teacher
    probabilities [B, D] (already centered, sharpened and detached). Pair (i, v) is skipped when
    ``skip_same_index`` and i == v.
    """
    total = None
    n_pairs = 0
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student_chunks]
    for i, q in enumerate(teacher_probs_chunks):
        for v, log_p in enumerate(log_probs):
            if skip_same_index and v == i:
                continue
            term = torch.sum(-q * log_p, dim=-1).sum()
            total = term if total is None else total + term
            n_pairs += 1
    if total is None:
        raise ValueError("no (teacher, student) pair is left to compare")
    return total, n_pairs


class _CenteredTargetLoss(nn.Module):
    """Shared machinery: a center buffer, its all-reduced EMA update and the teacher temperature schedule."""

    def __init__(self, out_dim: int, teacher_temps: np.ndarray, student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.teacher_temps = np.asarray(teacher_temps, dtype=np.float64)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])

    def _sharpen(self, teacher_logits: torch.Tensor, epoch: int) -> torch.Tensor:
        probs = F.softmax((teacher_logits.float() - self.center) / self.teacher_temp(epoch), dim=-1).detach()
        # Mean entropy of the targets (nats), for the event stream: the cross-entropy this loss reports is this
        # entropy plus KL(target || student), and only the KL part is what the student can lower.
        self.target_entropy = (-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
                               if probs.numel() else probs.new_zeros(()))
        return probs

    @torch.no_grad()
    def _global_sum_and_count(self, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Sum of the teacher rows and their number over all processes, in one all-reduce."""
        stats = torch.cat(
            [teacher_logits.detach().float().sum(dim=0), teacher_logits.new_tensor([teacher_logits.shape[0]]).float()]
        )
        distributed.all_reduce_sum(stats)
        return stats[:-1].unsqueeze(0), float(stats[-1].item())

    @torch.no_grad()
    def _update_center(self, row_sum: torch.Tensor, count: float) -> None:
        if count <= 0:
            return  # nothing seen anywhere this step: keep the center
        batch_center = row_sum / count
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


class DINOLoss(_CenteredTargetLoss):
    """DINO loss between all student views and the teacher's global views, same-view pairs skipped.

    ``student_logits`` is [n_student_views * B, D] and ``teacher_logits`` [n_teacher_views * B, D], both
    view-major (all rows of view 0 first), as the multi-crop wrapper returns them.
    """

    def __init__(
        self,
        out_dim: int,
        n_student_views: int,
        n_teacher_views: int = 2,
        teacher_temps: np.ndarray | float = 0.04,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__(out_dim, np.atleast_1d(teacher_temps), student_temp, center_momentum)
        self.n_student_views = n_student_views
        self.n_teacher_views = n_teacher_views

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, epoch: int) -> torch.Tensor:
        student_chunks = student_logits.float().chunk(self.n_student_views)
        teacher_chunks = self._sharpen(teacher_logits, epoch).chunk(self.n_teacher_views)
        total, n_pairs = pairwise_cross_entropy(student_chunks, teacher_chunks, self.student_temp, True)
        rows = student_chunks[0].shape[0]
        loss = total / (n_pairs * rows)
        row_sum, count = self._global_sum_and_count(teacher_logits)
        self._update_center(row_sum, count)
        return loss


class PrototypeDistillLoss(_CenteredTargetLoss):
    """Prototype distillation (intra- or inter-slide): prototype targets through the teacher's last layer.

    ``student_logits`` [n_student_views * B, D] holds only the rows of eligible regions (view-major), and
    ``target_logits`` [n_targets * B, D] the prototype targets of the same regions (target-major: for the
    inter-slide loss one chunk per neighbour). Returns this process's share of the loss (module docstring).
    Every process must call it at every step where the loss is active, even with zero rows, because the row
    count and the center are all-reduced.
    """

    def __init__(
        self,
        out_dim: int,
        n_student_views: int,
        teacher_temps: np.ndarray | float = 0.04,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        official_view_skip: bool = True,
    ):
        super().__init__(out_dim, np.atleast_1d(teacher_temps), student_temp, center_momentum)
        self.n_student_views = n_student_views
        self.official_view_skip = official_view_skip

    def forward(
        self, student_logits: torch.Tensor, target_logits: torch.Tensor, epoch: int, n_targets: int = 1
    ) -> torch.Tensor:
        row_sum, global_rows = self._global_sum_and_count(target_logits)
        global_rows /= n_targets
        local_rows = target_logits.shape[0] // n_targets
        if local_rows == 0 or global_rows == 0:
            # Keep the graph connected so that backward and DDP see the same parameters on every process.
            loss = student_logits.float().sum() * 0.0
            self.target_entropy = student_logits.new_zeros((), dtype=torch.float32)
        else:
            student_chunks = student_logits.float().chunk(self.n_student_views)
            teacher_chunks = self._sharpen(target_logits, epoch).chunk(n_targets)
            total, n_pairs = pairwise_cross_entropy(
                student_chunks, teacher_chunks, self.student_temp, self.official_view_skip
            )
            loss = total / (n_pairs * global_rows) * distributed.world_size()
        self._update_center(row_sum, global_rows * n_targets)
        return loss
