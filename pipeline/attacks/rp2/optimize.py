"""RP2's objective and its Adam optimisation (Eykholt et al., CVPR 2018, Eq. 3-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks.base import frozen_eval

from .params import RP2Params
from .sticker import _check_mask, apply_rp2, non_printability_score, sticker_colours
from .transforms import Transforms, sample_transforms, transform_images

__all__ = ["rp2_loss_terms", "train_rp2"]


def rp2_loss_terms(
    model: nn.Module,
    victims: torch.Tensor,
    delta: torch.Tensor,
    mask: torch.Tensor,
    cfg: RP2Params,
    tf: Transforms,
) -> dict[str, torch.Tensor]:
    """The terms of RP2's objective for one draw of transforms (all scalar tensors).

    Args:
        model: maps float (M, 3, H, W) in [0, 1] to logits (M, classes).
        victims: float (N, 3, H, W) in [0, 1].
        delta: float (3, H, W).
        mask: (1, H, W) of 0 / 1.
        cfg: settings (target, lam, p, nps_weight, palette, sticker_fill).
        tf: ``eot_samples * N`` transforms; copy ``k`` of victim ``i`` gets transform
            ``k * N + i``.

    Returns:
        ``{"loss", "ce", "norm", "nps", "target_rate"}``: the total
        ``ce + lam * norm + nps_weight * nps``; the mean cross-entropy to the target
        over every transformed copy; ``||M . delta||_p``; the NPS (0 when
        ``nps_weight`` is 0, not computed); the fraction of copies classified as
        the target (no gradient).

    Raises:
        ValueError: ``len(tf)`` is not a multiple of N, or the target is not a class
            of the model.
    """
    n = len(victims)
    if n == 0 or len(tf) % n:
        raise ValueError(f"{len(tf)} transforms for {n} victims; give eot_samples x N")
    copies = len(tf) // n
    adv = apply_rp2(victims, delta, mask, cfg.sticker_fill)
    batch = adv.unsqueeze(0).expand(copies, *adv.shape).reshape(copies * n, *adv.shape[1:])
    logits = model(transform_images(batch, tf))
    if cfg.target >= logits.shape[1]:
        raise ValueError(f"target {cfg.target} is not a class of a model with {logits.shape[1]} outputs")
    target = torch.full((len(logits),), cfg.target, dtype=torch.long, device=logits.device)
    ce = F.cross_entropy(logits, target)
    m = mask.to(delta)
    norm = torch.linalg.vector_norm(m * delta, ord=cfg.p)
    if cfg.nps_weight > 0:
        palette = torch.tensor(cfg.palette, dtype=delta.dtype, device=delta.device)
        nps = non_printability_score(sticker_colours(delta, mask, cfg.sticker_fill), palette)
    else:
        nps = torch.zeros((), device=delta.device, dtype=delta.dtype)
    loss = ce + cfg.lam * norm + cfg.nps_weight * nps
    rate = (logits.detach().argmax(1) == cfg.target).float().mean()
    return {"loss": loss, "ce": ce, "norm": norm, "nps": nps, "target_rate": rate}


def train_rp2(
    model: nn.Module,
    victims_uint8: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    cfg: RP2Params,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Optimise one RP2 sticker perturbation over the victim set with Adam.

    Every step draws ``eot_samples`` transforms per victim (:func:`sample_transforms`),
    evaluates :func:`rp2_loss_terms` on all ``eot_samples x N`` copies in one batch and
    takes one Adam step (betas 0.9 / 0.999, as the authors) on ``delta``; then
    ``delta`` is zeroed outside the mask and clipped to ``[-1, 1]`` (``[-fill, 1 -
    fill]`` with ``sticker_fill``). ``delta`` starts at zero. The model is used in
    eval mode with its parameters frozen; both are restored afterwards.

    Args:
        model: maps float (M, 3, H, W) in [0, 1] to logits (a
            :class:`pipeline.models.Normalized` network); moved to ``device``.
        victims_uint8: uint8 (N, 3, H, W), 0-255 (RP2's 40 stop signs,
            :func:`pipeline.data.rp2.load_victims`).
        labels: int64 (N,), the victims' true classes (14 for stop signs on GTSRB);
            none may be the target.
        mask: (1, H, W) or (H, W) of exactly 0 / 1 (:func:`pipeline.data.rp2.load_mask`).
        cfg: the attack settings.
        seed: seeds the transforms.
        device: where to compute.

    Returns:
        ``(delta, history)``: float32 (3, H, W) on the CPU, exactly 0 outside the
        mask, in [-1, 1] (apply it with :func:`apply_rp2` and the same
        ``sticker_fill``); and per-step lists (length ``steps``) of the terms of
        :func:`rp2_loss_terms` (``loss``, ``ce``, ``norm``, ``nps``, ``target_rate``)
        as floats.

    Raises:
        ValueError: victims not uint8 (N, 3, H, W), labels not (N,), a victim of
            the target class, a bad mask, or a target outside the model's classes.
    """
    if victims_uint8.dtype != torch.uint8 or victims_uint8.ndim != 4 or victims_uint8.shape[1] != 3:
        raise ValueError(f"victims must be uint8 (N, 3, H, W), got {victims_uint8.dtype} {tuple(victims_uint8.shape)}")
    n, _, h, w = victims_uint8.shape
    if n == 0 or labels.shape != (n,):
        raise ValueError(f"expected N >= 1 victims and labels (N,), got {n} victims and labels {tuple(labels.shape)}")
    n_target = int((labels == cfg.target).sum())
    if n_target:
        raise ValueError(f"{n_target} victim(s) already of the target class {cfg.target}; drop them")
    m = _check_mask(mask, h, w).to(device)  # bool (1, H, W): no value check per step
    m_float = m.to(torch.float32)
    x = victims_uint8.to(device).float().div_(255)
    lo, hi = (-1.0, 1.0) if cfg.sticker_fill is None else (-cfg.sticker_fill, 1.0 - cfg.sticker_fill)

    gen = torch.Generator().manual_seed(seed)
    delta = torch.zeros(3, h, w, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr, betas=(0.9, 0.999))
    keys = ("loss", "ce", "norm", "nps", "target_rate")
    record = torch.zeros(cfg.steps, len(keys), device=device)
    with frozen_eval(model.to(device)):
        for step in range(cfg.steps):
            tf = sample_transforms(cfg.eot_samples * n, cfg, gen)
            terms = rp2_loss_terms(model, x, delta, m, cfg, tf)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            with torch.no_grad():
                delta.mul_(m_float).clamp_(lo, hi)
                record[step] = torch.stack([terms[k].detach().float() for k in keys])
    values = record.cpu().T.tolist()
    return delta.detach().cpu(), dict(zip(keys, values, strict=True))
