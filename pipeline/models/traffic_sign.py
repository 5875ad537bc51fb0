"""A small traffic-sign CNN: the 4-layer victim model of BlurNet and RP2 (``traffic_cnn``).

Sources:

* Raju and Lipasti, "BlurNet: Defense by Filtering the Feature Maps" (slides, 2019):
  the victim model is a "4-layer CNN" trained on LISA (top 18 classes) and attacked
  with RP2 on 40 stop signs. The slides give no layer details.
* Eykholt et al., "Robust Physical-World Attacks on Deep Learning Visual
  Classification", CVPR 2018 (RP2), Section 5: LISA-CNN, three convolutional layers
  and one fully connected layer, 32x32 inputs. Its code
  (evtimovi/robust_physical_perturbations, ``lisa-cnn-attack/utils.py``) builds the
  model with cleverhans' ``cnn_model`` (Keras):
  ``Dropout(0.2)`` on the input; ``Conv 64, 8x8, stride 2, 'same'``, ReLU;
  ``Conv 128, 6x6, stride 2, 'valid'``, ReLU; ``Conv 128, 5x5, stride 1, 'valid'``,
  ReLU; ``Dropout(0.5)``; flatten; ``Dense(num_classes)``.

The BlurNet "4-layer CNN" (3 conv + 1 dense, 32x32, evaluated with RP2's code) matches
that LISA-CNN, so a single architecture is registered, as ``traffic_cnn``; a separate
``lisa_cnn`` would be the same network and is not registered. The number of classes
is a parameter (18 for the LISA top-18 set, 43 for GTSRB).

Shapes on a 32x32 input: conv1 (Keras 'same' with stride 2 is a symmetric padding of 3
here) -> 64 x 16 x 16; conv2 -> 128 x 6 x 6; conv3 -> 128 x 2 x 2; flatten 512 ->
``num_classes``. Parameters for 43 classes: 739,179. The flatten size depends on the
input size, so the network takes exactly ``input_size x input_size`` images (no global
pooling); ``forward`` checks it.

Weights use Keras' default initialisation (Glorot-uniform, zero biases), as the
reference model was trained with it.

BlurNet hook: :attr:`TrafficCNN.l1_filter` is an ``nn.Identity`` placed after the first
convolution's ReLU; BlurNet's depthwise blur ("a depthwise convolution ... inserted after
the first conv layer") replaces it, e.g. ``model.net.l1_filter = depthwise_blur``. It has
no parameters, so baseline checkpoints are unaffected.

Feature norm clipping: this plain CNN has no cascaded (residual / inception /
inverted-residual) blocks, so it has no module of
:func:`pipeline.models.blocks.fnc_block_types` and
:func:`pipeline.defenses.fnc.insert_fnc` raises its "has no block" ``ValueError``
unless ``block_types`` is given explicitly.

Tensors: input ``float32`` ``(N, 3, 32, 32)``, already normalised (use
:func:`pipeline.models.build_model`, whose :class:`~pipeline.models.normalized.Normalized`
wrapper takes images in ``[0, 1]``); output logits ``(N, num_classes)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["TrafficCNN", "traffic_cnn"]


class TrafficCNN(nn.Module):
    """LISA-CNN (Eykholt et al., CVPR 2018; cleverhans ``cnn_model``): 3 conv + 1 dense.

    Args:
        num_classes: number of output logits (>= 1).
        input_size: square input side in pixels, even and >= 28 (32 for LISA / GTSRB);
            fixes the size of the dense layer.
        in_channels: input channels (3 for RGB, 1 for grey).
        width: filters of conv1 (conv2 and conv3 have ``2 * width``); 64 in RP2.
        input_dropout: dropout probability on the input pixels during training (0.2 in
            cleverhans' model; 0 disables it).
        dropout: dropout probability before the dense layer during training (0.5).

    Raises:
        ValueError: ``num_classes < 1``, ``input_size`` odd or < 28 (conv3 would have
            no output), ``width < 1`` or a dropout probability outside [0, 1).

    ``forward``: ``(N, in_channels, input_size, input_size)`` normalised float images ->
    ``(N, num_classes)`` logits; raises ``ValueError`` on another shape. Dropout acts
    only in training mode.

    Module names: ``input_dropout``, ``conv1``, ``l1_filter`` (identity hook for
    BlurNet), ``conv2``, ``conv3``, ``dropout``, ``fc``.
    """

    def __init__(
        self,
        num_classes: int,
        input_size: int = 32,
        in_channels: int = 3,
        width: int = 64,
        input_dropout: float = 0.2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"TrafficCNN: num_classes must be >= 1, got {num_classes}")
        if input_size < 28 or input_size % 2:
            raise ValueError(f"TrafficCNN: input_size must be even and >= 28 pixels, got {input_size}")
        if width < 1:
            raise ValueError(f"TrafficCNN: width must be >= 1, got {width}")
        for name, p in (("input_dropout", input_dropout), ("dropout", dropout)):
            if not 0 <= p < 1:
                raise ValueError(f"TrafficCNN: {name} must be in [0, 1), got {p}")
        self.input_size, self.in_channels = input_size, in_channels
        self.input_dropout = nn.Dropout(input_dropout)
        # Keras 'same' with stride 2 on an even side: total padding 8 - 2 = 6, split 3 / 3
        # (odd sides would need Keras' asymmetric padding, hence even sizes only).
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=8, stride=2, padding=3)
        self.l1_filter: nn.Module = nn.Identity()
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=6, stride=2, padding=0)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, kernel_size=5, stride=1, padding=0)
        self.dropout = nn.Dropout(dropout)
        side = ((input_size + 6 - 8) // 2 + 1 - 6) // 2 + 1 - 4
        self.fc = nn.Linear(2 * width * side * side, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, S, S)`` normalised images (``C = in_channels``, ``S = input_size``) -> ``(N, num_classes)`` logits."""
        if x.dim() != 4 or x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"TrafficCNN: expected (N, {self.in_channels}, {self.input_size}, {self.input_size}) images, "
                f"got {tuple(x.shape)}; "
                "resize the images to the model's input_size"
            )
        out = self.l1_filter(F.relu(self.conv1(self.input_dropout(x))))
        out = F.relu(self.conv2(out))
        out = F.relu(self.conv3(out))
        return self.fc(self.dropout(out).flatten(1))


@register_model("traffic_cnn", input_size=32, family="traffic_cnn")
def traffic_cnn(num_classes: int, in_channels: int = 3) -> TrafficCNN:
    """The BlurNet / RP2 victim CNN (LISA-CNN: 3 conv + 1 dense) for 32x32 traffic signs;
    739,179 parameters for GTSRB's 43 classes."""
    return TrafficCNN(num_classes, input_size=32, in_channels=in_channels)
