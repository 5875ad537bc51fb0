"""Grad-CAM class activation maps (Selvaraju et al., "Grad-CAM: Visual Explanations
from Deep Networks via Gradient-based Localization", ICCV 2017), as used by the
Mask-FGSM attack (Yu Liping, "Mask-FGSM adversarial samples attack based on
Grad-CAM", Computer Applications and Software, 2022, Section 2.1, Eqs. 2-3).

For class ``c`` and the feature maps ``A^k`` (k = 1..K) of a convolutional layer::

    a_k^c = 1/Z * sum_ij d y^c / d A^k_ij            (Eq. 2, Z = number of positions)
    L^c   = ReLU(sum_k a_k^c A^k)                    (Eq. 3)

where ``y^c`` is the logit of class ``c`` (before the softmax). The coarse map
``L^c`` is upsampled bilinearly to the input size and divided by its per-image
maximum, so it lies in [0, 1] with 0 meaning "no positive evidence" (an all-zero
map stays zero). The computation is captum's ``LayerGradCam`` (with
``relu_attributions=True``) followed by ``LayerAttribution.interpolate``.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.normalized import Normalized

from .pgd import frozen_eval

__all__ = ["default_gradcam_layer", "gradcam"]


def default_gradcam_layer(model: nn.Module) -> nn.Module:
    """The last convolutional feature block of ``model``, where Grad-CAM is taken.

    Selvaraju et al. (2017, Section 3) use the last convolutional layer, whose
    feature maps keep spatial information right before global pooling. For the
    registered models (unwrapping :class:`pipeline.models.normalized.Normalized`):

    * CIFAR ResNets (:class:`pipeline.models.cifar_resnet.CifarResNet`): ``net.layer3``
      (the last residual stage, 8x8 maps for 32x32 inputs);
    * torchvision ResNet (``resnet50``): ``net.layer4``;
    * torchvision MobileNetV2: ``net.features`` (ends with the 1x1 conv to 1280 channels);
    * torchvision Inception3: ``net.Mixed_7c``;
    * torchvision DenseNet (``densenet161``): ``net.features`` (ends with the last BatchNorm,
      before the ReLU and pooling of its ``forward``);
    * any other network: its last ``nn.Conv2d`` (in module registration order).

    Args:
        model: a classifier, optionally wrapped in ``Normalized``.

    Returns:
        A submodule of ``model`` whose output is a 4-D feature map (N, K, u, v).

    Raises:
        ValueError: the model has no ``nn.Conv2d`` at all.
    """
    from torchvision.models import DenseNet, Inception3, MobileNetV2, ResNet

    from pipeline.models.cifar_resnet import CifarResNet

    net = model.net if isinstance(model, Normalized) else model
    if isinstance(net, CifarResNet):
        return net.layer3
    if isinstance(net, ResNet):
        return net.layer4
    if isinstance(net, MobileNetV2):
        return net.features
    if isinstance(net, Inception3):
        return net.Mixed_7c
    if isinstance(net, DenseNet):
        return net.features
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(net).__name__} has no nn.Conv2d; pass the Grad-CAM layer explicitly")
    return convs[-1]


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    classes: torch.Tensor | int,
    layer: nn.Module | None = None,
) -> torch.Tensor:
    """Grad-CAM maps of ``classes`` for a batch, upsampled to the input and scaled to [0, 1].

    Selvaraju et al. 2017, Eqs. 1-2; Yu 2022, Section 2.1, Eqs. 2-3 (see the module
    docstring). One forward and one backward pass for the whole batch (the model is
    put in eval mode with frozen weights for the call, then restored).

    Args:
        model: maps float (N, C, H, W) images in [0, 1] to logits (N, classes).
        x: float32 (N, C, H, W) images in [0, 1].
        classes: the class ``c`` of each image, int64 (N,), or one int for all.
        layer: the convolutional module whose output is ``A``; default
            :func:`default_gradcam_layer`.

    Returns:
        float32 (N, H, W) on ``x``'s device, values in [0, 1]: the bilinearly
        upsampled ``ReLU(sum_k a_k A^k)`` divided by its per-image maximum
        (all zeros where the map has no positive value).

    Raises:
        ValueError: ``x`` is not 4-D, or ``classes`` does not have one entry per image;
            ``layer`` is None and the model has no convolution.
    """
    from captum.attr import LayerAttribution, LayerGradCam  # imported here: captum (and matplotlib) cost 0.5 s

    if x.ndim != 4:
        raise ValueError(f"gradcam expects images (N, C, H, W), got {tuple(x.shape)}")
    if isinstance(classes, int):
        classes = torch.full((len(x),), classes, dtype=torch.long)
    classes = torch.as_tensor(classes, device=x.device).long()
    if classes.shape != (len(x),):
        raise ValueError(f"gradcam needs one class per image: {len(x)} images, classes of shape {tuple(classes.shape)}")
    layer = default_gradcam_layer(model) if layer is None else layer
    with frozen_eval(model):
        coarse = LayerGradCam(model, layer).attribute(x.detach(), target=classes, relu_attributions=True)
    cam = LayerAttribution.interpolate(coarse.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    peak = cam.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), 0.0).float()
