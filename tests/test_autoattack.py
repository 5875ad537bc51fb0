"""AutoAttack (``autoattack``: ART's APGD and Square behind the project's attack
interface, with the reference protocol's per-image bookkeeping).

The unit tests attack a small conv net trained in the module fixture for a
couple of seconds on a synthetic 10-class task (:func:`synthetic_images`): each
class is a smooth random colour pattern of amplitude 0.12 on grey 0.5, plus
uniform pixel noise of +-0.2, so the clean test images are all but perfectly
classified while the margins vary from image to image (the noise), and an
L-inf budget of a few /255 flips some images but not all. Budgets are lowered
(APGD 20 iterations, as many as PGD-20's steps; Square 50 queries) to keep
the module fast; what is tested:

* the output is float32 in [0, 1], within ``eps`` of the clean images, and
  images already misclassified, or not fooled, come back bit-exact;
* AutoAttack is at least as strong as the project's PGD-20 on the same images
  (APGD-CE alone is a step-size-adaptive PGD with as many steps, and the
  ensemble keeps per image whichever component fools the model first), and
  strictly below clean accuracy;
* ``version: rand`` (APGD with EOT) on a model adding fresh Gaussian noise to its
  input at every forward pass is at least as strong as ``standard`` up to the
  sampling noise of the evaluation (tolerance justified in the test);
* the EOT gradient is exactly the mean of ``eot_iter`` single-draw gradients.

The e2e test compares AutoAttack with PGD-20 on the smoke profile's trained
ResNet-20 (``smoke_project`` fixture, a full ``dvc repro``).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("art")

from art.estimators.classification import PyTorchClassifier  # noqa: E402

from pipeline.attacks.autoattack import COMPONENTS, AutoAttack, _with_eot  # noqa: E402
from pipeline.attacks.base import build_attack, list_attacks  # noqa: E402
from pipeline.models import Normalized  # noqa: E402

K, SIDE = 10, 12
EPS = 6 / 255
CHEAP = {"n_iter": 20, "square_n_queries": 50}


def synthetic_images(n: int, templates: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images float32 (n, 3, SIDE, SIDE) in [0, 1] and labels int64 (n,)
    (module docstring: class pattern of amplitude 0.12 plus uniform noise +-0.2)."""
    y = torch.randint(0, K, (n,), generator=generator)
    noise = (torch.rand(n, 3, SIDE, SIDE, generator=generator) - 0.5) * 0.4
    return (0.5 + 0.12 * templates[y] + noise).clamp(0, 1), y


class NoisyInput(nn.Module):
    """``model(x + sigma * N(0, 1))`` with fresh noise at every call (torch's global
    random state): a randomised model for the EOT version."""

    def __init__(self, model: nn.Module, sigma: float) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * torch.randn_like(x))


@pytest.fixture(scope="module")
def task() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small conv net trained for 150 Adam steps on synthetic images (eval mode,
    float32) and 100 fresh test images with their labels."""
    g = torch.Generator().manual_seed(0)
    templates = nn.functional.interpolate(torch.rand(K, 3, 3, 3, generator=g) * 2 - 1, size=SIDE, mode="bilinear",
                                          align_corners=False)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * (SIDE // 4) ** 2, K))
    model = Normalized(net, (0.5,) * 3, (0.25,) * 3)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        x, y = synthetic_images(128, templates, g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = synthetic_images(100, templates, torch.Generator().manual_seed(1))
    return model.eval(), x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 1) -> float:
    """Fraction of ``x`` classified as ``y``, averaged over ``draws`` forward passes."""
    with torch.no_grad():
        return sum(float((model(x).argmax(1) == y).float().mean()) for _ in range(draws)) / draws


def test_registered_and_built_by_name_with_the_reference_defaults():
    assert "autoattack" in list_attacks()
    attack = build_attack("autoattack", {"eps": "8/255"})
    assert isinstance(attack, AutoAttack) and attack.name == "autoattack"
    p = attack.params
    assert p.eps == pytest.approx(8 / 255) and p.norm == "linf" and p.target is None
    assert (p.n_iter, p.n_restarts, p.n_target_classes, p.square_n_queries, p.eot_iter) == (100, 1, 9, 5000, 20)
    assert p.attack_components() == COMPONENTS["standard"] == ("apgd-ce", "apgd-t", "square")
    assert build_attack("autoattack", {"version": "rand"}).params.attack_components() == ("apgd-ce", "apgd-dlr")
    explicit = build_attack("autoattack", {"components": ["square", "apgd-ce"]}).params.attack_components()
    assert explicit == ("square", "apgd-ce")
    assert build_attack("autoattack", {"norm": "l2", "eps": 1.5}).params.eps == 1.5  # an L2 radius may exceed 1


@pytest.mark.parametrize(
    "params,match",
    [
        ({"eps": 8}, "eps"),  # 0-255 units by mistake (linf budgets are at most 1)
        ({"eps": 0}, "eps"),
        ({"norm": "l2", "eps": -0.5}, "eps"),
        ({"norm": "l1"}, "norm"),
        ({"components": ["apgd-ce", "fab-t"]}, "components"),  # FAB-T: no ART implementation
        ({"components": ["apgd-ce", "apgd-ce"]}, "components"),
        ({"components": []}, "components"),
        ({"version": "plus"}, "version"),
        ({"n_iter": 0}, "n_iter"),
        ({"n_target_classes": 0}, "n_target_classes"),
        ({"target": 3}, "target"),
        ({"steps": 20}, "steps"),  # unknown key
    ],
)
def test_bad_params_are_rejected_with_the_field_named(params, match):
    with pytest.raises(ValueError, match=match):
        build_attack("autoattack", params)


def test_standard_version_stays_in_the_ball_and_beats_pgd20(task):
    model, x, y = task
    with torch.no_grad():
        pred = model(x).argmax(1)
    labels = y.clone()
    labels[:5] = (pred[:5] + 1) % K  # five images the model now misclassifies
    clean = accuracy(model, x, labels)

    attack = build_attack("autoattack", {"eps": EPS, "batch_size": 64, **CHEAP})  # two batches: 64 + 36
    adv = attack(model, x, labels, torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and adv.dtype == torch.float32 and adv.device == x.device
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().amax() <= EPS + 1e-6
    assert torch.equal(adv[:5], x[:5])  # already misclassified: untouched
    with torch.no_grad():
        still_right = model(adv).argmax(1) == labels
    assert torch.equal(adv[still_right], x[still_right])  # not fooled by any component: untouched
    assert not model.training and all(p.requires_grad for p in model.parameters())

    pgd = build_attack("pgd", {"eps": EPS, "step_size": EPS / 4, "steps": 20, "random_start": True})
    robust_pgd = accuracy(model, pgd(model, x, labels, torch.Generator().manual_seed(0)), labels)
    robust_aa = accuracy(model, adv, labels)
    assert robust_pgd > 0, "the budget must leave PGD-20 something to miss, or the comparison says nothing"
    assert robust_aa <= robust_pgd, f"autoattack {robust_aa:.2f} vs PGD-20 {robust_pgd:.2f} (clean {clean:.2f})"
    assert robust_aa < clean


def test_l2_version_stays_in_the_l2_ball(task):
    model, x, y = task
    eps = 0.5  # L2 over 3 x 12 x 12 values: about 3/255 per value if spread evenly
    attack = build_attack("autoattack", {"norm": "l2", "eps": eps, "components": ["apgd-ce", "square"], **CHEAP})
    adv = attack(model, x[:40], y[:40], torch.Generator().manual_seed(0))
    assert adv.dtype == torch.float32 and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x[:40]).flatten(1).norm(dim=1).max() <= eps * (1 + 1e-5)
    assert accuracy(model, adv, y[:40]) < accuracy(model, x[:40], y[:40])


def test_reproducible_from_the_generator_and_global_random_states_restored(task):
    model, x, y = task
    attack = build_attack("autoattack", {"eps": EPS, "components": ["apgd-ce", "square"], "n_iter": 5,
                                         "square_n_queries": 20})
    noisy = NoisyInput(model, 0.05)  # draws from torch's global state at every forward
    np.random.seed(5)
    random.seed(5)
    torch.manual_seed(5)
    states = (np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state())
    a = attack(noisy, x[:20], y[:20], torch.Generator().manual_seed(3))
    assert (np.random.get_state()[1] == states[0]).all() and random.getstate() == states[1]
    assert torch.equal(torch.get_rng_state(), states[2])
    b = attack(noisy, x[:20], y[:20], torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_eot_gradient_is_the_mean_of_eot_iter_single_draws(task):
    model, x, y = task
    clf = PyTorchClassifier(NoisyInput(model, 0.1), loss=nn.CrossEntropyLoss(), input_shape=(3, SIDE, SIDE),
                            nb_classes=K, clip_values=(0.0, 1.0), preprocessing=None, device_type="cpu")
    eot = _with_eot(clf, 5)
    xs, ys = x[:8].numpy(), np.eye(K, dtype=np.float32)[y[:8].numpy()]  # ART's loss_gradient takes one-hot labels
    torch.manual_seed(0)
    singles = [clf.loss_gradient(xs, ys) for _ in range(5)]
    torch.manual_seed(0)
    averaged = eot.loss_gradient(xs, ys)
    assert not np.allclose(singles[0], singles[1])  # the draws differ: there is something to average
    np.testing.assert_allclose(averaged, np.mean(singles, axis=0), rtol=1e-5, atol=1e-8)
    # and the rand version's APGD runs on such a classifier (the standard version's does not)
    for version, eot_iter in (("rand", 7), ("standard", 1)):
        attack = build_attack("autoattack", {"version": version, "eot_iter": 7})
        for loss in ("cross_entropy", "difference_logits_ratio"):
            apgd = attack._apgd(clf, loss, targeted=False)
            assert getattr(apgd.estimator, "eot_iter", 1) == eot_iter
            assert apgd.estimator.model is clf.model


def test_eot_apgd_returns_its_last_iterate_and_predicts_the_mean_of_draws(task):
    """ART's APGD returns its random starting point wherever one ``predict`` of its last
    iterate says "not adversarial"; on a random model that threw away iterates fooling many
    draws (and made AutoAttack weaker than PGD with EOT). With the EOT classifier every
    attacked image comes back as APGD's last iterate -- after signed steps of at least
    ``eps``, on the L-inf ball's boundary almost everywhere, where a uniform random start
    almost never is -- and the check of which images to attack is the mean of ``eot_iter`` draws."""
    model, x, y = task
    noisy = NoisyInput(model, 0.1)
    clf = PyTorchClassifier(noisy, loss=nn.CrossEntropyLoss(), input_shape=(3, SIDE, SIDE), nb_classes=K,
                            clip_values=(0.0, 1.0), preprocessing=None, device_type="cpu")
    xs, ys = x[:40].numpy(), y[:40].numpy()
    eps = 1 / 255  # too small to fool most images: ART alone returns most of them at their random start

    def on_boundary(version: str, **params) -> np.ndarray:
        """Per image, the fraction of values moved by (almost) exactly ``eps``."""
        torch.manual_seed(0)
        attack = build_attack("autoattack", {"eps": eps, "version": version, "n_iter": 5, **params})
        adv = attack._apgd(clf, "cross_entropy", False).generate(xs, y=ys)
        return (np.abs(adv - xs) > 0.99 * eps).reshape(len(xs), -1).mean(1)

    assert np.median(on_boundary("standard")) < 0.1  # the fault: mostly random starts come back
    assert np.median(on_boundary("rand", eot_iter=2)) > 0.5
    # the restart's check of which images to attack: the mean logits of eot_iter draws
    eot = _with_eot(clf, 3)
    torch.manual_seed(1)
    draws = [clf.predict(xs[:8]) for _ in range(3)]
    torch.manual_seed(1)
    np.testing.assert_allclose(eot.predict(xs[:8]), np.mean(draws, axis=0), rtol=1e-5, atol=1e-6)


def test_rand_version_on_a_randomised_model_is_at_least_as_strong_as_standard(task):
    model, x, y = task
    noisy = NoisyInput(model, 0.1)
    # robust accuracy of a random model: the mean over 20 forward passes, so that an
    # image that fooled one lucky draw during the attack does not count as broken
    draws = 20
    clean = accuracy(noisy, x, y, draws)
    results = {}
    for version in ("standard", "rand"):
        attack = build_attack("autoattack", {"eps": EPS, "version": version, "eot_iter": 10, **CHEAP})
        adv = attack(noisy, x, y, torch.Generator().manual_seed(0))
        assert adv.min() >= 0 and adv.max() <= 1 and (adv - x).abs().amax() <= EPS + 1e-6
        results[version] = accuracy(noisy, adv, y, draws)
    # tolerance 0.05: both runs are random (starts, squares, the model's noise) on
    # 100 images, so each robust accuracy moves by a few points from one seed to the
    # next (the binomial standard deviation near 0.75 on 100 images is 0.043); the
    # seeds are fixed. A rand version that stopped attacking, or got much weaker than
    # the standard one, fails this; the EOT averaging itself is checked exactly by
    # the test above
    assert results["rand"] <= results["standard"] + 0.05, results
    assert results["rand"] < clean, (results, clean)


class ScriptedClassifier:
    """Stands in for ART's classifier in ``_keep``: call ``i`` of ``predict`` returns the
    scores of ``calls[i]`` (a list of predicted classes, one per image)."""

    def __init__(self, calls: list[list[int]], k: int = 3) -> None:
        self.calls, self.k, self.n = calls, k, 0

    def predict(self, x: np.ndarray, batch_size: int = 0) -> np.ndarray:
        pred = np.asarray(self.calls[self.n])
        self.n += 1
        return np.eye(self.k, dtype=np.float32)[pred]


def test_rand_success_check_counts_draws_and_keeps_the_most_reliable_image():
    """On a randomised model one lucky draw must neither mark an image broken nor throw its
    adversarial image away: with ``eot_iter`` 4, an image fooling 3 of 4 draws is kept and
    attacked no further, one fooling 1 of 4 is kept (better than clean) but attacked on,
    one fooling none stays clean. The standard version decides on one draw."""
    x = np.zeros((3, 1, 2, 2), np.float32)
    y = np.zeros(3, np.int64)
    adv = np.full_like(x, 0.01)
    attack = build_attack("autoattack", {"eps": EPS, "eot_iter": 4})
    attack._version = "rand"
    out, robust, rate = x.copy(), np.ones(3, bool), np.zeros(3)
    draws = [[1, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]]  # image 0 fools 3 draws, image 1 one, image 2 none
    attack._keep(ScriptedClassifier(draws), x, y, np.arange(3), adv, out, robust, rate)
    assert rate.tolist() == [0.75, 0.25, 0.0]
    assert robust.tolist() == [False, True, True]
    assert np.array_equal(out[:2], adv[:2]) and np.array_equal(out[2], x[2])
    # a later component's image replaces image 1's only if it fools more draws
    weaker, stronger = np.full_like(x, 0.015), np.full_like(x, 0.02)  # all within EPS
    attack._keep(ScriptedClassifier([[0]] * 4), x, y, np.array([1]), weaker[1:2], out, robust, rate)
    assert np.array_equal(out[1], adv[1]) and robust[1]
    attack._keep(ScriptedClassifier([[2]] * 4), x, y, np.array([1]), stronger[1:2], out, robust, rate)
    assert np.array_equal(out[1], stronger[1]) and not robust[1] and rate[1] == 1.0
    # standard version: the first draw decides
    attack._version = "standard"
    out, robust, rate = x.copy(), np.ones(3, bool), np.zeros(3)
    attack._keep(ScriptedClassifier(draws), x, y, np.arange(3), adv, out, robust, rate)
    assert robust.tolist() == [False, False, True] and np.array_equal(out[:2], adv[:2])


class WrongOnFirstCall(nn.Module):
    """A randomised model (``randomized`` True) whose first forward pass happens to
    misclassify every image (logits rolled by one class) and every later one is ``model``'s."""

    randomized = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = self.model(x)
        return logits.roll(1, dims=1) if self.calls == 1 else logits


def test_on_a_randomised_model_images_one_clean_draw_misclassifies_are_still_attacked(task):
    """The clean prediction of a randomised model is one draw: an image it gets wrong is
    still classified correctly by most other draws, so it must be attacked, not returned
    unperturbed (that counted such images robust and left AutoAttack weaker than PGD)."""
    model, x, y = task
    x, y = x[:30], y[:30]
    lucky = WrongOnFirstCall(model)
    attack = build_attack("autoattack", {"eps": EPS, "eot_iter": 2, **CHEAP})
    adv = attack(lucky, x, y, torch.Generator().manual_seed(0))
    assert lucky.calls > 1 and attack._version == "rand"
    assert accuracy(model, adv, y) < accuracy(model, x, y)  # images broken despite the first draw
    assert (adv != x).flatten(1).any(1).float().mean() > 0.5


def test_eot_apgd_attacks_every_image_the_ensemble_sends():
    """APGD skips the images its pre-restart ``predict`` calls misclassified; with
    ``attack_labels`` set, the EOT classifier answers "not yet adversarial" for every
    image once (label highest; targeted: target lowest), then falls back to the mean of draws."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, K))
    clf = PyTorchClassifier(net, loss=nn.CrossEntropyLoss(), input_shape=(3, SIDE, SIDE), nb_classes=K,
                            clip_values=(0.0, 1.0), preprocessing=None, device_type="cpu")
    xs = np.random.default_rng(0).random((6, 3, SIDE, SIDE), dtype=np.float32)
    labels = np.array([0, 3, 9, 1, 5, 2])
    for targeted in (False, True):
        eot = _with_eot(clf, 2, targeted)
        eot.attack_labels = labels
        pred = eot.predict(xs).argmax(1)
        assert (pred == labels).all() if not targeted else (pred != labels).all()
        np.testing.assert_allclose(eot.predict(xs), clf.predict(xs), rtol=1e-5, atol=1e-6)  # once only


def test_auto_version_runs_rand_exactly_on_randomised_models(task, monkeypatch):
    """``version: auto`` (the default) picks the EOT ensemble where the forward pass is random
    (a module with a true ``randomized`` attribute) and the standard one elsewhere."""
    model, x, y = task
    noisy = NoisyInput(model, 0.1)
    noisy.randomized = True
    seen = []
    attack = build_attack("autoattack", {"eps": EPS, "eot_iter": 3, **CHEAP})
    real = attack.generate
    monkeypatch.setattr(attack, "generate", lambda *a: (seen.append(attack._version), real(*a))[1])
    attack(noisy, x[:8], y[:8], torch.Generator().manual_seed(0))
    attack(model, x[:8], y[:8], torch.Generator().manual_seed(0))
    assert seen[0] == "rand" and seen[-1] == "standard"


@pytest.mark.e2e
def test_autoattack_is_at_least_as_strong_as_pgd20_on_the_smoke_baseline(smoke_project):
    from pipeline.checkpoint import build_from_spec, load_checkpoint
    from pipeline.data import load_tensors, to_float

    work = smoke_project["dir"]
    model = build_from_spec(load_checkpoint(work / "models" / "resnet20" / "baseline.pt")).float().eval()
    x_u8, y = load_tensors(work / "data" / "prepared" / "cifar10", "test")
    x, y = to_float(x_u8[:100]), y[:100]  # 100 images: CI time
    # 1/255: a naturally trained CIFAR-10 ResNet loses most, not all, of its accuracy
    # to PGD at 1/255 (at 8/255 nothing is left and both attacks would read 0), and the
    # smoke baseline, trained 6 epochs on 3,000 images, is less confident, so PGD-20
    # leaves correct images for AutoAttack to do better on.
    eps = 1 / 255
    pgd = build_attack("pgd", {"eps": eps, "step_size": eps / 4, "steps": 20, "random_start": True})
    x_pgd = pgd(model, x, y, torch.Generator().manual_seed(0))
    # the standard components on a CPU budget (about a minute for 100 images): APGD
    # 50 iterations (PGD's 20 and more), the 3 most likely targets, Square 200 queries
    aa = build_attack("autoattack", {"eps": eps, "n_iter": 50, "n_target_classes": 3, "square_n_queries": 200,
                                     "batch_size": 100})
    x_aa = aa(model, x, y, torch.Generator().manual_seed(0))
    clean, robust_pgd, robust_aa = accuracy(model, x, y), accuracy(model, x_pgd, y), accuracy(model, x_aa, y)
    assert x_aa.dtype == torch.float32 and x_aa.min() >= 0 and x_aa.max() <= 1
    assert (x_aa - x).abs().amax() <= eps + 1e-6
    assert robust_pgd > 0, f"PGD-20 at 1/255 reached 0 (clean {clean:.3f}): lower eps for a meaningful comparison"
    assert robust_aa <= robust_pgd, f"autoattack {robust_aa:.3f}, PGD-20 {robust_pgd:.3f}, clean {clean:.3f}"
    assert robust_aa < clean
