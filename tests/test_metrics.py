"""Metric definitions (DESIGN.md table) on hand-built cases."""

from __future__ import annotations

import math

import torch

from pipeline.evaluation import cell_metrics
from pipeline.metrics import attack_success_rate, clean_accuracy, fooling_rate, robust_accuracy

T = torch.tensor


def test_untargeted_success_counts_only_originally_correct_images():
    labels = T([0, 1, 2, 3])
    clean = T([0, 1, 0, 3])  # image 2 already wrong
    adv = T([5, 1, 1, 0])
    asr = attack_success_rate(clean, adv, labels)
    assert asr.n_images == 3 and asr.value == 2 / 3  # images 0 and 3 flipped, image 1 held
    assert clean_accuracy(clean, labels).value == 3 / 4
    assert robust_accuracy(adv, labels).value == 1 / 4


def test_targeted_metrics_leave_out_the_target_class():
    labels = T([5, 5, 1, 2, 3])
    clean = T([5, 5, 1, 0, 3])
    adv = T([5, 5, 5, 5, 3])
    asr = attack_success_rate(clean, adv, labels, target=5)
    assert asr.n_images == 3 and asr.value == 2 / 3  # images 2, 3 -> target; the wrong clean one counts too
    ra = robust_accuracy(adv, labels, target=5)
    assert ra.n_images == 3 and ra.value == 1 / 3


def test_fooling_rate_is_change_of_prediction_not_of_correctness():
    clean = T([1, 2, 3, 4])
    adv = T([1, 9, 3, 0])
    assert fooling_rate(clean, adv).value == 0.5 and fooling_rate(clean, adv).n_images == 4


def test_empty_denominator_is_nan():
    labels = T([5, 5])
    m = attack_success_rate(labels, labels, labels, target=5)
    assert m.n_images == 0 and math.isnan(m.value)


def test_cell_metrics_mean_and_spread_over_seeds():
    labels = T([0, 1, 2, 3])
    clean = labels.clone()
    adv = torch.stack([T([[0, 1, 2, 3]]), T([[9, 9, 2, 3]])])  # seed 0 harmless, seed 1 flips two
    m = cell_metrics(clean, adv, labels, target=None)
    assert m["robust_accuracy"] == 0.75 and m["attack_success_rate"] == 0.25
    assert math.isclose(m["robust_accuracy_std"], math.sqrt(0.125))  # sample std of {1.0, 0.5}
    assert m["n_seeds"] == 2 and m["placements"] == 1 and m["n_images"] == 4


def test_cell_metrics_pools_placements():
    labels = T([0, 1])
    adv = T([[[0, 1], [7, 1]]])  # one seed, two placements; one flip out of four cases
    m = cell_metrics(labels, adv, labels, target=None)
    assert m["robust_accuracy"] == 0.75 and m["placements"] == 2 and m["n_images"] == 2
