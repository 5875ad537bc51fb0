"""RP2, Robust Physical Perturbations (Eykholt et al., "Robust Physical-World Attacks on
Deep Learning Visual Classification", CVPR 2018, Eq. 3-4), the attack BlurNet (Raju and
Lipasti, 2019) defends against.

One sticker perturbation ``delta`` for a whole victim set ``X^V`` (RP2's 40 stop
signs), optimised with Adam::

    argmin_delta  lambda * ||M . delta||_p
                  + E_{x_i ~ X^V, T_i} J(f(T_i(x_i + M . delta)), y*)
                  [+ w_nps * NPS(sticker colours)]

* ``M``: the binary sticker mask (1, H, W) (:mod:`pipeline.data.rp2`); ``delta``
  (3, H, W); ``||.||_p`` over all 3 x H x W entries of ``M . delta`` (p = 1 or 2, as
  ``regloss`` in the authors' code).
* ``J``: cross-entropy to the target class ``y*`` (targeted attack), averaged over the
  victims and their transformed copies.
* ``x_i + M . delta`` (:func:`apply_rp2`) is clipped to [0, 1], as the authors'
  ``noisy_inputs``. With ``sticker_fill`` set, the victim's pixels under the mask are
  first replaced by that grey level (the authors' ``inverse_mask``, setpoint 0.5), so
  the sticker covers the sign instead of adding to it: the masked pixels become
  ``clip(fill + delta)``, the same colours on every victim.
* ``T_i`` (:func:`sample_transforms`, :func:`transform_images`), drawn afresh for each
  of ``eot_samples`` copies of each victim at every step: a rotation about the image
  centre, a scale (zoom), a translation (one bilinear ``grid_sample`` per batch, built
  with ``affine_grid``, border padding) and a brightness factor. **What is
  transformed:** the composite ``x_i + M . delta`` (sign and sticker together), so the
  sticker stays aligned with the sign as a physical sticker does. The warp is linear,
  so before the [0, 1] clips this is ``T_i(x_i) + T_i(M . delta)``: the paper's
  ``T_i`` applied to the perturbation, with the victim moved by the same transform (the
  paper's alignment function). The brightness factor then multiplies every pixel and
  the result is clipped to [0, 1]. The paper samples physical variation from real
  photographs plus synthetic transforms; the victim set supplies the former, this the
  latter.
* ``NPS`` (optional, ``nps_weight > 0``): the non-printability score of Sharif et al.,
  "Accessorize to a Crime", CCS 2016: for each sticker pixel colour ``c`` the product
  over the printable palette ``P`` of ``||c - p||_2``, zero exactly when ``c`` is a
  printable colour (:func:`non_printability_score`). Averaged (not summed) over the
  sticker pixels, so its weight does not scale with the sticker's area.

After every Adam step ``delta`` is set to zero outside the mask and clipped to
``[-1, 1]`` (``[-fill, 1 - fill]`` with ``sticker_fill``, so the sticker colours are in
[0, 1]). The attack is universal over the victim set, like the patches of
:mod:`pipeline.attacks.patch`, so it is not a registered per-image attack.

Reference settings, from the authors' code (evtimovi/robust_physical_perturbations):
GTSRB-CNN (``gtsrb-cnn-attack/run_gennoise_yadav.sh``): true class 14, target 5
("Speed limit (80km/h)"), lambda 0.001, L2, Adam learning rate 0.25, 1000 steps, no
NPS; LISA-CNN (``lisa-cnn-attack/utils.py`` defaults): lambda 0.02, Adam 0.01, 500
steps, NPS on, inverse mask 0.5. Neither applies synthetic transforms in that code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

__all__ = [
    "DEFAULT_PALETTE",
    "RP2Params",
    "Transforms",
    "apply_rp2",
    "evaluate_rp2",
    "l2_dissimilarity",
    "lambda_for_dissimilarity",
    "non_printability_score",
    "rp2_loss_terms",
    "sample_transforms",
    "sticker_colours",
    "train_rp2",
    "transform_images",
]

DEFAULT_PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.0, 0.0),
    (1.0, 1.0, 1.0),
    (0.5, 0.5, 0.5),
    (0.8, 0.1, 0.1),
    (0.5, 0.05, 0.05),
    (0.1, 0.6, 0.2),
    (0.1, 0.2, 0.7),
    (0.95, 0.85, 0.1),
)
"""A small illustrative printable palette, RGB in [0, 1]: black, white, grey, red, dark
red, green, blue, yellow. Not measured: Sharif et al. (2016) and RP2 print a colour chart
and photograph it (RP2 uses 30 such triplets); pass a measured palette for real prints."""


class RP2Params(BaseModel):
    """Settings of :func:`train_rp2` (unknown keys rejected; ``lambda`` may be written
    ``lambda`` or ``lam``).

    Attributes:
        target: target class ``y*`` (>= 0); 5 = GTSRB "Speed limit (80km/h)", RP2's
            GTSRB target.
        lam: ``lambda``, weight of ``||M . delta||_p`` (>= 0); 0.001 in RP2's GTSRB run.
        p: norm of the penalty, 1 or 2 (L2 in RP2's GTSRB run).
        steps: Adam steps, each over every victim x ``eot_samples`` transforms.
        lr: Adam learning rate, pixel units of [0, 1] per step (RP2's GTSRB run used
            0.25 on an unbounded noise; 0.1 here, as ``delta`` is clipped to [-1, 1]).
        rotation: transforms rotate by an angle uniform in [-rotation, rotation]
            degrees (0-180).
        scale: ``(min, max)`` zoom factor, uniform; > 1 enlarges the sign.
        brightness: ``(min, max)`` factor multiplying every pixel, uniform.
        translate: shift uniform in [-translate, translate] x image side, per axis,
            in [0, 0.5).
        nps_weight: weight of the non-printability score (0 switches it off).
        palette: printable colours, RGB triplets in [0, 1] (:data:`DEFAULT_PALETTE`).
        eot_samples: transformed copies of each victim per step (1-256).
        sticker_fill: ``None``: additive perturbation ``x + M . delta`` (the
            equation); a grey level in [0, 1]: the masked pixels are replaced by
            ``fill + delta`` (RP2 code's inverse mask, 0.5 there).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    target: int = Field(5, ge=0, description="target class y*")
    lam: float = Field(0.001, ge=0, alias="lambda", description="weight of ||M delta||_p")
    p: Literal[1, 2] = Field(2, description="norm of the penalty")
    steps: int = Field(1000, ge=1, le=1_000_000)
    lr: float = Field(0.1, gt=0, le=10, description="Adam learning rate, pixel units")
    rotation: float = Field(10.0, ge=0, le=180, description="max rotation, degrees")
    scale: tuple[float, float] = Field((0.9, 1.1), description="(min, max) zoom")
    brightness: tuple[float, float] = Field((0.8, 1.2), description="(min, max) brightness factor")
    translate: float = Field(0.05, ge=0, lt=0.5, description="max shift, fraction of the side")
    nps_weight: float = Field(0.0, ge=0, description="weight of the non-printability score")
    palette: tuple[tuple[float, float, float], ...] = Field(DEFAULT_PALETTE, min_length=1)
    eot_samples: int = Field(4, ge=1, le=256, description="transformed copies per victim per step")
    sticker_fill: float | None = Field(None, ge=0, le=1, description="null: additive; else grey under the sticker")

    @field_validator("palette")
    @classmethod
    def _palette_in_range(cls, v: tuple[tuple[float, float, float], ...]) -> tuple[tuple[float, float, float], ...]:
        bad = [c for c in v if not all(0.0 <= float(x) <= 1.0 for x in c)]
        if bad:
            raise ValueError(f"palette colours must be RGB triplets in [0, 1], got {bad[0]}")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> RP2Params:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 10:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 10, got {self.scale}")
        lo, hi = self.brightness
        if not 0 <= lo <= hi <= 10:
            raise ValueError(f"brightness must be (min, max) with 0 <= min <= max <= 10, got {self.brightness}")
        return self


# --------------------------------------------------------------------------- applying the sticker


def _check_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``mask`` as a bool (1, H, W) tensor; ValueError unless it is (H, W) / (1, H, W) of 0 / 1."""
    m = mask.unsqueeze(0) if mask.ndim == 2 else mask
    if m.ndim != 3 or m.shape[0] != 1 or m.shape[1:] != (height, width):
        raise ValueError(f"mask must be (1, {height}, {width}) or ({height}, {width}), got {tuple(mask.shape)}")
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask must hold only 0 and 1; binarise it first (pipeline.data.rp2.load_mask)")
        m = m != 0
    return m


def apply_rp2(
    x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, sticker_fill: float | None = None
) -> torch.Tensor:
    """Put the sticker on the images: ``clip(x + M . delta, 0, 1)`` (Eykholt et al. 2018).

    Args:
        x: float (N, 3, H, W) images in [0, 1].
        delta: float (3, H, W) perturbation (or (N, 3, H, W), one per image), pixel
            units; gradients flow to it through the masked pixels.
        mask: (1, H, W) or (H, W) of exactly 0 / 1 (float or bool), 1 where the
            sticker goes.
        sticker_fill: ``None``: additive, masked pixels become ``clip(x + delta)``;
            a grey level in [0, 1]: masked pixels become ``clip(fill + delta)``
            whatever the image (RP2 code's inverse mask).

    Returns:
        float (N, 3, H, W) in [0, 1] on ``x``'s device; outside the mask, ``x`` bit for bit.

    Raises:
        ValueError: ``x`` is not (N, 3, H, W) floats, or the mask is not binary or
            does not match the images' size.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be float images (N, C, H, W) in [0, 1], got {x.dtype} {tuple(x.shape)}")
    m = _check_mask(mask.to(x.device), x.shape[2], x.shape[3])
    d = delta.to(device=x.device, dtype=x.dtype)
    base = x if sticker_fill is None else torch.full_like(x, float(sticker_fill))
    return torch.where(m, (base + d).clamp(0, 1), x)


def sticker_colours(delta: torch.Tensor, mask: torch.Tensor, sticker_fill: float | None = None) -> torch.Tensor:
    """The colours :func:`non_printability_score` scores: one RGB triplet per mask pixel.

    With ``sticker_fill`` these are the sticker's actual colours ``clip(fill + delta)``;
    without (additive), the perturbation values ``delta`` themselves, as the RP2 code
    scores its masked noise.

    Args:
        delta: float (3, H, W).
        mask: (1, H, W) or (H, W) of 0 / 1.
        sticker_fill: as in :func:`apply_rp2`.

    Returns:
        float (K, 3), K = number of mask pixels, on ``delta``'s device.

    Raises:
        ValueError: bad mask (see :func:`apply_rp2`) or ``delta`` not (3, H, W).
    """
    if delta.ndim != 3 or delta.shape[0] != 3:
        raise ValueError(f"delta must be (3, H, W), got {tuple(delta.shape)}")
    m = _check_mask(mask.to(delta.device), delta.shape[1], delta.shape[2])[0]
    colours = delta.permute(1, 2, 0)[m]  # (K, 3)
    return colours if sticker_fill is None else (colours + float(sticker_fill)).clamp(0, 1)


def non_printability_score(colours: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Non-printability score (Sharif et al., CCS 2016, Eq. 2), averaged over colours.

    ``NPS = mean_c prod_{p in palette} ||c - p||_2``: zero for a colour that is in the
    palette, growing with its distance from every printable colour.

    Args:
        colours: float (K, 3), RGB in [0, 1] (any K >= 1; other leading shapes are
            flattened to (-1, 3)).
        palette: float (P, 3), RGB in [0, 1], P >= 1.

    Returns:
        float scalar tensor >= 0 on ``colours``' device; differentiable (the gradient
        of a zero distance is taken as 0, so a colour on the palette gets no NaN).

    Raises:
        ValueError: the last dimension is not 3, or no colours / palette entries.
    """
    if colours.shape[-1] != 3 or palette.ndim != 2 or palette.shape[-1] != 3:
        raise ValueError(f"colours (K, 3) and palette (P, 3) expected, got {tuple(colours.shape)}, {tuple(palette.shape)}")
    c = colours.reshape(-1, 3)
    if len(c) == 0 or len(palette) == 0:
        raise ValueError("non_printability_score: no colours or an empty palette")
    sq = (c.unsqueeze(1) - palette.to(c).unsqueeze(0)).pow(2).sum(-1)  # (K, P)
    pos = sq > 0
    dist = torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    return dist.prod(dim=1).mean()


# --------------------------------------------------------------------------- transformations


@dataclass
class Transforms:
    """Random physical-condition transforms for N images (all float32 (N,) tensors).

    Attributes:
        angle: rotation in radians about the image centre (positive: clockwise as displayed).
        scale: zoom factor (> 1 enlarges the content).
        shift_x, shift_y: translation as a fraction of the image width / height.
        brightness: factor multiplying every pixel.
    """

    angle: torch.Tensor
    scale: torch.Tensor
    shift_x: torch.Tensor
    shift_y: torch.Tensor
    brightness: torch.Tensor

    def __len__(self) -> int:
        return len(self.angle)

    def to(self, device: torch.device | str) -> Transforms:
        """The same transforms with every tensor on ``device``."""
        return Transforms(*(t.to(device) for t in (self.angle, self.scale, self.shift_x, self.shift_y, self.brightness)))


def sample_transforms(n: int, cfg: RP2Params, generator: torch.Generator | None = None) -> Transforms:
    """Draw ``n`` transforms, each parameter uniform in its ``cfg`` range.

    Args:
        n: number of transforms (>= 0).
        cfg: ``rotation`` (degrees), ``scale``, ``translate``, ``brightness``.
        generator: CPU generator, for reproducibility.

    Returns:
        :class:`Transforms` on the CPU.
    """

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    rot = math.radians(cfg.rotation)
    return Transforms(
        angle=uniform(-rot, rot),
        scale=uniform(*cfg.scale),
        shift_x=uniform(-cfg.translate, cfg.translate),
        shift_y=uniform(-cfg.translate, cfg.translate),
        brightness=uniform(*cfg.brightness),
    )


def transform_images(images: torch.Tensor, tf: Transforms) -> torch.Tensor:
    """Apply one transform per image: warp (rotation, zoom, shift), then brightness.

    The content is rotated by ``angle`` about the centre (positive: clockwise as
    displayed, row 0 at the top; ``pi/2`` equals ``torch.rot90(x, -1, (2, 3))`` on a
    square image), zoomed by ``scale`` about the centre and shifted by
    ``(shift_x * W, shift_y * H)`` pixels (positive: right, down): ``affine_grid`` + bilinear
    ``grid_sample`` (``align_corners=False``; pixels sampled from outside the image
    repeat its border). Then every pixel is multiplied by ``brightness`` and the
    result clipped to [0, 1]. Transforms that are exactly the identity leave their
    images unchanged bit for bit (no resampling).

    Args:
        images: float (N, C, H, W) in [0, 1].
        tf: N transforms (any device; moved to the images').

    Returns:
        float (N, C, H, W) in [0, 1] on the images' device; differentiable in ``images``.

    Raises:
        ValueError: the number of transforms differs from N.
    """
    n, _, h, w = images.shape
    if len(tf) != n:
        raise ValueError(f"{len(tf)} transforms for {n} images")
    # Decided where the transforms live (the CPU in training), so no device sync.
    identity = (tf.angle == 0) & (tf.scale == 1) & (tf.shift_x == 0) & (tf.shift_y == 0)
    all_identity, any_identity = bool(identity.all()), bool(identity.any())
    unit_brightness = bool((tf.brightness == 1).all())
    t = tf.to(images.device)
    out = images
    if not all_identity:
        cos, sin, s = t.angle.cos(), t.angle.sin(), t.scale
        # Output -> input map in normalised coordinates: p_in = A (p_out - d) with
        # A = D^-1 R(-angle) D / s, D = diag(W/2, H/2) (rotation in pixel units), d = 2 shift.
        a = torch.stack(
            [torch.stack([cos / s, sin * (h / w) / s], -1), torch.stack([-sin * (w / h) / s, cos / s], -1)], -2
        )  # (N, 2, 2)
        d = torch.stack([2 * t.shift_x, 2 * t.shift_y], -1).unsqueeze(-1)  # (N, 2, 1)
        theta = torch.cat([a, -(a @ d)], dim=-1).to(images.dtype)  # (N, 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = torch.where(identity.to(images.device).view(n, 1, 1, 1), images, warped) if any_identity else warped
    if not unit_brightness:
        out = (out * t.brightness.to(images.dtype).view(n, 1, 1, 1)).clamp(0, 1)
    return out


# --------------------------------------------------------------------------- optimisation


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

    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    delta = torch.zeros(3, h, w, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr, betas=(0.9, 0.999))
    keys = ("loss", "ce", "norm", "nps", "target_rate")
    record = torch.zeros(cfg.steps, len(keys), device=device)
    try:
        for step in range(cfg.steps):
            tf = sample_transforms(cfg.eot_samples * n, cfg, gen)
            terms = rp2_loss_terms(model, x, delta, m, cfg, tf)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            with torch.no_grad():
                delta.mul_(m_float).clamp_(lo, hi)
                record[step] = torch.stack([terms[k].detach().float() for k in keys])
    finally:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)
        model.train(was_training)
    values = record.cpu().T.tolist()
    return delta.detach().cpu(), dict(zip(keys, values, strict=True))


# --------------------------------------------------------------------------- metrics


def l2_dissimilarity(x: torch.Tensor, x_adv: torch.Tensor) -> float:
    """BlurNet's L2 dissimilarity: ``mean_n ||x_n - x_adv_n||_2 / ||x_adv_n||_2``.

    Raju and Lipasti (2019), after Eykholt et al. (2018); each norm over the
    C x H x W values of one image, the ratio per image, then the mean over images.
    Unit-free (the same for images in [0, 1] or 0-255, as long as both use one scale).
    Same definition as ``l2_dissimilarity`` in :func:`pipeline.metrics.perturbation_sizes`.

    Args:
        x: clean images (N, C, H, W), float in [0, 1] or uint8.
        x_adv: adversarial images, same shape and scale.

    Returns:
        The mean ratio, a float >= 0.

    Raises:
        ValueError: shapes differ, are not 4-D, N = 0, or an ``x_adv`` image is all zero.
    """
    if x.shape != x_adv.shape or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"expected two equal non-empty (N, C, H, W) batches, got {tuple(x.shape)}, {tuple(x_adv.shape)}")
    xf, af = x.float().flatten(1), x_adv.to(x.device).float().flatten(1)
    denom = af.norm(dim=1)
    if bool((denom == 0).any()):
        raise ValueError("l2_dissimilarity: an adversarial image is all zero (its norm divides)")
    return float(((xf - af).norm(dim=1) / denom).mean())


def lambda_for_dissimilarity(lambdas: list[float], dissimilarities: list[float], target: float) -> float:
    """The ``lambda`` at which RP2's mean L2 dissimilarity meets ``target``, from a measured sweep.

    The penalty ``lambda * ||M . delta||_p`` of Eykholt et al. (2018, Eq. 3) sets the
    sticker's size only indirectly; BlurNet's slides compare defenses at one distortion
    (mean L2 dissimilarity 0.207 on the undefended model). Given stickers trained at a grid
    of lambdas (on validation images, never the evaluation's victims) and their mean
    :func:`l2_dissimilarity`, this returns the lambda that meets ``target``: linear
    interpolation in ``log lambda`` between the two neighbouring grid points whose
    dissimilarities bracket it (the first such pair in increasing lambda), or the grid
    point nearest to ``target`` when no pair brackets it.

    Args:
        lambdas: the grid, each > 0, any order.
        dissimilarities: the mean L2 dissimilarity measured at each lambda (unit-free, >= 0).
        target: the wanted mean L2 dissimilarity.

    Returns:
        The lambda, a float > 0.

    Raises:
        ValueError: empty or unequal lists, or a lambda <= 0.
    """
    if not lambdas or len(lambdas) != len(dissimilarities) or min(lambdas) <= 0:
        raise ValueError(f"need equal non-empty lists and every lambda > 0, got {lambdas} and {dissimilarities}")
    pairs = sorted(zip(lambdas, dissimilarities, strict=True))
    for (lam0, d0), (lam1, d1) in zip(pairs, pairs[1:], strict=False):
        if d0 != d1 and min(d0, d1) <= target <= max(d0, d1):
            t = (target - d0) / (d1 - d0)
            return math.exp(math.log(lam0) + t * (math.log(lam1) - math.log(lam0)))
    return min(pairs, key=lambda p: abs(p[1] - target))[0]


@torch.no_grad()
def evaluate_rp2(
    model: nn.Module,
    victims_uint8: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    mask: torch.Tensor,
    cfg: RP2Params,
    transforms: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """How the sticker does on the victims (digitally, and optionally under transforms).

    Args:
        model: maps float images in [0, 1] to logits; used in eval mode (restored after).
        victims_uint8: uint8 (N, 3, H, W), 0-255.
        labels: int64 (N,) true classes.
        delta: float (3, H, W) from :func:`train_rp2`.
        mask: (1, H, W) of 0 / 1.
        cfg: the settings it was trained with (target, sticker_fill, transform ranges).
        transforms: if > 0, also the target rate over this many random transforms of
            each adversarial victim (same ranges as training, drawn with ``seed``).
        seed: seed of those transforms.

    Returns:
        ``clean_accuracy`` (predictions == labels, clean), ``fooling_rate`` (BlurNet's
        "attack success rate": predictions changed by the sticker), ``target_success``
        (adversarial predictions == target), ``l2_dissimilarity`` (see
        :func:`l2_dissimilarity`), ``n_images``, and with ``transforms > 0``
        ``target_success_transformed``. Fractions in [0, 1]. Also ``fooled``: bool (N,),
        CPU, which victims the sticker fools (for paired comparisons between models).

    Raises:
        ValueError: as :func:`apply_rp2`.
    """
    from pipeline.metrics import clean_accuracy, fooling_rate

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        x = victims_uint8.to(device).float().div_(255)
        y = labels.to(device)
        adv = apply_rp2(x, delta.to(device), mask.to(device), cfg.sticker_fill)
        pred_clean, pred_adv = model(x).argmax(1), model(adv).argmax(1)
        out = {
            "clean_accuracy": clean_accuracy(pred_clean, y).value,
            "fooling_rate": fooling_rate(pred_clean, pred_adv).value,
            "target_success": float((pred_adv == cfg.target).float().mean()),
            "l2_dissimilarity": l2_dissimilarity(x, adv),
            "n_images": float(len(x)),
            "fooled": (pred_adv != pred_clean).cpu(),
        }
        if transforms > 0:
            gen = torch.Generator().manual_seed(seed)
            batch = adv.repeat(transforms, 1, 1, 1)
            pred = model(transform_images(batch, sample_transforms(len(batch), cfg, gen))).argmax(1)
            out["target_success_transformed"] = float((pred == cfg.target).float().mean())
    finally:
        model.train(was_training)
    return out
