"""Metric definitions (DESIGN.md table) on hand-built cases."""

from __future__ import annotations

import math

import pytest
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


def test_perturbation_sizes_match_their_definitions():
    from pipeline.metrics import perturbation_metrics, perturbation_sizes

    x = torch.full((2, 3, 16, 16), 0.5)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] = 0.75  # one value of 768 changed by 0.25
    x_adv[1] += 0.1  # every value changed by 0.1
    s = perturbation_sizes(x, x_adv)
    assert s["l0"].tolist() == pytest.approx([1 / 768, 1.0])
    assert s["linf"].tolist() == pytest.approx([0.25, 0.1])
    assert s["l2"].tolist() == pytest.approx([0.25, 0.1 * 768**0.5], rel=1e-5)
    assert s["l2_dissimilarity"][1].item() == pytest.approx(0.1 / 0.6, rel=1e-5)
    same = perturbation_metrics(x, x)
    assert same["l0"] == 0 and same["l2"] == 0 and same["ssim"] == pytest.approx(1.0) and same["n_images"] == 2
    with pytest.raises(ValueError, match="equal"):
        perturbation_sizes(x, x[:1])


def test_ssim_drops_with_noise():
    from pipeline.metrics import perturbation_sizes

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g)
    noise = torch.randn(1, 3, 32, 32, generator=g)
    small = perturbation_sizes(x, (x + 0.01 * noise).clamp(0, 1))["ssim"].item()
    large = perturbation_sizes(x, (x + 0.2 * noise).clamp(0, 1))["ssim"].item()
    assert 1.0 >= small > large


def test_test_order_prefixes_cover_all_classes():
    from pipeline.evaluation import test_order

    labels = torch.arange(10).repeat_interleave(100)  # stored sorted by class, as prepared
    order = test_order(len(labels), seed=0)
    assert sorted(order.tolist()) == list(range(1000))
    assert set(labels[order[:100]].tolist()) == set(range(10))
    assert torch.equal(order, test_order(1000, seed=0)) and not torch.equal(order, test_order(1000, seed=1))


def test_attack_cell_metrics_counts():
    from pipeline.evaluation import attack_cell_metrics

    labels = torch.tensor([0, 1, 2, 3])
    clean = torch.tensor([0, 1, 2, 0])  # 3 of 4 correct
    adv = torch.tensor([1, 1, 0, 0])  # two of the correct ones flipped
    sizes = {"l0": torch.tensor([0.1, 0.0, 0.3, 0.0])}
    m = attack_cell_metrics(clean, adv, labels, None, sizes)
    assert m["clean_accuracy"] == 0.75 and m["robust_accuracy"] == 0.25
    assert m["attack_success_rate"] == pytest.approx(2 / 3) and m["fooling_rate"] == 0.5
    assert m["l0"] == pytest.approx(0.1) and m["n_images"] == 4


def test_per_image_worst_counts_an_image_robust_only_if_no_attack_fools_it():
    """Two attacks that each fool different images: the worst case fools their union, on the
    images both attacked, with each image's sizes from the attack that fooled it."""
    from pipeline.evaluation import per_image_worst_metrics

    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    clean = torch.tensor([0, 1, 2, 3, 4, 0])  # 5 of the first 5 correct
    pgd = {"pred_clean": clean[:5], "pred_adv": torch.tensor([9, 1, 2, 3, 4]),
           "sizes": {"linf": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])}}
    aa = {"pred_clean": clean, "pred_adv": torch.tensor([9, 8, 8, 3, 4, 0]),
          "sizes": {"linf": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])}}
    m = per_image_worst_metrics({"pgd": pgd, "autoattack": aa}, labels)
    assert m["n_images"] == 5  # the images both attacks attacked
    assert m["robust_accuracy"] == pytest.approx(2 / 5)  # images 3 and 4 survive both
    assert m["robust_accuracy"] < min(0.8, 0.6)  # below either attack alone on the same images
    assert m["attack_success_rate"] == pytest.approx(3 / 5) and m["clean_accuracy"] == 1.0
    assert m["linf"] == pytest.approx((0.1 + 2.0 + 3.0 + 0.4 + 0.5) / 5)  # image 0: PGD, listed first, fooled it
    assert m["worst_attack"] == "autoattack" and m["attacks"] == "pgd,autoattack"
    with pytest.raises(ValueError, match="at least two"):
        per_image_worst_metrics({"pgd": pgd}, labels)


# --------------------------------------------------------------------------- mutation-testing additions

def test_fooling_rate_counts_changed_predictions_only():
    clean, adv = T([1, 2, 3, 4]), T([1, 9, 3, 4])  # one of four changed (not a symmetric 2 of 4)
    assert fooling_rate(clean, adv).value == 0.25


@pytest.mark.parametrize("call", [
    lambda a, b: clean_accuracy(a, b), lambda a, b: clean_accuracy(b, a),
    lambda a, b: robust_accuracy(a, b), lambda a, b: robust_accuracy(b, a),
    lambda a, b: fooling_rate(a, b), lambda a, b: fooling_rate(b, a),
    lambda a, b: attack_success_rate(a, b, b), lambda a, b: attack_success_rate(b, a, b),
    lambda a, b: attack_success_rate(b, b, a),
])
def test_every_argument_of_a_metric_is_checked(call):
    """Each argument position, given a wrong length, fails with the shapes in the message."""
    with pytest.raises(ValueError, match=r"1-D of equal length, got \[.*\(3,\).*\]"):
        call(T([0, 1, 2]), T([0, 1]))
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        call(T([[0], [1]]), T([0, 1]))


def test_wilson_interval_is_the_wilson_score_interval():
    from statistics import NormalDist

    from pipeline.metrics import wilson_interval

    def wilson(k, n, conf):  # Wilson (1927), written out
        z = NormalDist().inv_cdf(0.5 + conf / 2)
        centre = (k + z * z / 2) / (n + z * z)
        half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
        return centre - half, centre + half

    for k, n, conf in [(3, 10, 0.95), (0, 5, 0.95), (5, 5, 0.95), (1, 1, 0.95), (40, 100, 0.99), (40, 100, 0.5)]:
        assert wilson_interval(k, n, conf) == pytest.approx(wilson(k, n, conf), abs=1e-9)
    assert wilson_interval(40, 100) == pytest.approx(wilson(40, 100, 0.95), abs=1e-9)  # default 95 %
    lo, hi = wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)
    for k, n, conf in [(-1, 5, 0.95), (6, 5, 0.95), (2, 5, 0.0), (2, 5, 1.0), (2, 5, 1.5)]:
        with pytest.raises(ValueError, match=r"need 0 <= k <= n and a confidence in \(0, 1\)"):
            wilson_interval(k, n, conf)


def test_perturbation_metrics_pass_the_l0_tolerance():
    from pipeline.metrics import perturbation_metrics

    x = torch.full((1, 3, 8, 8), 0.5)
    x_adv = x + 1e-4
    assert perturbation_metrics(x, x_adv)["l0"] == 1.0  # above the default 1e-6
    assert perturbation_metrics(x, x_adv, atol=1e-3)["l0"] == 0.0


def test_ssim_global_is_eq8_of_seed_002_over_the_whole_image():
    """Eq. 8 with Eq. 9's unbiased covariance, computed here in NumPy from its definition;
    identical images give 1; the global form differs from the windowed SSIM."""
    import numpy as np

    from pipeline.metrics import perturbation_sizes, ssim_global

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    x_adv = (x + 0.1 * torch.randn(3, 3, 16, 16, generator=g)).clamp(0, 1)
    got = ssim_global(x, x_adv)
    for i in range(3):
        a, b = x[i].numpy().ravel().astype(np.float64), x_adv[i].numpy().ravel().astype(np.float64)
        n = a.size
        mu_a, mu_b = a.mean(), b.mean()
        s_ab = ((a - mu_a) * (b - mu_b)).sum() / (n - 1)
        c1, c2 = 0.01**2, 0.03**2
        want = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2) / ((mu_a**2 + mu_b**2 + c1) * (a.var(ddof=1) + b.var(ddof=1) + c2))
        assert float(got[i]) == pytest.approx(want, rel=1e-6)
    assert torch.allclose(ssim_global(x, x), torch.ones(3))
    sizes = perturbation_sizes(x, x_adv)
    assert torch.equal(sizes["ssim_global"], got) and not torch.allclose(sizes["ssim"], got, atol=1e-3)


def test_rate_interval_reads_a_rate_as_its_nearest_count():
    from pipeline.metrics import rate_interval, wilson_interval

    assert rate_interval(0.3, 40) == wilson_interval(12, 40)
    assert rate_interval(1 / 3, 9) == wilson_interval(3, 9)  # a float rate rounds to its count
    assert rate_interval(1.02, 40) == wilson_interval(40, 40)  # a count past n is clamped to n
    assert rate_interval(0.25, 40, 0.5) == wilson_interval(10, 40, 0.5)
    for rate, n in [(math.nan, 40), (0.5, 0)]:
        assert all(math.isnan(v) for v in rate_interval(rate, n))


def test_rate_text_shows_the_interval_and_the_seed_spread_only_where_the_entry_has_them():
    from pipeline.metrics import rate_text

    entry = {"robust_accuracy": 0.612, "robust_accuracy_ci_low": 0.591, "robust_accuracy_ci_high": 0.633,
             "robust_accuracy_std": 0.0105, "n_seeds": 3, "clean_accuracy": 0.9}
    assert rate_text(entry, "robust_accuracy") == "61.20 % [59.1, 63.3] ± 1.05"
    assert rate_text({**entry, "n_seeds": 1}, "robust_accuracy") == "61.20 % [59.1, 63.3]"  # one seed: no spread
    assert rate_text(entry, "clean_accuracy") == "90.00 %"
    assert rate_text({"x": math.nan}, "x") == "n/a"
    assert rate_text({}, "x") == ""


def test_paired_difference_interval_is_narrower_than_unpaired_and_exact_when_constant():
    """Per-item pairs that share most of their variation: the paired interval of the difference
    covers the true shift, excludes 0, and is narrower than the unpaired bootstrap of the same
    data; identical per-item differences give a zero-width interval; bad shapes fail."""
    import numpy as np
    from scipy.stats import bootstrap

    from pipeline.metrics import direction, paired_difference_interval

    g = torch.Generator().manual_seed(0)
    a = torch.rand(60, generator=g)
    b = (a - 0.1 + 0.05 * torch.randn(60, generator=g)).clamp(0, 1)
    d, low, high = paired_difference_interval(a, b)
    assert d == pytest.approx(float(a.mean() - b.mean()))
    assert 0 < low < d < high and direction(low, high) == "higher"
    unpaired = bootstrap((a.double().numpy(), b.double().numpy()), lambda u, v, axis: u.mean(axis) - v.mean(axis),
                         vectorized=True, n_resamples=9999, method="percentile", random_state=0).confidence_interval
    assert high - low < 0.5 * (unpaired.high - unpaired.low)
    assert paired_difference_interval(a, a) == (0.0, 0.0, 0.0)
    assert direction(-0.2, -0.1) == "lower" and direction(-0.1, 0.1) == "within noise"
    assert paired_difference_interval(a, b) == (d, low, high)  # seeded: reproducible
    with pytest.raises(ValueError, match="same"):
        paired_difference_interval(a, b[:10])
    assert np.isfinite(low)


def test_difference_text_prints_the_difference_with_its_interval_or_only_the_direction():
    from pipeline.metrics import difference_text

    entry = {"r_diff": 0.15, "r_diff_ci_low": 0.075, "r_diff_ci_high": 0.25, "r_vs_none": "higher"}
    assert difference_text(entry, "r") == "+0.150 [+0.075, +0.250] higher"
    assert difference_text({"r_vs_none": "within noise"}, "r") == "within noise"
    assert difference_text({}, "r") == ""


def test_versus_baseline_reads_a_direction_only_outside_the_noise():
    from pipeline.metrics import versus_baseline

    assert versus_baseline(0.5, 0.7, 0.1, 0.4) == "higher"
    assert versus_baseline(0.05, 0.2, 0.3, 0.5) == "lower"
    assert versus_baseline(0.2, 0.35, 0.3, 0.5) == "within noise"  # overlapping: no direction
    with pytest.raises(ValueError, match="low <= high"):
        versus_baseline(0.5, 0.4, 0.1, 0.2)


def test_paired_difference_interval_is_the_percentile_bootstrap_at_the_asked_confidence():
    """Against an independent paired percentile bootstrap (numpy, its own resamples): on
    skewed per-item differences, where scipy's default BCa interval lies visibly elsewhere,
    ours matches the percentile one at 95 % and at 90 %."""
    import numpy as np
    from scipy.stats import bootstrap

    from pipeline.metrics import paired_difference_interval

    rng = np.random.default_rng(3)
    x = np.clip(rng.exponential(1.0, 30) ** 2 / 10, 0, 1)
    y = np.zeros(30)
    idx = np.random.default_rng(123).integers(0, 30, (40_000, 30))
    resampled = x[idx].mean(1) - y[idx].mean(1)
    bca = bootstrap((x, y), lambda u, v, axis: u.mean(axis) - v.mean(axis), paired=True, vectorized=True,
                    n_resamples=9999, method="BCa", random_state=0).confidence_interval
    for confidence, tol in [(0.95, 0.004), (0.9, 0.004)]:
        want = np.percentile(resampled, [50 * (1 - confidence), 50 * (1 + confidence)])
        d, low, high = paired_difference_interval(torch.from_numpy(x), torch.from_numpy(y), confidence)
        assert d == pytest.approx(x.mean())
        assert low == pytest.approx(want[0], abs=tol) and high == pytest.approx(want[1], abs=tol)
    assert abs(bca.high - want[1]) > 5 * tol  # the data tell the two methods apart


def test_paired_difference_interval_boundaries():
    """Two items are enough; a 2-D input or a confidence outside (0, 1) fails with its reason."""
    from pipeline.metrics import paired_difference_interval

    d, low, high = paired_difference_interval(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert d == 0.5 and 0 <= low <= high <= 1
    with pytest.raises(ValueError, match="1-D"):
        paired_difference_interval(torch.zeros(2, 3), torch.zeros(2, 3))
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
            paired_difference_interval(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), confidence)


def test_interval_readers_at_their_boundaries():
    """An interval touching 0 has no direction; a zero-width interval is an interval; a rate
    of 0 is 0 items, one item is enough for an interval; the seed spread needs > 1 seed."""
    from pipeline.metrics import direction, rate_interval, rate_text, versus_baseline, wilson_interval

    assert direction(0.0, 0.2) == "within noise" and direction(-0.2, 0.0) == "within noise"
    assert versus_baseline(0.3, 0.3, 0.1, 0.2) == "higher" and versus_baseline(0.3, 0.4, 0.1, 0.1) == "higher"
    assert rate_interval(0.0, 10) == wilson_interval(0, 10) and rate_interval(0.0, 10)[0] == 0.0
    assert rate_interval(1.0, 1) == wilson_interval(1, 1)
    entry = {"r": 0.5, "r_std": 0.01}
    assert rate_text(entry, "r") == "50.00 %"  # no n_seeds: one seed, no spread
    assert rate_text({**entry, "n_seeds": 2}, "r") == "50.00 % ± 1.00"
