"""BlurNet: low-pass filtering of the first layer's feature maps (and the input-blur baseline).

Raju and Lipasti, "BlurNet: Defense by Filtering the Feature Maps", 2019 (slides; see
``shared/seeds/DIGEST.md``, seed 001). RP2's sticker perturbations add high-frequency
energy that natural stop signs lack; a depthwise convolution with a low-pass kernel,
inserted after the first convolution layer, removes much of it. Variants, all here:

* **fixed kernels** (``kernel: box`` or ``gaussian``, ``size`` 3, 5 or 7): one 2-D
  kernel, the same for every channel, summing to 1 (:func:`blur_kernel`);
* **learned kernels** (``kernel: learned``): a trainable depthwise kernel per channel,
  started from a box kernel, with the L-inf penalty
  ``alpha / K * sum_j ||W[:, :, j]||_inf`` (:func:`linf_penalty`; ``K`` channels, the
  norm of channel ``j``'s ``size x size`` kernel is the largest absolute entry);
* **total variation** (``tv_weight > 0``): the penalty
  ``alpha_TV / (N K) * sum_{i,k} TV(F[i, :, :, k])`` on the first layer's (filtered)
  feature maps ``F`` (:func:`tv_penalty`; TV anisotropic, the sum of absolute
  differences between vertical and horizontal neighbours, as
  ``tf.image.total_variation``); with ``kernel: none`` it is the slides' TV defense on
  its own;
* **input blur** (the ``input_blur`` defense): the same fixed kernels applied to the
  image before the network, the baseline the slides compare with.

Where the layer goes: a network exposing an ``l1_filter`` hook (``traffic_cnn``, after
the first convolution's ReLU) gets it there; any other network gets it right after its
first ``nn.Conv2d`` (the first in registration order), as a child ``blurnet`` of that
convolution and a forward hook that filters its output (the existing weights keep
their state-dict keys). Convolutions use zero padding of ``size // 2`` ("same"
size, as TensorFlow's ``SAME``).

Fixed kernels are non-persistent buffers, so an undefended checkpoint loads into the
defended model as is; learned kernels are parameters and are saved with the model.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from pipeline.defenses.base import DefenseParams, add_input_transform, register_defense

__all__ = [
    "BlurNetLayer",
    "BlurNetParams",
    "InputBlur",
    "InputBlurParams",
    "blur_kernel",
    "blurnet_layers",
    "insert_blurnet",
    "linf_penalty",
    "tv_penalty",
]


def blur_kernel(kind: Literal["box", "gaussian"], size: int, sigma: float | None = None) -> torch.Tensor:
    """A 2-D low-pass kernel summing to 1.

    Args:
        kind: ``"box"`` (all entries ``1 / size**2``) or ``"gaussian"``.
        size: odd side, >= 3.
        sigma: Gaussian standard deviation in pixels; ``None``: OpenCV's rule for a
            kernel of that size, ``0.3 * ((size - 1) / 2 - 1) + 0.8``.

    Returns:
        float32 (size, size), non-negative, symmetric, summing to 1.

    Raises:
        ValueError: unknown kind, even or too small ``size``, or ``sigma <= 0``.
    """
    if size < 3 or size % 2 == 0:
        raise ValueError(f"blur kernel size must be odd and >= 3, got {size}")
    if kind == "box":
        return torch.full((size, size), 1.0 / size**2)
    if kind != "gaussian":
        raise ValueError(f"blur kernel kind must be 'box' or 'gaussian', got {kind!r}")
    s = 0.3 * ((size - 1) / 2 - 1) + 0.8 if sigma is None else float(sigma)
    if s <= 0:
        raise ValueError(f"gaussian sigma must be > 0, got {sigma}")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(r**2) / (2 * s * s))
    k = torch.outer(g, g)
    return (k / k.sum()).float()


def linf_penalty(weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """BlurNet's L-inf penalty ``alpha / K * sum_j max |W_j|`` on depthwise kernels.

    Args:
        weight: depthwise kernels (K, 1, k, k) (PyTorch layout; TensorFlow's
            ``W[:, :, j]`` is ``weight[j, 0]``).
        alpha: penalty weight (>= 0).

    Returns:
        A scalar tensor (differentiable in ``weight``).
    """
    if weight.ndim != 4 or weight.shape[1] != 1:
        raise ValueError(f"expected depthwise kernels (K, 1, k, k), got {tuple(weight.shape)}")
    return alpha * weight.abs().amax(dim=(1, 2, 3)).sum() / weight.shape[0]


def tv_penalty(features: torch.Tensor, alpha_tv: float) -> torch.Tensor:
    """BlurNet's total-variation penalty ``alpha_TV / (N K) * sum_{i,k} TV(F[i, k])``.

    ``TV(F) = sum |F[h+1, w] - F[h, w]| + sum |F[h, w+1] - F[h, w]|`` (anisotropic).

    Args:
        features: float (N, K, H, W) first-layer feature maps.
        alpha_tv: penalty weight (>= 0).

    Returns:
        A scalar tensor (differentiable in ``features``).
    """
    if features.ndim != 4:
        raise ValueError(f"expected feature maps (N, K, H, W), got {tuple(features.shape)}")
    n, k = features.shape[:2]
    tv = (features[:, :, 1:, :] - features[:, :, :-1, :]).abs().sum() + \
         (features[:, :, :, 1:] - features[:, :, :, :-1]).abs().sum()
    return alpha_tv * tv / (n * k)


class BlurNetLayer(nn.Module):
    """Depthwise low-pass filter of K feature maps, keeping the last output for the TV penalty.

    Args:
        channels: K, the feature maps filtered.
        kernel: (k, k) starting kernel, or ``None`` for no filtering (TV penalty only).
        learnable: train the K kernels (each starts as ``kernel``).
        linf_weight: ``alpha`` of :func:`linf_penalty` (learned kernels).
        tv_weight: ``alpha_TV`` of :func:`tv_penalty` on this layer's output.

    ``forward``: float (N, K, H, W) -> (N, K, H, W); raises ``ValueError`` when the
    kernel is larger than the feature map.
    """

    def __init__(self, channels: int, kernel: torch.Tensor | None, learnable: bool = False,
                 linf_weight: float = 0.0, tv_weight: float = 0.0) -> None:
        super().__init__()
        self.channels, self.learnable = int(channels), bool(learnable)
        self.linf_weight, self.tv_weight = float(linf_weight), float(tv_weight)
        self.size = 0 if kernel is None else int(kernel.shape[-1])
        if kernel is None:
            self.weight = None
        else:
            w = kernel.reshape(1, 1, self.size, self.size).repeat(self.channels, 1, 1, 1).float()
            if learnable:
                self.weight = nn.Parameter(w)
            else:
                self.register_buffer("weight", w, persistent=False)
        self.last_output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            out = x
        else:
            if self.size > min(x.shape[-2:]):
                raise ValueError(f"BlurNet kernel {self.size}x{self.size} is larger than the {x.shape[-2]}x"
                                 f"{x.shape[-1]} feature map; use a smaller blurnet.size")
            out = F.conv2d(x, self.weight.to(x.dtype), padding=self.size // 2, groups=self.channels)
        self.last_output = out if (self.training and self.tv_weight > 0) else None
        return out

    def penalty(self) -> torch.Tensor:
        """L-inf penalty of learned kernels plus TV penalty of the last training forward (scalar)."""
        total = torch.zeros(())
        if self.learnable and self.linf_weight > 0 and self.weight is not None:
            total = total + linf_penalty(self.weight, self.linf_weight).cpu()
        if self.tv_weight > 0 and self.last_output is not None:
            total = total.to(self.last_output.device) + tv_penalty(self.last_output, self.tv_weight)
        return total

    def training_penalty(self) -> torch.Tensor:
        """The trainer's hook (:func:`pipeline.defenses.base.training_penalty`): :meth:`penalty`."""
        return self.penalty()

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, size={self.size}, learnable={self.learnable}, "
                f"linf_weight={self.linf_weight}, tv_weight={self.tv_weight}")


class BlurNetParams(DefenseParams):
    """Params of the ``blurnet`` defense.

    Attributes:
        kernel: ``box`` / ``gaussian`` (fixed), ``learned`` (trainable, starts as a box),
            ``none`` (no filter: the TV penalty alone).
        size: odd kernel side, 3-15 (3, 5, 7 in the slides).
        sigma: Gaussian std in pixels (``None``: OpenCV's rule for ``size``).
        linf_weight: ``alpha`` of the L-inf penalty on learned kernels (>= 0).
        tv_weight: ``alpha_TV`` of the TV penalty on the layer-1 feature maps (>= 0;
            1e-4 in the slides' Table 2).
    """

    kernel: Literal["box", "gaussian", "learned", "none"] = "gaussian"
    size: int = Field(5, ge=3, le=15)
    sigma: float | None = Field(None, gt=0)
    linf_weight: float = Field(0.0, ge=0)
    tv_weight: float = Field(0.0, ge=0)

    @field_validator("size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"blurnet.size must be odd (3, 5, 7, ...), got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BlurNetParams:
        if self.kernel == "none" and self.tv_weight == 0:
            raise ValueError("blurnet.kernel 'none' does nothing without tv_weight > 0")
        if self.linf_weight > 0 and self.kernel != "learned":
            raise ValueError("blurnet.linf_weight penalises learned kernels; set kernel: learned")
        return self

    def trainable(self) -> bool:
        """True when the defended model must be trained (learned kernels or a TV penalty)."""
        return self.kernel == "learned" or self.tv_weight > 0


def _first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                return parent, name, child
    raise ValueError(f"{type(net).__name__} has no nn.Conv2d: BlurNet filters the first convolution's output")


def insert_blurnet(model: nn.Module, params: BlurNetParams) -> BlurNetLayer:
    """Insert a :class:`BlurNetLayer` after the first convolution layer, in place.

    Args:
        model: a :class:`pipeline.models.Normalized` network (its ``net``) or a bare one.
        params: the layer's settings.

    Returns:
        The inserted layer.

    Raises:
        ValueError: BlurNet already inserted, or no convolution in the network.
    """
    net = getattr(model, "net", model)
    if blurnet_layers(net):
        raise ValueError("BlurNet is already inserted in this model")
    if params.kernel in ("box", "gaussian"):
        kernel = blur_kernel(params.kernel, params.size, params.sigma)
    elif params.kernel == "learned":
        kernel = blur_kernel("box", params.size)
    else:
        kernel = None
    if isinstance(getattr(net, "l1_filter", None), nn.Identity):
        channels = _first_conv(net)[2].out_channels
        layer = BlurNetLayer(channels, kernel, params.kernel == "learned", params.linf_weight, params.tv_weight)
        net.l1_filter = layer
        return layer
    _, _, conv = _first_conv(net)
    layer = BlurNetLayer(conv.out_channels, kernel, params.kernel == "learned", params.linf_weight, params.tv_weight)
    conv.add_module("blurnet", layer)
    conv.register_forward_hook(_blur_output_hook)
    return layer


def _blur_output_hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.blurnet(output)


def blurnet_layers(model: nn.Module) -> list[BlurNetLayer]:
    """The :class:`BlurNetLayer` modules in ``model``."""
    return [m for m in model.modules() if isinstance(m, BlurNetLayer)]


@register_defense("blurnet", BlurNetParams, "network",
                  source="Raju and Lipasti, BlurNet (2019), slides: depthwise blur after the first conv layer")
def apply_blurnet(model: nn.Module, params: BlurNetParams) -> nn.Module:
    """Registry entry: :func:`insert_blurnet`; returns ``model`` (modified in place)."""
    insert_blurnet(model, params)
    return model


class InputBlurParams(DefenseParams):
    """Params of the ``input_blur`` defense: a fixed ``box`` / ``gaussian`` kernel of odd
    ``size`` (3-15) and optional Gaussian ``sigma`` (pixels)."""

    kernel: Literal["box", "gaussian"] = "gaussian"
    size: int = Field(3, ge=3, le=15)
    sigma: float | None = Field(None, gt=0)

    @field_validator("size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"input_blur.size must be odd (3, 5, 7, ...), got {v}")
        return v

    def trainable(self) -> bool:
        """Never: a fixed transform of the input."""
        return False


class InputBlur(nn.Module):
    """Blur each channel of images in [0, 1] (zero padding, same size); differentiable.

    ``forward``: float (N, C, H, W) in [0, 1] -> same shape, in [0, 1].
    """

    def __init__(self, kernel: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("kernel", kernel.reshape(1, 1, *kernel.shape).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, k = x.shape[1], self.kernel.shape[-1]
        if k > min(x.shape[-2:]):
            raise ValueError(f"input_blur kernel {k}x{k} is larger than the {x.shape[-2]}x{x.shape[-1]} image")
        return F.conv2d(x, self.kernel.to(x.dtype).expand(c, 1, k, k), padding=k // 2, groups=c)


@register_defense("input_blur", InputBlurParams, "input",
                  source="Raju and Lipasti, BlurNet (2019), slides: the input-filter baseline")
def apply_input_blur(model: nn.Module, params: InputBlurParams) -> nn.Module:
    """Registry entry: blur the input before ``model`` (a forward pre-hook; the state dict
    keys do not change). Returns ``model``.

    Raises:
        ValueError: the model already has an input transform.
    """
    return add_input_transform(model, InputBlur(blur_kernel(params.kernel, params.size, params.sigma)))
