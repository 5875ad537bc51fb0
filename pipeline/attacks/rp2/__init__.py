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
:mod:`pipeline.attacks.patch`: a registered :class:`~pipeline.attacks.base.UniversalAttack`
(``rp2``), not a per-image one.

The package's modules, one job each: :mod:`~pipeline.attacks.rp2.params` (the settings),
:mod:`~pipeline.attacks.rp2.sticker` (putting the sticker on images, its printability),
:mod:`~pipeline.attacks.rp2.transforms` (the physical-condition transforms),
:mod:`~pipeline.attacks.rp2.optimize` (the loss and the Adam loop) and
:mod:`~pipeline.attacks.rp2.metrics` (distortion, the lambda calibration, the sticker's rates);
:class:`~pipeline.attacks.rp2.attack.RP2Attack` is RP2 as a registered universal attack.

Reference settings, from the authors' code (evtimovi/robust_physical_perturbations):
GTSRB-CNN (``gtsrb-cnn-attack/run_gennoise_yadav.sh``): true class 14, target 5
("Speed limit (80km/h)"), lambda 0.001, L2, Adam learning rate 0.25, 1000 steps, no
NPS; LISA-CNN (``lisa-cnn-attack/utils.py`` defaults): lambda 0.02, Adam 0.01, 500
steps, NPS on, inverse mask 0.5. Neither applies synthetic transforms in that code.
"""

from .attack import RP2Attack
from .metrics import evaluate_rp2, l2_dissimilarity, lambda_for_dissimilarity
from .optimize import rp2_loss_terms, train_rp2
from .params import DEFAULT_PALETTE, RP2Params
from .sticker import apply_rp2, non_printability_score, sticker_colours
from .transforms import Transforms, sample_transforms, transform_images

__all__ = [
    "DEFAULT_PALETTE",
    "RP2Attack",
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
