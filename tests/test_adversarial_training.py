"""PGD adversarial training (Madry et al. 2018) and FGSM-RS (Wong et al. 2020): the
training loss is computed on attacked examples inside the eps-ball; BlurNet's penalty
enters the loss of a model that carries it."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import pipeline.train as train_module
from pipeline.checkpoint import model_spec
from pipeline.defenses.adversarial import AdversarialTrainingParams, adversarial_examples
from pipeline.models import build_model
from pipeline.train import Trainer
from tests.test_train import CFG, data, spec


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


def test_training_steps_are_taken_on_the_attacked_batch(monkeypatch):
    made, seen = [], []
    original = train_module.adversarial_examples

    def recording(model, x, y, threat, gen):
        xa = original(model, x, y, threat, gen)
        made.append((x.clone(), xa.clone()))
        return xa

    monkeypatch.setattr(train_module, "adversarial_examples", recording)
    cfg = {**CFG, "epochs": 1, "adversarial": {"eps": 8 / 255, "steps": 2, "eval_images": 16, "eval_steps": 2}}
    trainer = Trainer(spec(), data(64), data(32, seed=1), cfg, seed=0)
    trainer.model.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()) if m.training else None)
    m = trainer.run_epoch(0)
    assert len(seen) == 2 and len(made) >= 2  # two training batches; more calls for the held-out check
    for (x, xa), inp in zip(made[:2], seen, strict=True):
        assert torch.equal(inp, xa)  # the training forward saw the attacked batch ...
        assert not torch.equal(inp, x)  # ... not the clean one
        assert (xa - x).abs().max() <= 8 / 255 + 1e-6
    assert 0.0 <= m["test_robust_accuracy"] <= 1.0


def test_blurnet_penalty_enters_the_training_loss():
    s = model_spec("resnet20", 10, [0.5] * 3, [0.25] * 3, None,
                   [{"name": "blurnet", "kernel": "learned", "size": 3, "linf_weight": 0.5, "tv_weight": 1e-4}])
    trainer = Trainer(s, data(64), data(32, seed=1), {**CFG, "epochs": 1}, seed=0)
    m = trainer.run_epoch(0)
    assert m["train_penalty"] > 0
    plain = Trainer(spec(), data(64), data(32, seed=1), {**CFG, "epochs": 1}, seed=0).run_epoch(0)
    assert "train_penalty" not in plain
