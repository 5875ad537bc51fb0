"""ImageNet-style torchvision classifiers: resnet50, mobilenet_v2, inception_v3, densenet161.

All are built with ``weights=None`` (random initialisation; nothing is ever downloaded)
and the requested ``num_classes``. Pretrained weights can be given to
:func:`pipeline.models.build.build_model` as a local file, e.g. torchvision's
official ImageNet state dicts saved beforehand.

* ``resnet50``: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
  Table 1 (50-layer, bottleneck blocks); input 224x224.
* ``mobilenet_v2``: Sandler et al., "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks", CVPR 2018, Table 2; input 224x224.
* ``inception_v3``: Szegedy et al., "Rethinking the Inception Architecture for Computer
  Vision", CVPR 2016, Section 6 / Table 1; input 299x299. Built with
  ``aux_logits=False`` so that ``forward`` returns a plain ``(N, num_classes)`` tensor in
  both train and eval mode (with the auxiliary classifier torchvision returns an
  ``InceptionOutputs`` tuple in train mode), and ``init_weights=True`` (torchvision's
  truncated-normal init, also silencing its warning). ``transform_input`` stays
  ``False``: normalisation is done by :class:`~pipeline.models.normalized.Normalized`.
  Loading torchvision's official ImageNet inception_v3 state dict drops its
  ``AuxLogits.*`` keys. Note that those weights were trained for inputs normalised with
  mean = std = (0.5, 0.5, 0.5) (torchvision sets ``transform_input=True`` for them,
  which converts ImageNet-normalised inputs to that), so pass ``mean=std=(0.5,)*3`` to
  ``build_model`` when using them.

* ``densenet161``: Huang et al., "Densely Connected Convolutional Networks", CVPR 2017,
  Table 1 (DenseNet-161, growth rate 48); input 224x224. The network of the Mask-FGSM paper
  (seed 002). torchvision's published state dict uses the old ``norm.1`` key names, which
  :func:`~pipeline.models.build.build_model` renames as torchvision does.

Tensors: input ``float32`` ``(N, 3, H, W)``, already normalised; output logits
``(N, num_classes)``. torchvision is imported lazily, inside the factories.
"""

from __future__ import annotations

from torch import nn

from .registry import register_model

__all__ = ["densenet161", "inception_v3", "mobilenet_v2", "resnet50"]


@register_model("resnet50", input_size=224, family="torchvision")
def resnet50(num_classes: int) -> nn.Module:
    """torchvision ``resnet50(weights=None, num_classes=num_classes)`` (25.6M parameters at 1000 classes)."""
    from torchvision.models import resnet50 as _resnet50

    return _resnet50(weights=None, num_classes=num_classes)


@register_model("mobilenet_v2", input_size=224, family="torchvision")
def mobilenet_v2(num_classes: int) -> nn.Module:
    """torchvision ``mobilenet_v2(weights=None, num_classes=num_classes)`` (3.5M parameters at 1000 classes)."""
    from torchvision.models import mobilenet_v2 as _mobilenet_v2

    return _mobilenet_v2(weights=None, num_classes=num_classes)


@register_model("inception_v3", input_size=299, family="torchvision")
def inception_v3(num_classes: int) -> nn.Module:
    """torchvision ``inception_v3(weights=None, aux_logits=False, init_weights=True)``.

    ``forward`` returns a plain ``(N, num_classes)`` tensor in train and eval mode (no
    auxiliary head). Needs inputs of at least 75x75; 299x299 intended.
    """
    from torchvision.models import inception_v3 as _inception_v3

    return _inception_v3(weights=None, num_classes=num_classes, aux_logits=False, init_weights=True)


@register_model("densenet161", input_size=224, family="torchvision")
def densenet161(num_classes: int) -> nn.Module:
    """torchvision ``densenet161(weights=None, num_classes=num_classes)`` (28.7M parameters at 1000 classes)."""
    from torchvision.models import densenet161 as _densenet161

    return _densenet161(weights=None, num_classes=num_classes)
