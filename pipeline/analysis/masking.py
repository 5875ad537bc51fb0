"""Gradient-masking sanity checks of one model (Carlini et al., "On Evaluating
Adversarial Robustness", 2019, Section 5; Athalye, Carlini and Wagner, "Obfuscated
Gradients Give a False Sense of Security", ICML 2018, Section 3).

A defense that only hides its gradients (shattered, stochastic, vanishing or exploding
gradients) looks robust to gradient attacks while it is not. Each check compares two
attacks that should be ordered if the gradients are informative, on the same
``n`` test images, L-inf budget ``eps`` (8/255 by default):

* **(a) white box not weaker than transfer**: robust accuracy under white-box PGD on
  the model (per image, the worst case of PGD-``pgd_steps`` and PGD-``strong_steps``
  x ``strong_restarts``) <= robust accuracy under PGD-``pgd_steps`` examples made on
  the undefended baseline and transferred. ``n/a`` for the baseline itself.
* **(b) accuracy falls to ~0 as eps grows**: robust accuracy under PGD-``pgd_steps``
  is non-increasing over ``eps_list`` (0 is the clean accuracy; the step scales with
  eps, ``step_size / eps`` kept) and at the largest eps (64/255 by default) it is at
  most ``max_robust`` (5 %).
* **(c) more iterations do not help the defense**: PGD-``strong_steps`` with
  ``strong_restarts`` restarts (an image is robust only if it survives every restart)
  is not weaker than PGD-``pgd_steps``.
* **(d) gradient-free not stronger than gradient attacks**: robust accuracy under the
  Square Attack (ART, score-based, ``square_queries`` queries, same eps) >= the
  gradient attacks' worst case (as in (a)); a markedly stronger Square means masked
  gradients.
* **(e) noise weaker than PGD**: robust accuracy under ``noise_draws`` random
  perturbations of the same eps (alternately random signs, the ball's vertices, and
  uniform in the ball; an image is robust only if it survives every draw) >= the
  gradient attacks' worst case.

**Noise rule** (what "within noise" means). Every comparison is of two attacks on the
same images, so it is paired: per image, the outcomes (correct / wrong under attack A
and under attack B) form a 2 x 2 table whose discordant cells are ``a_only`` (correct
under A only) and ``b_only`` (correct under B only). "A's robust accuracy exceeds B's"
is decided by the exact one-sided McNemar test: under the null hypothesis that both
attacks are equally strong, ``a_only ~ Binomial(a_only + b_only, 1/2)``, and the check
fails only when ``P(X >= a_only) < alpha`` (``alpha`` 0.05 by default; scipy's
``binomtest``). A difference the per-image sampling noise explains never fails a
check; concordant images (both attacks agree) carry no information and do not dilute
it. (b) tests every pair of budgets ``eps_i < eps_j`` for a significant rise, with a
Bonferroni correction over the pairs (family-wise false alarm rate <= alpha), and
compares the accuracy at the largest eps with ``max_robust`` through its Wilson
interval (confidence ``1 - alpha``): it fails when the whole interval lies above
``max_robust``. Error bars of the eps sweep are the same Wilson intervals.

The verdict functions (:func:`paired_greater`, :func:`check_white_box_vs_transfer`,
:func:`check_eps_sweep`, :func:`check_more_iterations`, :func:`check_gradient_free`,
:func:`check_noise`, :func:`masking_checks`) are pure functions of per-image boolean
outcomes; :func:`masking_outcomes` runs the attacks. Randomised models (a module with a
true ``randomized`` attribute, :func:`pipeline.attacks.base.is_randomized`): every PGD
step follows the mean gradient of ``eot_samples`` forward/backward passes (expectation
over transformation, Athalye et al. 2018, Section 4.3; :func:`pipeline.attacks.pgd.pgd`);
deterministic models take one pass. Square, the noise draws and every outcome are single
prediction draws.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from pipeline.attacks.base import Budget, frozen_eval
from pipeline.attacks.pgd import ThreatModel, pgd
from pipeline.metrics import wilson_interval

__all__ = [
    "CHECKS", "CheckResult", "MaskingParams", "PairedComparison", "check_eps_sweep", "check_gradient_free",
    "check_more_iterations", "check_noise", "check_white_box_vs_transfer", "masking_analysis", "masking_checks",
    "masking_outcomes", "paired_greater", "suspected", "wilson_interval",
]

CHECKS = {
    "a": "white box not weaker than transfer",
    "b": "robust accuracy falls monotonically with eps, to about 0",
    "c": "more PGD iterations and restarts do not help the defense",
    "d": "gradient-free Square attack not stronger than the gradient attacks",
    "e": "random noise weaker than PGD",
}
"""Check id -> one-line description (Carlini et al. 2019, Section 5)."""


class MaskingParams(BaseModel):
    """``analysis.masking``: settings of the gradient-masking checks (module docstring).

    Attributes:
        images: test images checked (a prefix of the analysis subset's order).
        eps: L-inf budget of checks (a), (c), (d), (e), pixel units of [0, 1].
        step_size: PGD step at ``eps``; the eps sweep scales it with eps.
        eps_list: budgets of the sweep (b), ascending; 0 means the clean images.
        pgd_steps: PGD iterations of the reference attack (PGD-20) and of the sweep.
        strong_steps, strong_restarts: the stronger PGD of (c).
        square_queries: Square Attack queries per image (d).
        noise_draws: random perturbations per image (e).
        eot_samples: gradient passes averaged per PGD step on a randomised model (EOT).
        max_robust: the largest robust accuracy allowed at the largest eps of (b).
        alpha: significance level of the paired tests (the noise rule).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    images: int = Field(200, ge=10, le=100_000, description="test images checked")
    eps: Budget = Field(8 / 255, gt=0, le=1, description="L-inf budget of checks a, c, d, e")
    step_size: Budget = Field(2 / 255, gt=0, le=1, description="PGD step at eps (scaled with eps in the sweep)")
    eps_list: list[Budget] = Field(
        default_factory=lambda: [0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255, 64 / 255], min_length=2,
        max_length=32, description="budgets of the eps sweep (check b), ascending; 0 is the clean accuracy")
    pgd_steps: int = Field(20, ge=1, le=1000, description="PGD iterations of the reference attack")
    strong_steps: int = Field(100, ge=1, le=10_000, description="PGD iterations of the stronger attack (check c)")
    strong_restarts: int = Field(5, ge=1, le=100, description="random restarts of the stronger attack")
    square_queries: int = Field(1000, ge=1, le=100_000, description="Square Attack queries per image (check d)")
    noise_draws: int = Field(10, ge=1, le=1000, description="random perturbations per image (check e)")
    eot_samples: int = Field(10, ge=1, le=1000, description="gradient passes averaged per PGD step on a randomised "
                                                            "model (EOT); deterministic models take one")
    max_robust: float = Field(0.05, ge=0, lt=1, description="robust accuracy allowed at the largest eps (check b)")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level of the paired tests")

    @field_validator("eps_list")
    @classmethod
    def _ascending(cls, v: list[float]) -> list[float]:
        if any(not 0 <= e <= 1 for e in v) or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"distinct ascending budgets in [0, 1] (pixel units: 8/255), got {v}")
        return v

    @model_validator(mode="after")
    def _step(self) -> MaskingParams:
        if self.step_size > 2.5 * self.eps:
            raise ValueError(f"step_size {self.step_size:.4f} is over 2.5 x eps {self.eps:.4f}; use e.g. 2/255")
        return self


# --------------------------------------------------------------------------- the noise rule


def _bools(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=bool).reshape(-1)


@dataclass(frozen=True)
class PairedComparison:
    """Two attacks' per-image outcomes on the same images (True: still correct).

    Attributes:
        a, b: robust accuracies.
        n_images: images compared.
        a_only, b_only: discordant pairs (correct under A only, under B only).
        p_value: exact one-sided McNemar p-value of "A's accuracy is higher".
        greater: ``p_value < alpha``.
    """

    a: float
    b: float
    n_images: int
    a_only: int
    b_only: int
    p_value: float
    greater: bool


def paired_greater(a: Any, b: Any, alpha: float = 0.05) -> PairedComparison:
    """Is robust accuracy A significantly higher than B on the same images?

    The exact one-sided McNemar test on the discordant pairs (module docstring):
    ``p = P(X >= a_only)``, ``X ~ Binomial(a_only + b_only, 1/2)``.

    Args:
        a, b: per-image outcomes, bool (n,) (tensor, array or list), True where the
            image is still classified correctly under the attack.
        alpha: significance level.

    Raises:
        ValueError: the outcome vectors differ in length or are empty.
    """
    a, b = _bools(a), _bools(b)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired outcomes must be non-empty and of equal length, got {a.size} and {b.size}")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    if a_only == 0:
        p = 1.0
    else:
        from scipy.stats import binomtest

        p = float(binomtest(a_only, a_only + b_only, 0.5, alternative="greater").pvalue)
    return PairedComparison(float(a.mean()), float(b.mean()), int(a.size), a_only, b_only, p, p < alpha)


@dataclass(frozen=True)
class CheckResult:
    """One check's numbers and verdict (one row of ``checks.csv``).

    Attributes:
        check: ``a`` ... ``e`` (:data:`CHECKS`).
        description: what passing means.
        value_label, value: the quantity checked (a robust accuracy).
        reference_label, reference: what it is compared with.
        n_images: images compared.
        p_value: the test's p-value (b: the smallest Bonferroni-corrected one over the
            eps pairs); NaN where not applicable.
        passed: True, False, or None (n/a: the baseline's transfer check).
        detail: the test in words.
    """

    check: str
    description: str
    value_label: str
    value: float
    reference_label: str
    reference: float
    n_images: int
    p_value: float
    passed: bool | None
    detail: str

    def row(self) -> dict[str, Any]:
        """The dict of a ``checks.csv`` row (``passed`` as ``"True"``, ``"False"`` or ``"NA"``)."""
        return {**asdict(self), "passed": "NA" if self.passed is None else str(self.passed)}


def _not_greater(check: str, value_label: str, value: Any, reference_label: str, reference: Any,
                 alpha: float) -> CheckResult:
    """Passes unless ``value``'s accuracy is significantly above ``reference``'s (paired)."""
    c = paired_greater(value, reference, alpha)
    detail = (f"{value_label} {c.a:.3f} vs {reference_label} {c.b:.3f} on {c.n_images} images: correct under the "
              f"first only {c.a_only}, second only {c.b_only}; one-sided exact McNemar p = {c.p_value:.3g} "
              f"({'significant' if c.greater else 'not significant'} at alpha {alpha:g})")
    return CheckResult(check, CHECKS[check], value_label, c.a, reference_label, c.b, c.n_images, c.p_value,
                       not c.greater, detail)


def check_white_box_vs_transfer(white: Any, transfer: Any | None, alpha: float = 0.05) -> CheckResult:
    """(a): passes unless white-box robust accuracy is significantly above the
    transferred attack's; ``transfer`` None (the baseline itself): n/a."""
    if transfer is None:
        w = _bools(white)
        return CheckResult("a", CHECKS["a"], "white-box PGD", float(w.mean()), "transfer from baseline", math.nan,
                           int(w.size), math.nan, None, "n/a: no transfer source (the model is the undefended baseline)")
    return _not_greater("a", "white-box PGD", white, "transfer from baseline", transfer, alpha)


def check_more_iterations(strong: Any, weak: Any, alpha: float = 0.05, strong_label: str = "PGD-100x5",
                          weak_label: str = "PGD-20") -> CheckResult:
    """(c): passes unless the stronger PGD's robust accuracy is significantly above the weaker one's."""
    return _not_greater("c", strong_label, strong, weak_label, weak, alpha)


def check_gradient_free(square: Any, gradient: Any, alpha: float = 0.05) -> CheckResult:
    """(d): passes unless the gradient attacks' robust accuracy is significantly above Square's."""
    return _not_greater("d", "gradient attacks (worst case)", gradient, "Square", square, alpha)


def check_noise(noise: Any, gradient: Any, alpha: float = 0.05) -> CheckResult:
    """(e): passes unless the gradient attacks' robust accuracy is significantly above random noise's."""
    return _not_greater("e", "gradient attacks (worst case)", gradient, "random noise", noise, alpha)


def check_eps_sweep(eps_list: Sequence[float], outcomes: Sequence[Any], max_robust: float = 0.05,
                    alpha: float = 0.05) -> CheckResult:
    """(b): passes if no larger budget has a significantly higher robust accuracy than
    a smaller one (every pair, paired McNemar, Bonferroni over the pairs) and the
    Wilson interval (confidence ``1 - alpha``) at the largest eps reaches down to
    ``max_robust``.

    Args:
        eps_list: ascending budgets.
        outcomes: per budget, per-image bool outcomes (True: correct).
        max_robust: robust accuracy allowed at the largest eps.
        alpha: family-wise significance level.

    Raises:
        ValueError: lengths differ, or fewer than two budgets.
    """
    if len(eps_list) != len(outcomes) or len(eps_list) < 2:
        raise ValueError(f"one outcome vector per eps, at least two, got {len(eps_list)} and {len(outcomes)}")
    pairs = [(i, j) for i in range(len(eps_list)) for j in range(i + 1, len(eps_list))]
    tests = {(i, j): paired_greater(outcomes[j], outcomes[i]) for i, j in pairs}
    (i, j), worst = min(tests.items(), key=lambda kv: kv[1].p_value)
    p_adj = min(1.0, worst.p_value * len(pairs))
    monotone = p_adj >= alpha
    last = _bools(outcomes[-1])
    k, n = int(last.sum()), int(last.size)
    low, high = wilson_interval(k, n, 1 - alpha)
    reaches = low <= max_robust
    detail = (f"largest rise: {worst.b:.3f} at eps {eps_list[i] * 255:g}/255 -> {worst.a:.3f} at "
              f"{eps_list[j] * 255:g}/255, McNemar p = {worst.p_value:.3g} x {len(pairs)} pairs = {p_adj:.3g} "
              f"({'within noise' if monotone else 'a rise beyond noise'}); at {eps_list[-1] * 255:g}/255: {k}/{n} = "
              f"{k / n:.3f}, Wilson {1 - alpha:.0%} [{low:.3f}, {high:.3f}] "
              f"{'reaches' if reaches else 'stays above'} {max_robust:g}")
    return CheckResult("b", CHECKS["b"], f"PGD at eps {eps_list[-1] * 255:g}/255", k / n,
                       "max robust accuracy allowed", max_robust, n, p_adj, monotone and reaches, detail)


def masking_checks(outcomes: dict[str, Any], eps_list: Sequence[float], params: MaskingParams) -> list[CheckResult]:
    """The five verdicts from per-image outcomes (:func:`masking_outcomes`' ``outcomes``):
    ``pgd``, ``pgd_strong``, ``square``, ``noise``, ``transfer`` (absent or None: (a) is n/a)
    and ``sweep`` (one vector per eps of ``eps_list``)."""
    a = params.alpha
    gradient = _bools(outcomes["pgd"]) & _bools(outcomes["pgd_strong"])
    strong = f"PGD-{params.strong_steps}x{params.strong_restarts}"
    return [
        check_white_box_vs_transfer(gradient, outcomes.get("transfer"), a),
        check_eps_sweep(eps_list, outcomes["sweep"], params.max_robust, a),
        check_more_iterations(outcomes["pgd_strong"], outcomes["pgd"], a, strong, f"PGD-{params.pgd_steps}"),
        check_gradient_free(outcomes["square"], gradient, a),
        check_noise(outcomes["noise"], gradient, a),
    ]


def suspected(checks: Sequence[CheckResult | dict[str, Any]]) -> str:
    """``"suspected: b, d"`` (the failed checks) or ``"not suspected"``."""
    failed = [c["check"] if isinstance(c, dict) else c.check for c in checks
              if (c["passed"] if isinstance(c, dict) else c.passed) in (False, "False")]
    return f"suspected: {', '.join(failed)}" if failed else "not suspected"


# --------------------------------------------------------------------------- the attacks


def _batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(x), batch_size)])


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(x).argmax(1) == y).cpu()


def _pgd_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
                restarts: int, seed: int, batch_size: int, source: nn.Module | None = None,
                eot_samples: int = 1) -> torch.Tensor:
    """Per image: still correct on ``model`` after PGD (made on ``source``, default ``model``;
    EOT over ``eot_samples`` passes where it is randomised) in every one of ``restarts``
    independent random starts."""
    threat = ThreatModel("linf", eps, step, steps, True, 1, eot_samples)
    source = model if source is None else source
    g = torch.Generator().manual_seed(seed)

    def run(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        ok = torch.ones(len(xb), dtype=torch.bool)
        for _ in range(restarts):
            ok &= _correct(model, pgd(source, xb, yb, threat, None, g, record_loss=False).x_adv, yb)
        return ok

    return _batched(run, x, y, batch_size)


def _noise_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, draws: int, seed: int,
                  batch_size: int) -> torch.Tensor:
    """Per image: still correct under every draw (even draws: random signs, ``eps`` x
    {-1, +1}; odd: uniform in the ball), clipped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)

    def run(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        ok = torch.ones(len(xb), dtype=torch.bool)
        for k in range(draws):
            u = torch.rand(xb.shape, generator=g, dtype=xb.dtype).to(xb.device)
            delta = (torch.where(u < 0.5, -1.0, 1.0) if k % 2 == 0 else 2 * u - 1) * eps
            ok &= _correct(model, (xb + delta).clamp(0, 1), yb)
        return ok

    return _batched(run, x, y, batch_size)


def masking_outcomes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: MaskingParams,
                     baseline: nn.Module | None = None, batch_size: int = 250,
                     seed: int = 0) -> tuple[dict[str, Any], dict[str, float]]:
    """Run every attack of the checks on ``model`` and record per-image outcomes.

    Args:
        model: the (defended) model, images in [0, 1] -> logits.
        x: float (N, C, H, W) in [0, 1]; y: int64 (N,).
        params: the settings (:class:`MaskingParams`; ``params.images`` is not applied here).
        baseline: the undefended model, source of the transferred examples of (a);
            None: (a) is n/a.
        batch_size: images per attack call.
        seed: seeds every attack's randomness.

    Returns:
        ``(outcomes, seconds)``: bool (N,) CPU tensors ``clean``, ``pgd``, ``pgd_strong``,
        ``square``, ``noise``, ``transfer`` (None without a baseline) and ``sweep`` (a
        list, one per ``params.eps_list``); wall-clock seconds per attack.
    """
    from pipeline.attacks.classic import Square, SquareParams

    p, bs, eot = params, batch_size, params.eot_samples
    seconds: dict[str, float] = {}
    out: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - start
        return value

    with frozen_eval(model), (frozen_eval(baseline) if baseline is not None else contextlib.nullcontext()):
        out["clean"] = timed("clean", lambda: _batched(lambda a, b: _correct(model, a, b), x, y, bs))
        out["pgd"] = timed("pgd", lambda: _pgd_robust(
            model, x, y, p.eps, p.step_size, p.pgd_steps, 1, seed, bs, eot_samples=eot))
        out["pgd_strong"] = timed("pgd_strong", lambda: _pgd_robust(
            model, x, y, p.eps, p.step_size, p.strong_steps, p.strong_restarts, seed + 1, bs, eot_samples=eot))
        out["transfer"] = None if baseline is None else timed("transfer", lambda: _pgd_robust(
            model, x, y, p.eps, p.step_size, p.pgd_steps, 1, seed, bs, source=baseline, eot_samples=eot))
        square = Square(SquareParams(eps=p.eps, max_iter=p.square_queries, batch_size=bs))
        out["square"] = timed("square", lambda: _batched(
            lambda a, b: _correct(model, a, b), square(model, x, y, torch.Generator().manual_seed(seed + 2)), y, bs))
        out["noise"] = timed("noise", lambda: _noise_robust(model, x, y, p.eps, p.noise_draws, seed + 3, bs))
        sweep = []
        start = time.perf_counter()
        for i, eps in enumerate(p.eps_list):
            if eps == 0:
                sweep.append(out["clean"])
            elif math.isclose(eps, p.eps, rel_tol=1e-6):
                sweep.append(out["pgd"])  # the same attack: reuse it
            else:
                sweep.append(_pgd_robust(model, x, y, eps, p.step_size * eps / p.eps, p.pgd_steps, 1, seed + 10 + i,
                                         bs, eot_samples=eot))
        seconds["eps_sweep"] = time.perf_counter() - start
        out["sweep"] = sweep
    return out, seconds


def masking_analysis(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: MaskingParams,
                     baseline: nn.Module | None = None, batch_size: int = 250, seed: int = 0) -> dict[str, Any]:
    """The checks on one model: what ``analyze@masking``'s task returns.

    Returns:
        ``checks``: list of :meth:`CheckResult.row` dicts (a ... e); ``sweep``: list of
        ``{eps, robust_accuracy, ci_low, ci_high, n_images}`` (Wilson, confidence
        ``1 - alpha``); ``accuracy``: robust accuracy per attack; ``outcomes``: the
        per-image bool tensors; ``verdict``: :func:`suspected`'s string; ``attack_seconds``.
    """
    outcomes, seconds = masking_outcomes(model, x, y, params, baseline, batch_size, seed)
    checks = masking_checks(outcomes, params.eps_list, params)
    sweep = []
    for eps, o in zip(params.eps_list, outcomes["sweep"], strict=True):
        k, n = int(o.sum()), len(o)
        low, high = wilson_interval(k, n, 1 - params.alpha)
        sweep.append({"eps": float(eps), "robust_accuracy": k / n, "ci_low": low, "ci_high": high, "n_images": n})
    accuracy = {name: int(v.sum()) / len(v) for name, v in outcomes.items() if isinstance(v, torch.Tensor)}
    return {"checks": [c.row() for c in checks], "sweep": sweep, "accuracy": accuracy, "outcomes": outcomes,
            "verdict": suspected(checks), "attack_seconds": seconds}
