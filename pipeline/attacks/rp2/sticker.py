"""Putting an RP2 sticker on images (Eykholt et al., CVPR 2018, ``x + M . delta``) and the
non-printability score of its colours (Sharif et al., CCS 2016)."""

from __future__ import annotations

import torch

__all__ = ["apply_rp2", "non_printability_score", "sticker_colours"]


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
