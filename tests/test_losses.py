"""The SLPD loss terms against values worked out by hand on 3-class toy outputs.

Notation: D = 3 classes, tau_s = 0.1 (student), tau_t = 0.04 (teacher). Student logits are written as
tau_s * ln(P) so that softmax(logits / tau_s) = P exactly; teacher logits tau_t * ln(Q) give softmax = Q.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from src_training.head import DINOHead, MultiCropWrapper, WeightNormLinear
from src_training.losses import DINOLoss, PrototypeDistillLoss, pairwise_cross_entropy
from src_training.schedules import cosine_schedule, teacher_temperature_schedule

TAU_S, TAU_T = 0.1, 0.04
LN2, LN4 = math.log(2), math.log(4)
P_A = [1 / 2, 1 / 4, 1 / 4]
P_B = [1 / 4, 1 / 2, 1 / 4]
P_C = [1 / 4, 1 / 4, 1 / 2]


def student(*dists) -> torch.Tensor:
    """View-major student logits, one row per view (batch of 1)."""
    return TAU_S * torch.log(torch.tensor(dists, dtype=torch.float64)).float()


def teacher_onehot(*classes, margin: float = 2.0) -> torch.Tensor:
    """Teacher logits whose sharpened softmax is one-hot to ~1e-21 (exp(-margin / tau_t))."""
    rows = torch.zeros(len(classes), 3)
    for i, c in enumerate(classes):
        rows[i, c] = margin
    return rows


def test_student_uniform_gives_log_d_whatever_the_teacher():
    loss = DINOLoss(3, n_student_views=3, n_teacher_views=2)
    value = loss(torch.zeros(3, 3), torch.randn(2, 3), epoch=0)
    assert value.item() == pytest.approx(math.log(3), abs=1e-6)


def test_same_view_pairs_are_skipped():
    # teacher view 0 -> class 0, view 1 -> class 1; student views A, B (global) and C (local).
    # Pairs used: (t0,sB) (t0,sC) (t1,sA) (t1,sC), each -ln(1/4) = ln 4. The skipped pairs (t0,sA), (t1,sB)
    # would each cost ln 2, so including them would give (4 ln4 + 2 ln2) / 6.
    loss = DINOLoss(3, n_student_views=3, n_teacher_views=2)
    value = loss(student(P_A, P_B, P_C), teacher_onehot(0, 1), epoch=0)
    assert value.item() == pytest.approx(LN4, abs=1e-5)
    assert value.item() != pytest.approx((4 * LN4 + 2 * LN2) / 6, abs=1e-3)


def test_temperatures_are_applied():
    # Teacher Q = P_A exactly at tau_t = 0.04; the student sees P_A on its only other view (a local one).
    # H(Q, P_A) = -(1/2 ln 1/2 + 1/4 ln 1/4 + 1/4 ln 1/4) = 1.5 ln 2.
    teacher_logits = TAU_T * torch.log(torch.tensor([P_A, P_A]))
    loss = DINOLoss(3, n_student_views=3, n_teacher_views=2, teacher_temps=TAU_T, student_temp=TAU_S)
    value = loss(student(P_B, P_B, P_A), teacher_logits, epoch=0)
    # pairs: (t0,sB) (t0,sA_local) (t1,sB_global0) (t1,sA_local)
    h_ab = -(0.5 * math.log(1 / 4) + 0.25 * math.log(1 / 2) + 0.25 * math.log(1 / 4))
    h_aa = 1.5 * LN2
    assert value.item() == pytest.approx((h_ab + h_aa + h_ab + h_aa) / 4, abs=1e-5)
    # With twice the teacher temperature the targets are flatter: Q ∝ sqrt(P_A) -> another value.
    hotter = DINOLoss(3, 3, 2, teacher_temps=2 * TAU_T)(student(P_B, P_B, P_A), teacher_logits, epoch=0)
    q = np.sqrt(P_A) / np.sqrt(P_A).sum()
    h = lambda p: -(q * np.log(p)).sum()  # noqa: E731
    assert hotter.item() == pytest.approx((2 * h(np.array(P_B)) + 2 * h(np.array(P_A))) / 4, abs=1e-5)


def test_centering_subtracts_the_center_before_sharpening():
    # center [0, 0, 2] cancels teacher logits [0, 0, 2]: the target is uniform, so against P_C
    # H = -(1/3)(ln 1/4 + ln 1/4 + ln 1/2) = (5/3) ln 2 on every pair.
    loss = DINOLoss(3, n_student_views=3, n_teacher_views=2)
    loss.center.copy_(torch.tensor([[0.0, 0.0, 2.0]]))
    value = loss(student(P_C, P_C, P_C), teacher_onehot(2, 2), epoch=0)
    assert value.item() == pytest.approx(5 / 3 * LN2, abs=1e-5)


def test_center_update_is_an_ema_of_the_teacher_mean():
    loss = DINOLoss(3, n_student_views=2, n_teacher_views=2, center_momentum=0.9)
    loss.center.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    teacher_logits = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 4.0]])
    loss(torch.zeros(2, 3), teacher_logits, epoch=0)
    # 0.9 * [1, 0, 0] + 0.1 * mean([0,2,0], [0,0,4]) = [0.9, 0.1, 0.2]
    assert torch.allclose(loss.center, torch.tensor([[0.9, 0.1, 0.2]]), atol=1e-6)


def test_loss_uses_the_center_before_this_batch():
    loss = DINOLoss(3, n_student_views=3, n_teacher_views=2)
    first = loss(student(P_A, P_B, P_C), teacher_onehot(0, 1), epoch=0)  # center was 0: as in the skip test
    assert first.item() == pytest.approx(LN4, abs=1e-5)
    assert loss.center.abs().sum() > 0


def test_teacher_temperature_schedule_per_epoch():
    temps = teacher_temperature_schedule(0.02, 0.04, warmup_epochs=3, epochs=5)
    assert temps.tolist() == pytest.approx([0.02, 0.03, 0.04, 0.04, 0.04])
    loss = DINOLoss(3, 3, 2, teacher_temps=temps)
    assert loss.teacher_temp(0) == pytest.approx(0.02)
    assert loss.teacher_temp(10) == pytest.approx(0.04)  # past the end: the last value


def test_prototype_loss_official_quirk_drops_the_first_global_view():
    # One prototype target (one-hot on class 0), student views A (global 0), B (global 1), C (local).
    # Official rule (target index 0 == view index 0 skipped): mean(-ln P_B[0], -ln P_C[0]) = ln 4.
    # Without the quirk all three views count: (ln 2 + ln 4 + ln 4) / 3.
    quirk = PrototypeDistillLoss(3, n_student_views=3, official_view_skip=True)
    plain = PrototypeDistillLoss(3, n_student_views=3, official_view_skip=False)
    s = student(P_A, P_B, P_C)
    assert quirk(s, teacher_onehot(0), epoch=0).item() == pytest.approx(LN4, abs=1e-5)
    assert plain(s, teacher_onehot(0), epoch=0).item() == pytest.approx((LN2 + 2 * LN4) / 3, abs=1e-5)


def test_prototype_loss_with_two_neighbour_targets_skips_by_target_index():
    # r = 2 inter targets: target 0 (class 0) skips student view 0, target 1 (class 1) skips view 1,
    # exactly as the official loss compares teacher chunk iq with student view iq.
    loss = PrototypeDistillLoss(3, n_student_views=3, official_view_skip=True)
    value = loss(student(P_A, P_B, P_C), teacher_onehot(0, 1), epoch=0, n_targets=2)
    # pairs: (t0,B) = ln4, (t0,C) = ln4, (t1,A) = ln4, (t1,C) = ln4
    assert value.item() == pytest.approx(LN4, abs=1e-5)


def test_prototype_loss_averages_over_rows_and_has_its_own_center():
    # Two regions (rows); region 0 target class 0, region 1 target class 1; both students see P_A on all views.
    # Row 0: -ln P_A[0] = ln 2 on each pair; row 1: -ln P_A[1] = ln 4. Mean = (ln2 + ln4) / 2.
    intra = PrototypeDistillLoss(3, n_student_views=2, official_view_skip=False)
    inter = PrototypeDistillLoss(3, n_student_views=2, official_view_skip=False)
    s = student(P_A, P_A, P_A, P_A)  # view-major: [view0 row0, view0 row1, view1 row0, view1 row1]
    value = intra(s, teacher_onehot(0, 1), epoch=0, n_targets=1)
    assert value.item() == pytest.approx((LN2 + LN4) / 2, abs=1e-5)
    assert intra.center.abs().sum() > 0 and inter.center.abs().sum() == 0


def test_prototype_loss_without_rows_is_zero_and_keeps_the_center():
    loss = PrototypeDistillLoss(3, n_student_views=3)
    loss.center.fill_(0.5)
    s = torch.zeros(0, 3, requires_grad=True)
    value = loss(s, torch.zeros(0, 3), epoch=0)
    assert value.item() == 0.0
    value.backward()  # still part of the graph
    assert torch.all(loss.center == 0.5)


def test_pairwise_cross_entropy_counts_pairs():
    s = [torch.zeros(1, 3)] * 4
    q = [torch.full((1, 3), 1 / 3)] * 2
    _, n_skip = pairwise_cross_entropy(s, q, 0.1, skip_same_index=True)
    _, n_all = pairwise_cross_entropy(s, q, 0.1, skip_same_index=False)
    assert (n_skip, n_all) == (6, 8)


def test_gradients_flow_to_the_student_only():
    s = student(P_A, P_B, P_C).requires_grad_(True)
    t = teacher_onehot(0, 1).requires_grad_(True)
    DINOLoss(3, 3, 2)(s, t, epoch=0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_weight_norm_linear_matches_torch_weight_norm_and_official_keys():
    torch.manual_seed(0)
    ours = WeightNormLinear(8, 5, fix_norm=True)
    ref = torch.nn.Linear(8, 5, bias=False)
    ref.weight.data.copy_(ours.weight_v.data)
    x = torch.randn(4, 8)
    expected = torch.nn.functional.normalize(ref.weight, dim=1) @ x.T
    assert torch.allclose(ours(x), expected.T, atol=1e-6)
    assert set(ours.state_dict()) == {"weight_g", "weight_v"}
    assert not ours.weight_g.requires_grad


def test_head_outputs_and_prototype_path():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    logits, z = head(torch.randn(5, 16))
    assert logits.shape == (5, 32) and z.shape == (5, 8)
    assert torch.allclose(z.norm(dim=1), torch.ones(5), atol=1e-5)
    # a prototype given unnormalized gets the same logits as its normalized version
    assert torch.allclose(head.forward_last_layer(3 * z), logits, atol=1e-5)
    keys = set(MultiCropWrapper(torch.nn.Identity(), head).state_dict())
    assert "head.last_layer.weight_g" in keys and "head.mlp.0.weight" in keys


def test_multicrop_wrapper_groups_views_by_size():
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(-2, -1))

    wrapper = MultiCropWrapper(Recorder(), DINOHead(4, out_dim=6, hidden_dim=8, bottleneck_dim=3))
    views = [torch.randn(2, 4, 6, 6)] * 2 + [torch.randn(2, 4, 3, 3)] * 3
    logits, _ = wrapper(views)
    assert calls == [(4, 4, 6, 6), (6, 4, 3, 3)]
    assert logits.shape == (10, 6)


def test_cosine_schedule_like_dino():
    sched = cosine_schedule(1.0, 0.0, epochs=4, steps_per_epoch=5, warmup_epochs=1)
    assert len(sched) == 20
    assert sched[:5].tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert sched[5] == pytest.approx(1.0)  # the cosine part starts at the peak
    assert np.all(np.diff(sched[5:]) < 0) and sched[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 15)))
    momentum = cosine_schedule(0.996, 1.0, epochs=2, steps_per_epoch=3)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] < 1.0 and np.all(np.diff(momentum) > 0)
