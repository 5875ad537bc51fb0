"""The gradient-masking checks (:mod:`pipeline.analysis.masking`; Carlini et al. 2019,
Section 5): the noise rule and verdicts on constructed outcome vectors, and every check
on real attacks against models built to fail it.

The task (:func:`blobs`): 4 classes of 3 x 8 x 8 images, class prototypes 0.5 +- 0.02
per value plus Gaussian noise (sigma 0.15), so a linear model reaches about 75 % clean
accuracy, PGD at 8/255 (about the prototypes' gap) takes it near 0, and uniform noise of
8/255 costs a few points. The ordinary model is that linear model, trained in the test
(about a second); the baseline of the transfer check is the same model trained from
another seed. The broken models:

* :class:`Saturated` multiplies the logits by 1e6: the softmax saturates, the
  cross-entropy gradient underflows to exactly 0 and PGD stalls at its random start
  (defensive distillation's vanishing gradients), while the decisions, and so transferred
  examples and the score-based Square attack, work as on the plain model: fails (a),
  (b) (accuracy stays high at 64/255) and (d).
* :class:`Reversed` passes the input through a layer whose backward pass negates the
  gradient: PGD moves images towards their class, so robust accuracy rises above clean
  accuracy and random noise is the stronger attack: fails (b) (accuracy rises with eps)
  and (e) (and (a), (d)).
* :class:`NoisyGradient` (a randomised model: ``randomized = True``) decides as the plain
  model but adds to every logit a term whose value is 0 and whose gradient is Gaussian
  noise ten times the weights' size, fresh on every pass: PGD with one gradient draw a
  step wanders (fails (a) and (d): transfer and Square, which never look at gradients,
  work), PGD averaging ``eot_samples`` draws a step (EOT) passes every check.
* :class:`LossNotAligned` (constant grey images, label 0) has a cross-entropy that keeps
  rising along PGD's path while the decision goes wrong and then right again: with a
  small step, PGD-20 stops in the wrong region, PGD-100 walks on to the far end, where
  the loss is highest but the prediction correct: fails (c).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("art")

from pipeline.analysis.masking import (  # noqa: E402
    CHECKS,
    MaskingParams,
    check_eps_sweep,
    check_gradient_free,
    check_more_iterations,
    check_noise,
    check_white_box_vs_transfer,
    masking_analysis,
    paired_greater,
    suspected,
    wilson_interval,
)

K, SHAPE = 4, (3, 8, 8)
SMALL = dict(pgd_steps=10, strong_steps=20, strong_restarts=2, square_queries=200, noise_draws=6)


def outcomes(n_true: int, n: int = 100) -> torch.Tensor:
    """bool (n,): the first ``n_true`` True."""
    return torch.arange(n) < n_true


# --------------------------------------------------------------------------- the noise rule, directly


def test_paired_test_is_the_exact_one_sided_mcnemar():
    """Only the discordant pairs count, and p = P(Binomial(a_only + b_only, 1/2) >= a_only)."""
    a, b = outcomes(100), outcomes(95)  # 5 images correct under A only, none under B only
    c = paired_greater(a, b)
    assert (c.a_only, c.b_only, c.n_images) == (5, 0, 100)
    assert c.p_value == pytest.approx(0.5**5) and c.greater  # 1/32 < 0.05
    c4 = paired_greater(outcomes(100), outcomes(96))
    assert c4.p_value == pytest.approx(0.5**4) and not c4.greater  # 1/16: within noise
    # 3 + 7 discordant: p = P(X >= 7 | 10) = (120 + 45 + 10 + 1) / 1024
    a = torch.tensor([True] * 7 + [False] * 3 + [True] * 90)
    b = torch.tensor([False] * 7 + [True] * 3 + [True] * 90)
    assert paired_greater(a, b).p_value == pytest.approx(176 / 1024)
    assert paired_greater(b, a).p_value == pytest.approx(1 - 56 / 1024)
    # the same accuracy, or A below B, is never "greater"
    assert paired_greater(outcomes(50), outcomes(50)).p_value == 1.0
    assert not paired_greater(outcomes(10), outcomes(90)).greater
    with pytest.raises(ValueError, match="equal length"):
        paired_greater(outcomes(5, 10), outcomes(5, 11))


def test_wilson_interval_matches_the_closed_form():
    k, n, z = 8, 100, 1.959963984540054
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@pytest.mark.parametrize("check", [check_more_iterations, check_gradient_free, check_noise])
def test_pairwise_checks_fail_only_beyond_noise(check):
    """(c), (d), (e): a difference of 3 images in 100 passes, one of 30 fails (in the
    direction that signals masking), and the opposite direction always passes."""
    masked_side, other_side = (0, 1) if check is check_more_iterations else (1, 0)

    def run(masked: torch.Tensor, other: torch.Tensor):
        args = [None, None]
        args[masked_side], args[other_side] = masked, other
        return check(*args)

    assert run(outcomes(53), outcomes(50)).passed is True
    failed = run(outcomes(80), outcomes(50))
    assert failed.passed is False and failed.p_value < 1e-6 and failed.n_images == 100
    assert run(outcomes(20), outcomes(50)).passed is True
    assert failed.check in CHECKS and failed.row()["passed"] == "False"


def test_transfer_check_and_its_na():
    assert check_white_box_vs_transfer(outcomes(12), outcomes(10)).passed is True
    assert check_white_box_vs_transfer(outcomes(60), outcomes(10)).passed is False
    na = check_white_box_vs_transfer(outcomes(60), None)
    assert na.passed is None and na.row()["passed"] == "NA" and math.isnan(na.reference)


def test_eps_sweep_check_monotone_within_noise_and_reaching_zero():
    eps = [0, 2 / 255, 8 / 255, 64 / 255]
    assert check_eps_sweep(eps, [outcomes(80), outcomes(50), outcomes(20), outcomes(0)]).passed
    # a rise of 3 images between two budgets is within noise
    assert check_eps_sweep(eps, [outcomes(80), outcomes(20), outcomes(23), outcomes(0)]).passed
    # a rise of 40 images is not, even after the Bonferroni correction over the 6 pairs
    rise = check_eps_sweep(eps, [outcomes(80), outcomes(20), outcomes(60), outcomes(0)])
    assert rise.passed is False and "beyond noise" in rise.detail
    # at the largest eps, 8 / 100 is within noise of 5 % (Wilson 95 % from 0.041), 12 / 100 is not (from 0.070)
    assert check_eps_sweep(eps, [outcomes(80), outcomes(50), outcomes(20), outcomes(8)]).passed
    high = check_eps_sweep(eps, [outcomes(80), outcomes(50), outcomes(20), outcomes(12)])
    assert high.passed is False and high.value == pytest.approx(0.12)
    assert check_eps_sweep(eps, [outcomes(80), outcomes(50), outcomes(20), outcomes(12)], max_robust=0.1).passed


def test_suspected_names_the_failed_checks():
    rows = [check_white_box_vs_transfer(outcomes(60), None), check_noise(outcomes(0), outcomes(90)),
            check_gradient_free(outcomes(0), outcomes(90))]
    assert suspected(rows) == "suspected: e, d"
    assert suspected([r.row() for r in rows[:1]]) == "not suspected"


def test_params_are_bounded():
    p = MaskingParams.model_validate({"eps": "4/255", "eps_list": [0, "4/255", "64/255"]})
    assert p.eps == pytest.approx(4 / 255) and p.eps_list[-1] == pytest.approx(64 / 255)
    for bad in ({"eps_list": ["8/255", "4/255"]}, {"eps_list": [0, 2]}, {"step_size": "32/255"}, {"images": 0},
                {"unknown": 1}):
        with pytest.raises(ValueError):
            MaskingParams.model_validate(bad)


# --------------------------------------------------------------------------- real attacks on built models


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    protos = 0.5 + 0.02 * (2 * torch.randint(0, 2, (K, *SHAPE), generator=torch.Generator().manual_seed(123)) - 1)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    return (protos[y] + 0.15 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1), y


def linear_model(seed: int) -> nn.Module:
    x, y = blobs(1000, seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), K))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


class Saturated(nn.Module):
    """``model``'s logits times 1e6 (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * 1e6


class _Negate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return -grad


class Reversed(Saturated):
    """``model`` behind an identity whose gradient is negated (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_Negate.apply(x))


class NoisyGradient(Saturated):
    """``model``'s logits plus ``(x - x.detach()) . r_k`` for class k, ``r_k`` Gaussian, std ``scale``,
    drawn on every pass: the value is exactly the plain model's, the input gradient is noisy."""

    randomized = True

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__(model)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        r = torch.randn(len(x), z.shape[1], *x.shape[1:]) * self.scale
        return z + torch.einsum("nchw,nkchw->nk", x - x.detach(), r)


class LossNotAligned(nn.Module):
    """10 classes on u = 255 (mean(x) - 0.5): logits 0 (class 0), m(u) = -0.15 (u - 2)(u - 6.5)
    (class 1) and -3 + 0.36 u (classes 2-9). Class 0 wins for u < 2 and 6.5 < u < 8.3,
    class 1 between; the cross-entropy of class 0 rises with u all the way (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (x.mean((1, 2, 3)) - 0.5) * 255
        m, g = -0.15 * (u - 2) * (u - 6.5), -3 + 0.36 * u
        return torch.stack([torch.zeros_like(u), m, *[g] * 8], 1)


@pytest.fixture(scope="module")
def task():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y = blobs(150, seed=7)
    yield {"model": linear_model(0), "baseline": linear_model(1), "x": x, "y": y,
           "params": MaskingParams(images=150, **SMALL)}
    torch.set_num_threads(threads)


def verdicts(result: dict) -> dict[str, str]:
    return {c["check"]: c["passed"] for c in result["checks"]}


def test_ordinary_model_passes_every_check(task):
    r = masking_analysis(task["model"], task["x"], task["y"], task["params"], task["baseline"])
    assert verdicts(r) == dict.fromkeys("abcde", "True"), r["checks"]
    assert r["verdict"] == "not suspected"
    acc = r["accuracy"]
    assert 0.6 < acc["clean"] < 0.9 and acc["pgd"] < 0.15 and acc["noise"] > acc["pgd"] + 0.3
    sweep = r["sweep"]
    assert [s["eps"] for s in sweep] == pytest.approx(task["params"].eps_list)
    assert sweep[0]["robust_accuracy"] == acc["clean"] and sweep[-1]["robust_accuracy"] <= 0.05
    assert all(s["ci_low"] <= s["robust_accuracy"] <= s["ci_high"] for s in sweep)
    # the baseline itself: no transfer source, (a) n/a
    own = masking_analysis(task["model"], task["x"], task["y"], task["params"])
    assert verdicts(own)["a"] == "NA" and own["outcomes"]["transfer"] is None


def test_saturated_softmax_fails_transfer_eps_and_square_checks(task):
    r = masking_analysis(Saturated(task["model"]), task["x"], task["y"], task["params"], task["baseline"])
    v = verdicts(r)
    assert (v["a"], v["b"], v["d"]) == ("False", "False", "False"), r["checks"]
    assert r["verdict"].startswith("suspected: a, b") and "d" in r["verdict"]
    assert r["accuracy"]["pgd"] > r["accuracy"]["square"] + 0.3  # PGD stalls, Square does not


def test_reversed_gradient_fails_the_noise_and_monotonicity_checks(task):
    r = masking_analysis(Reversed(task["model"]), task["x"], task["y"], task["params"], task["baseline"])
    v = verdicts(r)
    assert (v["b"], v["e"]) == ("False", "False"), r["checks"]
    assert r["accuracy"]["pgd"] > r["accuracy"]["clean"] and r["accuracy"]["pgd"] > r["accuracy"]["noise"] + 0.2
    assert "beyond noise" in next(c for c in r["checks"] if c["check"] == "b")["detail"]


def test_randomised_gradients_fail_without_eot_and_pass_with_it(task):
    torch.manual_seed(0)  # the model's noise
    model = NoisyGradient(task["model"], 10 * float(task["model"][1].weight.detach().abs().mean()))
    x, y = task["x"][:100], task["y"][:100]
    params = MaskingParams(images=100, eps_list=[0, 8 / 255, 64 / 255], pgd_steps=10, strong_steps=10,
                           strong_restarts=1, square_queries=200, noise_draws=4, eot_samples=1)
    plain = masking_analysis(model, x, y, params, task["baseline"])
    assert (verdicts(plain)["a"], verdicts(plain)["d"]) == ("False", "False"), plain["checks"]
    eot = masking_analysis(model, x, y, params.model_copy(update={"eot_samples": 50}), task["baseline"])
    assert eot["verdict"] == "not suspected", eot["checks"]
    assert eot["accuracy"]["pgd"] < plain["accuracy"]["pgd"] - 0.3
    assert eot["accuracy"]["clean"] == plain["accuracy"]["clean"]  # the decisions are not random


def test_loss_not_aligned_with_errors_fails_the_iterations_check():
    x, y = torch.full((40, *SHAPE), 0.5), torch.zeros(40, dtype=torch.long)
    params = MaskingParams(images=40, step_size=0.25 / 255, pgd_steps=20, strong_steps=100, strong_restarts=2,
                           square_queries=20, noise_draws=2, eps_list=[0, 8 / 255])
    r = masking_analysis(LossNotAligned(), x, y, params)
    assert r["accuracy"]["pgd"] == 0.0 and r["accuracy"]["pgd_strong"] == 1.0
    assert verdicts(r)["c"] == "False"
    # with the usual step (2/255), PGD-20 reaches the far end too: nothing to see for (c)
    r = masking_analysis(LossNotAligned(), x, y, params.model_copy(update={"step_size": 2 / 255}))
    assert verdicts(r)["c"] == "True"


def test_square_attack_stays_in_the_ball_and_fools_the_linear_model(task):
    from pipeline.attacks.base import build_attack, list_attacks

    assert "square" in list_attacks()
    x, y = task["x"][:40], task["y"][:40]
    attack = build_attack("square", {"eps": "8/255", "max_iter": 100})
    adv = attack(task["model"], x, y, torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        clean, robust = (task["model"](x).argmax(1) == y), (task["model"](adv).argmax(1) == y)
    assert robust.sum() < clean.sum() - 5 and not (robust & ~clean).any()
    with pytest.raises(ValueError, match="untargeted"):
        build_attack("square", {"target": 1})


def test_writer_tables_from_a_result(tmp_path, task, monkeypatch):
    """The stage's writer on two results: checks.csv (one row a defense and check), eps_sweep.csv / .png."""
    import pandas as pd

    from pipeline.analysis import outputs
    from pipeline.config import AnalysisConfig

    params = task["params"]
    results = {"none": masking_analysis(task["model"], task["x"], task["y"], params),
               "sat": masking_analysis(Saturated(task["model"]), task["x"], task["y"], params, task["baseline"])}
    fake = type("P", (), {"analysis": AnalysisConfig(masking=params)})()
    metrics = outputs.write_masking(results, tmp_path, fake, {}, {})
    checks = pd.read_csv(tmp_path / "checks.csv", keep_default_na=False)
    assert list(checks.columns) == ["defense", "check", "description", "value_label", "value", "reference_label",
                                    "reference", "n_images", "p_value", "passed", "detail"]
    assert list(zip(checks["defense"], checks["check"], strict=True)) == [(d, c) for d in ("none", "sat")
                                                                        for c in "abcde"]
    assert checks.set_index(["defense", "check"]).loc[("none", "a"), "passed"] == "NA"
    assert set(checks["passed"]) <= {"True", "False", "NA"} and (checks["n_images"] == 150).all()
    sweep = pd.read_csv(tmp_path / "eps_sweep.csv")
    assert len(sweep) == 2 * len(params.eps_list) and (sweep["ci_low"] <= sweep["ci_high"]).all()
    assert Path(tmp_path / "eps_sweep.png").stat().st_size > 1000
    assert metrics["sat.check_a_passed"] == 0.0 and "none.check_a_passed" not in metrics
    assert metrics["sat.checks_failed"] >= 3 and metrics["none.robust_accuracy.clean"] == results["none"][
        "accuracy"]["clean"]
