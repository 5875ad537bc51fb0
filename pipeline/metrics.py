"""Robustness metrics, one definition each (DESIGN.md, metric definitions).

All take integer class predictions and labels as 1-D int64 tensors of equal
length N (any device) and return a :class:`Metric`: a fraction in [0, 1] and
the number of images it counts over. A metric over zero images is NaN.

| name | over which images | counts |
| --- | --- | --- |
| clean_accuracy | all | pred_clean == label |
| robust_accuracy | all; targeted: label != target | pred_adv == label |
| attack_success_rate, untargeted | pred_clean == label | pred_adv != label |
| attack_success_rate, targeted | label != target | pred_adv == target |
| fooling_rate | all | pred_adv != pred_clean |

:func:`perturbation_metrics` measures the perturbation itself (L0, L2, L-inf,
L2 dissimilarity, SSIM) on the images, for the per-image attacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Metric:
    """A fraction in [0, 1] (NaN over no images) and its denominator."""

    value: float
    n_images: int

    @staticmethod
    def of(hits: torch.Tensor, over: torch.Tensor) -> Metric:
        """``sum(hits & over) / sum(over)`` for boolean tensors (N,)."""
        n = int(over.sum())
        return Metric(float((hits & over).sum()) / n if n else math.nan, n)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k / n`` (Wilson 1927), from SciPy's
    ``binomtest(k, n).proportion_ci(method="wilson")``: what a rate over ``n`` images can be
    told apart from. ``(nan, nan)`` over no images.

    Raises:
        ValueError: ``k`` outside [0, n] or ``confidence`` outside (0, 1).
    """
    if n == 0:
        return math.nan, math.nan
    if not 0 <= k <= n or not 0 < confidence < 1:
        raise ValueError(f"need 0 <= k <= n and a confidence in (0, 1), got k={k}, n={n}, {confidence}")
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def rate_interval(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """:func:`wilson_interval` of a rate measured over ``n`` items (images, victims), read as
    ``round(rate * n)`` of ``n`` (clamped to [0, n]): for rates already reduced to a fraction,
    or averaged over seeds or targets that share the same items. ``(nan, nan)`` over no items
    or for a NaN rate.

    Raises:
        ValueError: ``confidence`` outside (0, 1).
    """
    if n == 0 or math.isnan(rate):
        return math.nan, math.nan
    return wilson_interval(min(n, max(0, round(rate * n))), n, confidence)


def rate_text(entry: dict, key: str) -> str:
    """A rate of a metrics entry as the tables print it: ``61.20 % [59.1, 63.3] ± 1.05``, the
    rate in percent, its 95 % interval where the entry has ``<key>_ci_low``/``<key>_ci_high``
    (fractions) and, where it was averaged over several seeds (``n_seeds`` > 1), the standard
    deviation over seeds ``<key>_std`` in points. ``"n/a"`` for a NaN rate, ``""`` for a
    missing one.
    """
    v = entry.get(key)
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    text = f"{100 * v:.2f} %"
    low = entry.get(f"{key}_ci_low")
    if low is not None and not math.isnan(low):
        text += f" [{100 * low:.1f}, {100 * entry[f'{key}_ci_high']:.1f}]"
    std = entry.get(f"{key}_std")
    if std is not None and not math.isnan(std) and entry.get("n_seeds", 1) > 1:
        text += f" ± {100 * std:.2f}"
    return text


def paired_difference_interval(
    a: torch.Tensor, b: torch.Tensor, confidence: float = 0.95, n_resamples: int = 9999, seed: int = 0
) -> tuple[float, float, float]:
    """The difference of two rates measured on the same items, ``mean(a) - mean(b)``, with a
    paired percentile bootstrap interval over the items (Efron and Tibshirani, "An
    Introduction to the Bootstrap", 1993, Section 13; ``scipy.stats.bootstrap`` with
    ``paired=True``): the items (victims, images) are resampled together, so what both rates
    share (an easy or a hard item) cancels, and the interval is narrower than two
    independent intervals would give.

    Args:
        a, b: float (N,) per-item values in [0, 1] (e.g. the fraction of stickers that fool
            each victim), the same N items in the same order.
        confidence: in (0, 1).
        n_resamples: bootstrap resamples; ``seed``: their random state (reproducible).

    Returns:
        ``(difference, low, high)``; ``(d, d, d)`` when every item's difference is the same.

    Raises:
        ValueError: shapes differ, fewer than 2 items, or ``confidence`` outside (0, 1).
    """
    from scipy.stats import bootstrap

    if a.shape != b.shape or a.dim() != 1 or len(a) < 2:
        raise ValueError(f"paired_difference_interval needs two 1-D tensors of the same >= 2 items, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
    d = float(x.mean() - y.mean())
    if (x - y == (x - y)[0]).all():
        return d, d, d
    res = bootstrap((x, y), lambda u, v, axis: u.mean(axis) - v.mean(axis), paired=True, vectorized=True,
                    confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                    random_state=seed)
    return d, float(res.confidence_interval.low), float(res.confidence_interval.high)


def direction(low: float, high: float) -> str:
    """``"higher"`` when an interval of a difference lies above 0, ``"lower"`` below it, else
    ``"within noise"``."""
    return "higher" if low > 0 else "lower" if high < 0 else "within noise"


def difference_text(entry: dict, key: str) -> str:
    """A rate's difference from its baseline as the tables print it: ``+0.150 [+0.075,
    +0.250] higher``, from the entry's ``<key>_diff``, ``<key>_diff_ci_low``/``_high`` and
    ``<key>_vs_none`` (the direction, :func:`direction`); only the direction where the entry
    has no difference, ``""`` where it has neither."""
    if f"{key}_diff" not in entry:
        return entry.get(f"{key}_vs_none", "")
    return (f"{entry[f'{key}_diff']:+.3f} [{entry[f'{key}_diff_ci_low']:+.3f}, "
            f"{entry[f'{key}_diff_ci_high']:+.3f}] {entry[f'{key}_vs_none']}")


def versus_baseline(low: float, high: float, base_low: float, base_high: float) -> str:
    """Whether a rate differs from a baseline's beyond sampling noise, from their 95 %
    intervals (e.g. :func:`wilson_interval`): ``"higher"`` or ``"lower"`` when the two
    intervals do not overlap, else ``"within noise"``. Conservative: two non-overlapping
    95 % intervals imply a difference at better than the 5 % level, while overlapping ones
    may still hide a small real difference (Schenker and Gentleman, Am. Stat. 2001).

    Raises:
        ValueError: an interval with ``low > high``.
    """
    if low > high or base_low > base_high:
        raise ValueError(f"versus_baseline: intervals need low <= high, got [{low}, {high}], [{base_low}, {base_high}]")
    return direction(low - base_high, high - base_low)  # above 0: no overlap, this one higher


def _check(*tensors: torch.Tensor) -> None:
    n = tensors[0].shape
    for t in tensors:
        if t.ndim != 1 or t.shape != n:
            raise ValueError(f"predictions and labels must be 1-D of equal length, got {[tuple(t.shape) for t in tensors]}")


def clean_accuracy(pred_clean: torch.Tensor, labels: torch.Tensor) -> Metric:
    """Fraction of all images classified correctly when clean."""
    _check(pred_clean, labels)
    return Metric.of(pred_clean == labels, torch.ones_like(labels, dtype=torch.bool))


def robust_accuracy(pred_adv: torch.Tensor, labels: torch.Tensor, target: int | None = None) -> Metric:
    """Accuracy under attack; for a targeted attack, over images whose label is not the target."""
    _check(pred_adv, labels)
    over = torch.ones_like(labels, dtype=torch.bool) if target is None else labels != target
    return Metric.of(pred_adv == labels, over)


def attack_success_rate(
    pred_clean: torch.Tensor, pred_adv: torch.Tensor, labels: torch.Tensor, target: int | None = None
) -> Metric:
    """Untargeted: fraction of the correctly classified images that the attack
    makes wrong. Targeted: fraction of images not of the target class that the
    attack makes classified as the target."""
    _check(pred_clean, pred_adv, labels)
    if target is None:
        return Metric.of(pred_adv != labels, pred_clean == labels)
    return Metric.of(pred_adv == target, labels != target)


def fooling_rate(pred_clean: torch.Tensor, pred_adv: torch.Tensor) -> Metric:
    """Fraction of all images whose prediction the attack changes (BlurNet's
    "attack success rate"; Moosavi-Dezfooli et al.'s fooling rate)."""
    _check(pred_clean, pred_adv)
    return Metric.of(pred_adv != pred_clean, torch.ones_like(pred_clean, dtype=torch.bool))


def perturbation_sizes(x: torch.Tensor, x_adv: torch.Tensor, atol: float = 1e-6) -> dict[str, torch.Tensor]:
    """Size of a perturbation, per image (Carlini et al. 2019 report these beside accuracy).

    Args:
        x: clean images, float (N, C, H, W) in [0, 1].
        x_adv: adversarial images, same shape, in [0, 1].
        atol: a value counts as changed (L0) when ``|x_adv - x| > atol``.

    Returns:
        float32 (N,) tensors on ``x``'s device:

        * ``l0``: fraction of the image's input values (C x H x W entries, not
          pixels) changed, in [0, 1] (seed 002 reports it as a percentage);
        * ``l2``: ``||x_adv - x||_2`` over C x H x W, pixel units of [0, 1];
        * ``linf``: ``max |x_adv - x|``, pixel units of [0, 1];
        * ``l2_dissimilarity``: ``||x - x_adv||_2 / ||x_adv||_2`` (BlurNet,
          after Eykholt et al. 2018);
        * ``ssim``: structural similarity (Wang et al. 2004) of ``x_adv`` to
          ``x``, Gaussian 11x11 window, data range 1, from torchmetrics (the
          usual windowed SSIM, averaged over windows);
        * ``ssim_global``: the global SSIM of seed 002 (Yu 2022, Eq. 8 and 9):
          one window, the whole image's C x H x W values; see :func:`ssim_global`.

    Raises:
        ValueError: shapes differ or are not 4-D, or there are no images.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if x.shape != x_adv.shape or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"expected two equal non-empty (N, C, H, W) batches, got {tuple(x.shape)}, {tuple(x_adv.shape)}")
    x, x_adv = x.float(), x_adv.float()
    delta = (x_adv - x).flatten(1)
    l2 = delta.norm(dim=1)
    ssim = structural_similarity_index_measure(x_adv, x, data_range=1.0, reduction="none")
    return {
        "l0": (delta.abs() > atol).float().mean(dim=1),
        "l2": l2,
        "linf": delta.abs().amax(dim=1),
        "l2_dissimilarity": l2 / x_adv.flatten(1).norm(dim=1).clamp_min(1e-12),
        "ssim": ssim.float(),
        "ssim_global": ssim_global(x, x_adv),
    }


def ssim_global(x: torch.Tensor, x_adv: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Global SSIM of seed 002 (Yu 2022, Eq. 8, with Eq. 9's covariance), per image:

    ``(2 mu_x mu_a + C1)(2 s_xa + C2) / ((mu_x^2 + mu_a^2 + C1)(s_x^2 + s_a^2 + C2))``

    with means, variances and covariance over all C x H x W values of an image (one
    window, not the sliding windows of Wang et al. 2004), unbiased (``N - 1``, Eq. 9),
    and the usual constants ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` (the paper does not
    give them), ``L = data_range``.

    Args:
        x, x_adv: float (N, C, H, W) in [0, data_range], same shape.
        data_range: ``L``, 1 for images in [0, 1].

    Returns:
        float32 (N,) on ``x``'s device; 1 for identical images.
    """
    a, b = x.flatten(1).double(), x_adv.flatten(1).double()
    mu_a, mu_b = a.mean(dim=1), b.mean(dim=1)
    var_a, var_b = a.var(dim=1, unbiased=True), b.var(dim=1, unbiased=True)
    cov = ((a - mu_a[:, None]) * (b - mu_b[:, None])).sum(dim=1) / (a.shape[1] - 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return out.float()


def perturbation_metrics(x: torch.Tensor, x_adv: torch.Tensor, atol: float = 1e-6) -> dict[str, float]:
    """Means over the N images of :func:`perturbation_sizes`, plus ``n_images``.

    Raises:
        ValueError: as :func:`perturbation_sizes`.
    """
    sizes = perturbation_sizes(x, x_adv, atol)
    return {**{k: float(v.mean()) for k, v in sizes.items()}, "n_images": len(x)}
