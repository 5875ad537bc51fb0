"""The project's FGSM and PGD against the Adversarial Robustness Toolbox (ART),
the reference implementation the reproduced papers' numbers are usually taken
with. All in float32.

* FGSM: ``pipeline.attacks.pgd.fgsm`` equals ART's ``FastGradientMethod``
  (L-inf) image for image, untargeted and targeted;
* PGD (e2e, on the smoke profile's baseline ResNet-20 and 500 of its test
  images, a seeded prefix covering every class): the robust accuracy under the
  project's PGD-20 at eps 2/255 (where it is well away from 0 and from the clean
  accuracy, so a weaker attack would show) is within two binomial standard
  errors of 500 images of ART's ``ProjectedGradientDescentPyTorch`` with the
  same settings. The random starts differ (torch generator here, numpy's global
  state in ART), so the images differ; the accuracies must not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

art = pytest.importorskip("art")

from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescentPyTorch  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

from pipeline.attacks.pgd import ThreatModel, fgsm, pgd  # noqa: E402
from pipeline.models import Normalized  # noqa: E402

N_IMAGES = 500


def art_classifier(model: nn.Module, shape: tuple[int, ...], nb_classes: int) -> PyTorchClassifier:
    """ART's view of a project model: inputs in [0, 1], no preprocessing (the model normalises)."""
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=nb_classes,
                             clip_values=(0.0, 1.0), preprocessing=None, device_type="cpu")


def tiny_convnet() -> nn.Module:
    """A random (seeded) 10-class conv net on 3 x 8 x 8 images, eval mode, float32."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10))
    return Normalized(net, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).eval()


@pytest.mark.parametrize("target", [None, 3])
def test_fgsm_equals_art_fast_gradient_method(target):
    model = tiny_convnet()
    g = torch.Generator().manual_seed(1)
    # 16 images, one ART batch: ART's loss is the batch mean, ours the sum; a
    # power-of-two batch makes the scale exact, so the gradient signs agree bit for bit.
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    eps = 8 / 255
    ours = fgsm(model, x, y, eps, target=target)
    clf = art_classifier(model, (3, 8, 8), 10)
    # ART's targeted convention: y holds the target labels and the step goes down
    # the target's loss (ART multiplies the gradient by -1); ours ascends minus that loss.
    ref_attack = FastGradientMethod(clf, norm=np.inf, eps=eps, targeted=target is not None, batch_size=16)
    labels = y.numpy() if target is None else np.full(16, target)
    ref = torch.from_numpy(ref_attack.generate(x.numpy(), y=labels))
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # and the attack did something: every value moved by eps or hit the [0, 1] clip
    moved = (ours - x).abs()
    assert ((moved - eps).abs() < 1e-6).float().mean() > 0.9


@pytest.mark.e2e
def test_pgd20_robust_accuracy_matches_art_on_the_smoke_baseline(smoke_project):
    from pipeline.checkpoint import build_from_spec, load_checkpoint
    from pipeline.data import load_tensors, to_float
    from pipeline.evaluation import test_order

    work = smoke_project["dir"]
    model = build_from_spec(load_checkpoint(work / "models" / "resnet20" / "baseline.pt")).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x_u8, y = load_tensors(work / "data" / "prepared" / "cifar10", "test")
    assert len(x_u8) == 1000
    order = test_order(len(y), seed=0)[:N_IMAGES]  # the evaluate stage's seeded order: every class, not 5 of 10
    x, y = to_float(x_u8)[order], y[order]
    assert x.dtype == torch.float32 and len(set(y.tolist())) == 10
    # A budget where PGD-20 leaves the baseline well away from 0 % and from its clean
    # accuracy, so that a weaker (or broken) PGD shows as a higher robust accuracy than
    # ART's. At 8/255 both sit at 0 %, where any attack that moves the images agrees with
    # ART. Measured on a smoke-profile baseline: clean 0.48, PGD-20 at 2/255 0.29 (ours and
    # ART alike), at 1/255 0.39.
    eps, step, steps, bs = 2 / 255, 0.5 / 255, 20, 250

    threat = ThreatModel(norm="linf", eps=eps, step_size=step, steps=steps, random_start=True, restarts=1)
    gen = torch.Generator().manual_seed(0)
    ours = torch.cat([pgd(model, x[s : s + bs], y[s : s + bs], threat, generator=gen, record_loss=False).x_adv
                      for s in range(0, len(x), bs)])

    clf = art_classifier(model, (3, 32, 32), int(model(x[:1]).shape[1]))
    ref_attack = ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=step, max_iter=steps,
                                                 num_random_init=1, batch_size=bs, verbose=False)
    state = np.random.get_state()
    np.random.seed(0)  # ART draws its random start from numpy's global state
    try:
        ref = torch.from_numpy(ref_attack.generate(x.numpy(), y=y.numpy()))
    finally:
        np.random.set_state(state)

    with torch.no_grad():
        def acc(images: torch.Tensor) -> float:
            """Accuracy of the model on ``images`` (labels ``y``), in batches."""
            return float(torch.cat([model(images[s : s + bs]).argmax(1) for s in range(0, len(x), bs)]).eq(y).float().mean())

        clean, robust_ours, robust_art = acc(x), acc(ours), acc(ref)
    for adv in (ours, ref):
        assert adv.dtype == torch.float32 and adv.min() >= 0 and adv.max() <= 1
        assert (adv - x).abs().max() <= eps + 1e-6
    # Binomial noise of an accuracy over 500 images: SE = sqrt(p (1 - p) / 500), 0.020 at
    # p = 0.3 (at most 0.022). Both attacks see the same images, so they differ only by
    # their random starts, far less than that; 2 SE is the tolerance.
    p = (robust_ours + robust_art) / 2
    se = max((p * (1 - p) / N_IMAGES) ** 0.5, 0.5 / N_IMAGES)
    report = f"robust accuracy: project PGD-20 {robust_ours:.3f}, ART {robust_art:.3f} (clean {clean:.3f}, SE {se:.3f})"
    assert 5 * se < robust_art < clean - 3 * se, f"budget not informative: {report}"  # away from 0 and from clean
    assert abs(robust_ours - robust_art) <= 2 * se, report
