"""Fourier spectra of inputs and first-layer feature maps (BlurNet, seed 001).

Raju and Lipasti, "BlurNet: Defense by Filtering the Feature Maps", 2019 (slides): the
log-scaled, centred (``fftshift``), normalised 2-D FFT magnitude of natural stop signs
and of RP2-perturbed ones, for the input channels and the first layer's feature maps,
shows that the sticker adds high-frequency energy natural images lack, which motivates
a low-pass filter after the first layer.

:func:`log_spectrum` computes ``log(1 + |fftshift(fft2(x))|)`` per map, averaged over
images (and channels), scaled to [0, 1]; :func:`high_frequency_fraction` summarises a
spectrum as the share of (linear) energy outside a radius around the centre, the number
the figure's difference panel shows qualitatively.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

__all__ = ["first_layer_maps", "high_frequency_fraction", "log_spectrum", "magnitude", "spectrum_figure"]


def magnitude(maps: torch.Tensor) -> torch.Tensor:
    """Centred FFT magnitude ``|fftshift(fft2(m))|`` of every map: (..., H, W) -> (..., H, W)."""
    return torch.fft.fftshift(torch.fft.fft2(maps.float()), dim=(-2, -1)).abs()


def log_spectrum(maps: torch.Tensor) -> torch.Tensor:
    """Mean log magnitude spectrum of a stack of maps, scaled to [0, 1].

    Args:
        maps: float (N, C, H, W) (images or feature maps).

    Returns:
        float (H, W): ``log(1 + |F|)`` averaged over N and C, min-max scaled.
    """
    if maps.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) maps, got {tuple(maps.shape)}")
    s = torch.log1p(magnitude(maps)).mean(dim=(0, 1))
    return (s - s.min()) / (s.max() - s.min()).clamp_min(1e-12)


def high_frequency_fraction(maps: torch.Tensor, radius: float = 0.25) -> float:
    """Share of spectral energy ``|F|^2`` farther than ``radius`` x the half side from the centre.

    Args:
        maps: float (N, C, H, W).
        radius: in (0, 1), relative to half the (smaller) side.

    Returns:
        A fraction in [0, 1], over all maps together.
    """
    energy = magnitude(maps).pow(2).sum(dim=(0, 1))
    h, w = energy.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    far = (yy.float() ** 2 + xx.float() ** 2).sqrt() > radius * min(h, w) / 2
    return float(energy[far].sum() / energy.sum().clamp_min(1e-12))


@torch.no_grad()
def first_layer_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first ``nn.Conv2d``'s output for ``x`` (float (N, 3, H, W) in [0, 1]): (N, K, h, w).

    Raises:
        ValueError: the model has no convolution.
    """
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d")
    seen: list[torch.Tensor] = []
    handle = conv.register_forward_hook(lambda _m, _i, o: seen.append(o.detach()))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


def spectrum_figure(model: nn.Module, clean: torch.Tensor, adversarial: torch.Tensor, title: str = "") -> plt.Figure:
    """Log spectra of the inputs and the first-layer maps, natural vs perturbed, and their difference.

    Args:
        model: the network (eval mode).
        clean, adversarial: float (N, 3, H, W) in [0, 1], the same images without and with the perturbation.

    Returns:
        A 2 x 3 figure (rows: input channels, first-layer maps; columns: natural,
        perturbed, perturbed minus natural), each panel titled with its
        high-frequency energy fraction.
    """
    rows = [("input", clean, adversarial),
            ("first layer", first_layer_maps(model, clean), first_layer_maps(model, adversarial))]
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    for r, (name, a, b) in enumerate(rows):
        sa, sb = log_spectrum(a), log_spectrum(b)
        for c, (img, label, cmap) in enumerate(((sa, "natural", "magma"), (sb, "perturbed", "magma"),
                                               (sb - sa, "difference", "coolwarm"))):
            kw = {"vmin": -float((sb - sa).abs().max()), "vmax": float((sb - sa).abs().max())} if c == 2 else {}
            im = axes[r, c].imshow(img.numpy(), cmap=cmap, **kw)
            hf = "" if c == 2 else f", HF {high_frequency_fraction(a if c == 0 else b):.3f}"
            axes[r, c].set_title(f"{name}: {label}{hf}", fontsize=8)
            axes[r, c].axis("off")
            fig.colorbar(im, ax=axes[r, c], shrink=0.7)
    fig.suptitle(title or "log |FFT| (centred, normalised)", fontsize=10)
    fig.tight_layout()
    return fig
