"""PGD adversarial training (Madry et al. 2018) and FGSM-RS (Wong et al. 2020): the
training loss is computed on attacked examples inside the eps-ball; BlurNet's penalty
enters the loss of a model that carries it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pydantic import ValidationError

import pipeline.defenses.adversarial as adversarial_module
from pipeline.checkpoint import model_spec
from pipeline.defenses.adversarial import AdversarialTrainingParams, adversarial_examples
from pipeline.models import build_model
from pipeline.train import Trainer
from tests.test_train import data, spec, train_cfg


def test_threat_models_follow_the_papers():
    pgd = AdversarialTrainingParams().threat_model()
    assert (pgd.norm, pgd.eps, pgd.step_size, pgd.steps, pgd.random_start) == ("linf", 8 / 255, 2 / 255, 7, True)
    fast = AdversarialTrainingParams(method="fgsm_rs").threat_model()
    assert (fast.steps, fast.step_size, fast.random_start) == (1, pytest.approx(1.25 * 8 / 255), True)
    mnist = AdversarialTrainingParams(eps=0.3, step_size=0.01, steps=40).threat_model()
    assert (mnist.eps, mnist.step_size, mnist.steps) == (0.3, 0.01, 40)
    assert AdversarialTrainingParams(eps="4/255").eps == pytest.approx(4 / 255)


@pytest.mark.parametrize("bad", [{"eps": 8}, {"eps": 2 / 255, "step_size": 8 / 255}, {"steps": 0}, {"epsilon": 0.1}])
def test_bad_adversarial_params_are_rejected(bad):
    with pytest.raises(ValidationError):
        AdversarialTrainingParams(**bad)


def test_adversarial_examples_stay_in_the_ball_and_restore_the_model():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    threat = AdversarialTrainingParams().threat_model()
    xa = adversarial_examples(model, x, y, threat, torch.Generator().manual_seed(0))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert (xa - x).abs().max() <= 8 / 255 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert (xa - x).abs().max() > 4 / 255  # moved, not the clean batch
    with torch.no_grad():
        model.eval()
        loss_clean = torch.nn.functional.cross_entropy(model(x), y)
        loss_adv = torch.nn.functional.cross_entropy(model(xa), y)
    assert loss_adv > loss_clean  # the attack raised the loss


def test_training_examples_start_at_a_random_point_of_the_ball():
    """Madry et al. start PGD at a uniformly random point of the eps-ball: the training
    examples depend on the generator's seed, and differ from PGD started at the clean image."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).train()
    x, y = 0.1 + 0.8 * torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    threat = AdversarialTrainingParams(steps=2).threat_model()
    assert threat.random_start
    a = adversarial_examples(model, x, y, threat, torch.Generator().manual_seed(0))
    b = adversarial_examples(model, x, y, threat, torch.Generator().manual_seed(1))
    plain = adversarial_examples(model, x, y, dataclasses.replace(threat, random_start=False),
                                 torch.Generator().manual_seed(0))
    assert ((a - b).abs() > 1e-6).float().mean() > 0.3  # another seed, other examples
    assert ((a - plain).abs() > 1e-6).float().mean() > 0.3  # not PGD from the clean image
    assert torch.equal(a, adversarial_examples(model, x, y, threat, torch.Generator().manual_seed(0)))


def test_fgsm_rs_steps_from_a_uniform_start():
    """Wong et al. 2020, Algorithm 3: delta = clip(U(-eps, eps) + 1.25 eps sign(g), -eps, eps).
    Where the start lies below -0.25 eps against the gradient sign (probability 3/8) the
    value ends strictly inside the ball; from the clean image every value would sit at +-eps."""
    torch.manual_seed(1)
    model = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).train()
    x, y = 0.1 + 0.8 * torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    eps = 8 / 255
    xa = adversarial_examples(model, x, y, AdversarialTrainingParams(method="fgsm_rs").threat_model(),
                              torch.Generator().manual_seed(0))
    d = (xa - x).abs()
    assert d.max() <= eps + 1e-6
    inside = float((d < eps - 1e-4).float().mean())
    assert inside == pytest.approx(3 / 8, abs=0.02)  # 49,152 values: standard error 0.002


def test_training_steps_are_taken_on_the_attacked_batch(monkeypatch):
    made, seen = [], []
    original = adversarial_module.adversarial_examples

    def recording(model, x, y, threat, gen):
        xa = original(model, x, y, threat, gen)
        made.append((x.clone(), xa.clone()))
        return xa

    monkeypatch.setattr(adversarial_module, "adversarial_examples", recording)  # what the training hook calls
    cfg = train_cfg(epochs=1, adversarial={"eps": 8 / 255, "steps": 2, "eval_images": 16, "eval_steps": 5})
    trainer = Trainer(spec(), data(64), data(32, seed=1), cfg, seed=0)
    trainer.model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()) if m.training else None)
    m = trainer.run_epoch(0)
    assert len(seen) == 2 and len(made) >= 2  # two training batches; more calls for the held-out check
    for (x, xa), inp in zip(made[:2], seen, strict=True):
        assert torch.equal(inp, xa)  # the training forward saw the attacked batch ...
        assert not torch.equal(inp, x)  # ... not the clean one
        assert (xa - x).abs().max() <= 8 / 255 + 1e-6
    # the held-out robust accuracy, recomputed from the examples the held-out check made:
    # the first eval_images test images, attacked, classified by the trained model
    held = made[2:]
    test_x, test_y = data(32, seed=1)
    assert torch.equal(torch.cat([x for x, _ in held]), test_x[:16].float() / 255)
    with torch.no_grad():
        trainer.model.eval()
        pred_adv = trainer.model(torch.cat([xa for _, xa in held])).argmax(1)
        pred_clean = trainer.model(test_x[:16].float() / 255).argmax(1)
    assert m["test_robust_accuracy"] == float((pred_adv == test_y[:16]).float().mean())
    # PGD-5 flips the one held-out image this 1-epoch model gets right: robust 0 / 16 < clean 1 / 16
    assert m["test_robust_accuracy"] < float((pred_clean == test_y[:16]).float().mean())


def test_blurnet_penalty_enters_the_training_loss():
    s = model_spec("resnet20", 10, [0.5] * 3, [0.25] * 3, None,
                   [{"name": "blurnet", "kernel": "learned", "size": 3, "linf_weight": 0.5, "tv_weight": 1e-4}])
    trainer = Trainer(s, data(64), data(32, seed=1), train_cfg(epochs=1), seed=0)
    m = trainer.run_epoch(0)
    assert m["train_penalty"] > 0
    plain = Trainer(spec(), data(64), data(32, seed=1), train_cfg(epochs=1), seed=0).run_epoch(0)
    assert "train_penalty" not in plain
