"""The evaluate matrix: (model, defense, attack) cells on the test set.

Every cell is computed from class predictions on the same test images at the
same fixed random patch placements (drawn once from ``evaluate.placement_seed``),
so defenses and attacks differ in nothing else. Attacks:

* ``none``: clean images;
* ``advp``, ``lavan``: each universal patch of ``generate_patches`` (one per
  seed), made on the undefended model and transferred to every defense (as the
  FNC authors evaluate);
* ``occlusion``: the control of a same-size patch of uniform noise at the same
  placements (DESIGN.md: accuracy under a patch mixes occlusion and attack);
  AdvP and LaVAN patches have the same size, so it serves both;
* any registered per-image attack (:mod:`pipeline.attacks.base`: FGSM, PGD,
  Mask-FGSM, masked PGD, DeepFool, JSMA, C&W, One Pixel), run white-box on each
  (defended) model itself, on the first ``n_images`` of the evaluated images;
* ``per_image_worst``: per image, the worst case over the untargeted per-image attacks
  of PGD's threat model (:func:`per_image_worst_metrics`).

Spread: each patch metric is computed per patch seed, then reported as the mean
and the standard deviation over seeds (``<metric>_std``).

Subsets: the test split is stored sorted by class, so every subset
(``evaluate.test_images``, an attack's ``n_images``) is a prefix of one fixed
random permutation (:func:`test_order`): all classes are represented and a
smaller subset is contained in a larger one.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.attacks.patch import Placements, apply_patch, sample_placements
from pipeline.checkpoint import build_from_spec
from pipeline.metrics import (
    attack_success_rate,
    clean_accuracy,
    fooling_rate,
    rate_interval,
    robust_accuracy,
    wilson_interval,
)
from pipeline.train import default_device


def test_order(n: int, seed: int) -> torch.Tensor:
    """A fixed random permutation of ``range(n)`` (int64), the order subsets are prefixes of."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def fixed_placements(n_images: int, placements: int, image_size: tuple[int, int], side: int, seed: int) -> Placements:
    """``placements`` x ``n_images`` placements, entry ``p * n_images + i`` for image i."""
    gen = torch.Generator().manual_seed(seed)
    return sample_placements(n_images * placements, image_size, side, generator=gen)


def noise_patches(n: int, side: int, seed: int, channels: int = 3) -> torch.Tensor:
    """float32 (n, channels, side, side) uniform noise in [0, 1]: the occlusion control."""
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def predict_shard(
    spec: dict[str, Any],
    x: torch.Tensor,
    placements: Placements,
    patches: dict[str, torch.Tensor],
    batch_size: int = 500,
    num_threads: int = 1,
) -> dict[str, torch.Tensor]:
    """Predictions of one model on one shard, clean and under every patch.

    Args:
        spec: checkpoint dict of the (defended) model.
        x: uint8 (n, 3, H, W) test images of the shard.
        placements: ``P * n`` placements, entry ``p * n + i`` for image i.
        patches: attack name -> float (S, 3, s, s) patches in [0, 1].
        batch_size: images per forward pass.
        num_threads: torch threads of this task.

    Returns:
        ``{"none": int64 (n,), <attack>: int64 (S, P, n)}`` on the CPU.
    """
    torch.set_num_threads(max(1, num_threads))
    device = default_device()
    model = build_from_spec(spec).to(device)
    n = len(x)
    n_placements = len(placements) // max(n, 1)
    out = {"none": torch.empty(n, dtype=torch.int64)}
    for name, p in patches.items():
        out[name] = torch.empty(len(p), n_placements, n, dtype=torch.int64)
    for s in range(0, n, batch_size):
        xb = x[s : s + batch_size].to(device).float().div_(255)
        out["none"][s : s + len(xb)] = model(xb).argmax(1).cpu()
        for name, p in patches.items():
            for k in range(len(p)):
                for j in range(n_placements):
                    pl = placements[slice(j * n + s, j * n + s + len(xb))]
                    logits = model(apply_patch(xb, p[k].to(device), pl))
                    out[name][k, j, s : s + len(xb)] = logits.argmax(1).cpu()
    return out


@torch.no_grad()
def score_patches(
    spec: dict[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    patches: torch.Tensor,
    placements: Placements,
    target: int | None,
    attack: str = "advp",
    batch_size: int = 500,
    num_threads: int = 1,
) -> dict[str, torch.Tensor]:
    """How well each candidate patch attacks one model on held-out images: what the
    adaptive patch search selects by (on the validation split, never the test split).

    Args:
        spec: checkpoint dict of the (defended) model.
        x: uint8 (n, 3, H, W) validation images (for a targeted patch, none of the target class).
        y: int64 (n,) their labels.
        patches: float (K, 3, s, s) candidates in [0, 1].
        placements: n placements (one per image, the same for every candidate).
        target: the patch's target class, or None.
        attack: the loss of :func:`~pipeline.attacks.patch.patch_loss` (``advp`` / ``lavan``).
        batch_size: images per forward pass.
        num_threads: torch threads of this task.

    Returns:
        ``{"robust_accuracy": float64 (K,), "loss": float64 (K,)}`` on the CPU: the accuracy
        (:func:`pipeline.metrics.robust_accuracy`) and the mean patch loss of each candidate;
        lower is a stronger patch on both.

    Raises:
        ValueError: placements and images differ in number.
    """
    from pipeline.attacks.patch import patch_loss

    if len(placements) != len(x):
        raise ValueError(f"{len(placements)} placements for {len(x)} images")
    torch.set_num_threads(max(1, num_threads))
    device = default_device()
    model = build_from_spec(spec).to(device).eval()
    acc = torch.empty(len(patches), dtype=torch.float64)
    loss = torch.empty(len(patches), dtype=torch.float64)
    for k, patch in enumerate(patches.to(device)):
        preds, total = [], 0.0
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].to(device).float().div_(255)
            yb = y[s : s + batch_size].to(device)
            logits = model(apply_patch(xb, patch, placements[slice(s, s + len(xb))])).float()
            preds.append(logits.argmax(1).cpu())
            total += float(patch_loss(logits, yb, target, attack)) * len(xb)
        acc[k] = robust_accuracy(torch.cat(preds), y, target).value
        loss[k] = total / max(len(x), 1)
    return {"robust_accuracy": acc, "loss": loss}


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True)) if len(vals) > 1 else 0.0


def cell_metrics(
    pred_clean: torch.Tensor, pred_adv: torch.Tensor | None, labels: torch.Tensor, target: int | None
) -> dict[str, float | int]:
    """Metrics of one (model, defense, attack) cell.

    Args:
        pred_clean: int64 (N,) clean predictions.
        pred_adv: int64 (S, P, N) predictions under S patches at P placements,
            or None for the clean cell.
        labels: int64 (N,).
        target: the patch's target class, or None (untargeted).

    Returns:
        Clean cell: ``clean_accuracy``, its 95 % Wilson interval (``clean_accuracy_ci_low`` /
        ``_high``) and ``n_images``. Attack cell: ``clean_accuracy`` and
        ``robust_accuracy``, ``attack_success_rate``, ``fooling_rate`` (means
        over the S seeds; each pools the P placements), their ``_std`` over
        seeds, ``n_images`` (images counted by robust accuracy and the
        success rate), ``n_seeds`` and ``placements``.
    """
    clean = clean_accuracy(pred_clean, labels)
    if pred_adv is None:
        low, high = wilson_interval(int((pred_clean == labels).sum()), clean.n_images)
        return {"clean_accuracy": clean.value, "clean_accuracy_ci_low": low, "clean_accuracy_ci_high": high,
                "n_images": clean.n_images}
    n_seeds, n_placements, _ = pred_adv.shape
    per_seed = cell_metrics_per_seed(pred_clean, pred_adv, labels, target)
    out: dict[str, float | int] = {"clean_accuracy": clean.value}
    for name, values in per_seed.items():
        out[name], out[f"{name}_std"] = _mean_std(values)
    n_counted = robust_accuracy(pred_clean, labels, target).n_images
    out.update({"n_images": n_counted, "n_seeds": n_seeds, "placements": n_placements})
    return out


def worst_case_metrics(
    pred_clean: torch.Tensor, preds: dict[str, torch.Tensor], labels: torch.Tensor, target: int | None
) -> dict[str, float | int | str]:
    """The worst case over several ways of making one universal patch attack (transferred,
    adaptive, BPDA, EOT), per patch seed: what a defense's robustness to the attack is, since an
    evaluation can only bound robustness from above (Carlini et al., "On Evaluating Adversarial
    Robustness", 2019, Section 3).

    Args:
        pred_clean: int64 (N,) clean predictions.
        preds: cell name -> int64 (S, P, N) predictions under its S patches (one per seed, the
            same seeds in every cell) at P placements.
        labels: int64 (N,).
        target: the patch's target class, or None.

    Returns:
        ``robust_accuracy``: the mean over seeds of the lowest robust accuracy over the cells,
        ``attack_success_rate``: the mean over seeds of the highest attack success rate, their
        ``_std`` over seeds, ``worst_attack`` (the cell of the lowest robust accuracy of each
        seed, comma-separated), ``clean_accuracy``, ``n_images``, ``n_seeds``, ``placements``.

    Raises:
        ValueError: no cells, or cells with different numbers of seeds or placements.
    """
    if not preds or len({tuple(p.shape) for p in preds.values()}) != 1:
        raise ValueError(f"worst case needs cells of equal shape (S, P, N), got "
                         f"{ {a: tuple(p.shape) for a, p in preds.items()} }")
    per_cell = {a: cell_metrics_per_seed(pred_clean, p, labels, target) for a, p in preds.items()}
    n_seeds = len(next(iter(per_cell.values()))["robust_accuracy"])
    worst, robust, success = [], [], []
    for k in range(n_seeds):
        a = min(per_cell, key=lambda c: per_cell[c]["robust_accuracy"][k])  # ties: the first cell listed
        worst.append(a)
        robust.append(per_cell[a]["robust_accuracy"][k])
        success.append(max(m["attack_success_rate"][k] for m in per_cell.values()))
    first = next(iter(preds.values()))
    out: dict[str, float | int | str] = {"clean_accuracy": clean_accuracy(pred_clean, labels).value}
    out["robust_accuracy"], out["robust_accuracy_std"] = _mean_std(robust)
    out["attack_success_rate"], out["attack_success_rate_std"] = _mean_std(success)
    over = labels != target if target is not None else torch.ones_like(labels, dtype=torch.bool)
    out.update({"worst_attack": ",".join(worst), "n_images": int(over.sum()), "n_seeds": n_seeds,
                "placements": first.shape[1]})
    return out


def cell_metrics_per_seed(
    pred_clean: torch.Tensor, pred_adv: torch.Tensor, labels: torch.Tensor, target: int | None
) -> dict[str, list[float]]:
    """Robust accuracy, attack success rate and fooling rate of every patch seed of a cell.

    Args:
        pred_clean: int64 (N,); pred_adv: int64 (S, P, N); labels: int64 (N,); target: class or None.

    Returns:
        metric -> S fractions in [0, 1] (each pools the P placements).
    """
    n_placements = pred_adv.shape[1]
    c, y = pred_clean.repeat(n_placements), labels.repeat(n_placements)
    out: dict[str, list[float]] = {"robust_accuracy": [], "attack_success_rate": [], "fooling_rate": []}
    for adv in pred_adv.reshape(len(pred_adv), -1):
        out["robust_accuracy"].append(robust_accuracy(adv, y, target).value)
        out["attack_success_rate"].append(attack_success_rate(c, adv, y, target).value)
        out["fooling_rate"].append(fooling_rate(c, adv).value)
    return out


def fit_attack(
    spec: dict[str, Any],
    attack: str,
    attack_params: dict[str, Any],
    fit_data: tuple[torch.Tensor, torch.Tensor],
    num_threads: int = 1,
) -> Any:
    """Fit a data-dependent attack once on one model; its state goes to every shard.

    Args:
        spec: checkpoint dict of the (defended) model.
        attack: registered attack name whose class has ``needs_fit``.
        attack_params: its validated params (a dict).
        fit_data: uint8 (N, 3, H, W) training images, int64 (N,) labels.
        num_threads: torch threads of this task.

    Returns:
        The attack's :meth:`~pipeline.attacks.base.Attack.fitted_state` (for masked
        PGD the pixel robustness map, float (H, W) on the CPU).
    """
    from pipeline.attacks.base import build_attack

    torch.set_num_threads(max(1, num_threads))
    device = default_device()
    model = build_from_spec(spec).to(device).eval()
    atk = build_attack(attack, attack_params)
    fx, fy = fit_data
    atk.fit(model, fx.to(device).float().div_(255), fy.to(device))
    return atk.fitted_state()


def attack_shard(
    spec: dict[str, Any],
    attack: str,
    attack_params: dict[str, Any],
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    fit_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_threads: int = 1,
    fitted: Any = None,
) -> dict[str, Any]:
    """Run per-image attack ``attack`` on one shard of test images.

    Args:
        spec: checkpoint dict of the (defended) model; the attack is white-box on it.
        attack: registered attack name (:func:`pipeline.attacks.base.list_attacks`).
        attack_params: its validated params (a dict).
        x: uint8 (n, 3, H, W) test images; y: int64 (n,) labels.
        seed: seeds the attack's randomness (random starts, populations).
        fit_data: uint8 training images and labels for attacks with ``needs_fit``.
        num_threads: torch threads of this task.
        fitted: the state :func:`fit_attack` returned for this model; when given,
            ``fit_data`` is not used (the fit is done once per model, not per shard).

    Returns:
        ``{"pred_clean": int64 (n,), "pred_adv": int64 (n,), "sizes": {metric:
        float (n,)}}`` (per-image perturbation sizes of
        :func:`pipeline.metrics.perturbation_sizes`), on the CPU.
    """
    from pipeline.attacks.base import build_attack
    from pipeline.metrics import perturbation_sizes

    torch.set_num_threads(max(1, num_threads))
    device = default_device()
    model = build_from_spec(spec).to(device).eval()
    atk = build_attack(attack, attack_params)
    if atk.needs_fit and fitted is not None:
        atk.load_fitted_state(fitted)
    elif atk.needs_fit:
        if fit_data is None:
            raise ValueError(f"attack {attack!r} needs training images (fit_data)")
        fx, fy = fit_data
        atk.fit(model, fx.to(device).float().div_(255), fy.to(device))
    xf = x.to(device).float().div_(255)
    yd = y.to(device)
    x_adv = atk(model, xf, yd, torch.Generator().manual_seed(seed))
    bs = attack_params.get("batch_size", 250)
    with torch.no_grad():
        pred_clean = torch.cat([model(xf[s : s + bs]).argmax(1) for s in range(0, len(xf), bs)]).cpu()
        pred_adv = torch.cat([model(x_adv[s : s + bs]).argmax(1) for s in range(0, len(xf), bs)]).cpu()
    sizes = {k: v.cpu() for k, v in perturbation_sizes(xf, x_adv).items()}
    return {"pred_clean": pred_clean, "pred_adv": pred_adv, "sizes": sizes}


def attack_cell_metrics(
    pred_clean: torch.Tensor,
    pred_adv: torch.Tensor,
    labels: torch.Tensor,
    target: int | None,
    sizes: dict[str, torch.Tensor],
) -> dict[str, float | int]:
    """Metrics of a per-image attack cell.

    Args:
        pred_clean, pred_adv: int64 (n,) predictions on the clean and attacked images.
        labels: int64 (n,).
        target: the attack's target class, or None.
        sizes: per-image perturbation sizes, float (n,) each.

    Returns:
        ``clean_accuracy`` (on the attacked subset), ``robust_accuracy`` with its 95 %
        Wilson interval (``robust_accuracy_ci_low`` / ``_high``), ``attack_success_rate``,
        ``fooling_rate``, ``n_images`` (images robust accuracy counts over), and the mean of each perturbation size over all
        attacked images (``l0`` fraction of values changed, ``l2``, ``linf``,
        ``l2_dissimilarity``, ``ssim``).
    """
    out: dict[str, float | int] = {"clean_accuracy": clean_accuracy(pred_clean, labels).value}
    ra = robust_accuracy(pred_adv, labels, target)
    out["robust_accuracy"] = ra.value
    out["robust_accuracy_ci_low"], out["robust_accuracy_ci_high"] = rate_interval(ra.value, ra.n_images)
    out["attack_success_rate"] = attack_success_rate(pred_clean, pred_adv, labels, target).value
    out["fooling_rate"] = fooling_rate(pred_clean, pred_adv).value
    out["n_images"] = ra.n_images
    for name, values in sizes.items():
        out[name] = float(values.double().mean()) if len(values) else math.nan
    return out


def per_image_worst_metrics(cells: dict[str, dict[str, Any]], labels: torch.Tensor) -> dict[str, float | int | str]:
    """The per-image worst case over several untargeted attacks of one threat model (e.g.
    PGD with EOT and AutoAttack at the same L-inf ``eps``): an image counts as robust only if
    no attack fools it, as AutoAttack's own ensemble counts its components (Croce and Hein,
    ICML 2020, Section 4) and as Carlini et al. ("On Evaluating Adversarial Robustness",
    2019, Section 3) ask of an evaluation. Its robust accuracy is at most every attack's on
    the same images, by construction; on randomised defenses, where one attack may be the
    stronger on some images and the other on others, it is the number to cite.

    Args:
        cells: attack name -> its per-image cell, each with ``pred_clean`` and ``pred_adv``
            (int64 (n_a,), the first n_a test images) and ``sizes`` (name -> float (n_a,)).
            The first cell's clean predictions are the clean ones (on a randomised model every
            cell drew its own).
        labels: int64 (N,), N >= every n_a.

    Returns:
        :func:`attack_cell_metrics` over the first ``n = min(n_a)`` images, with per image the
        prediction (and the perturbation sizes every cell has) of the first attack listed that
        fools it, of the first attack where none does; plus
        ``worst_attack`` (the attack of the lowest robust accuracy alone on those images) and
        ``attacks`` (the attacks combined, comma-separated).

    Raises:
        ValueError: fewer than two cells.
    """
    if len(cells) < 2:
        raise ValueError(f"a per-image worst case needs at least two attacks, got {list(cells)}")
    n = min(len(c["pred_adv"]) for c in cells.values())
    y = labels[:n]
    first = next(iter(cells.values()))
    preds = torch.stack([c["pred_adv"][:n] for c in cells.values()])  # (A, n)
    # per image, the first attack that fools it; argmax of an all-False column is 0, the first attack
    pick = (preds != y).to(torch.uint8).argmax(0, keepdim=True)
    keys = [k for k in first["sizes"] if all(k in c["sizes"] for c in cells.values())]
    sizes = {k: torch.stack([c["sizes"][k][:n].double() for c in cells.values()]).gather(0, pick)[0] for k in keys}
    pred = preds.gather(0, pick)[0]
    out: dict[str, float | int | str] = dict(attack_cell_metrics(first["pred_clean"][:n], pred, y, None, sizes))
    alone = {a: robust_accuracy(p, y, None).value for a, p in zip(cells, preds, strict=True)}
    out["worst_attack"] = min(alone, key=alone.__getitem__)  # ties: the first listed
    out["attacks"] = ",".join(cells)
    return out
