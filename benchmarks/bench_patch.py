"""One universal-patch optimisation step: the project against ART and a bare loop.

Run on demand (not a test):

    python benchmarks/bench_patch.py [--device cuda] [--batch 128] [--repeats 7] > patch.json

One step = paste the patch at a fresh random placement in each of ``--batch``
CIFAR-size images (3 x 32 x 32), forward a randomly initialised ResNet-20
(weights do not matter for timing; frozen, so no implementation computes
parameter gradients), back-propagate a targeted cross-entropy (class 5) to the
patch only, take a signed step. A 10 x 10 square patch (10 % of the image, as
FNC on CIFAR-10), timed in two settings:

* ``fixed``: no rotation, no scaling (the default profile);
* ``eot``: rotation uniform in +-22.5 degrees and scale uniform in [0.8, 1.0]
  (expectation over transformation, Brown et al. 2017).

Implementations:

* ``project``: :func:`pipeline.attacks.patch.train_universal_patch` for one epoch
  of one batch (uint8 images in, as the generate_patches stage calls it);
* ``art``: ART 1.20's ``AdversarialPatchPyTorch.generate`` with ``max_iter=1`` and
  one batch (``optimizer="pgd"``, square patch; ART resizes its patch to the image
  side and scales it by ``scale``, so the same 10-pixel side is ``scale = 10/32``
  and the EOT range ``[0.8, 1.0] x 10/32``); it transforms each image in a Python
  loop with torchvision's ``affine``;
* ``bare``: the same placement, paste, forward, backward and step written inline
  with batched tensor operations (an index gather for the fixed setting, one
  ``affine_grid`` / ``grid_sample`` for EOT);
* ``project_amp`` and ``bare_amp``: the same two with the forward pass in bf16
  autocast (``patch.amp: true``, on in the default profile), where the device
  runs bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX);
  ART has no such option.

Prints the median images per second and each implementation's wall-time ratio
to the bare loop as JSON on stdout (a table on stderr). Targets (README,
Benchmarks): the project at least 2.5x faster than ART and within 20 % of bare.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from timing import device_name, emit, interleaved_medians, machine, say

from pipeline.attacks.patch import PatchTrainingConfig, train_universal_patch
from pipeline.data import DATASETS
from pipeline.models import build_model
from pipeline.precision import amp_dtype, autocast

SIDE, IMAGE, TARGET, STEP = 10, 32, 5, 2 / 255
SETTINGS = {"fixed": (0.0, (1.0, 1.0)), "eot": (22.5, (0.8, 1.0))}


def bare_step(model: torch.nn.Module, x: torch.Tensor, patch: torch.Tensor, rotation: float,
              scale: tuple[float, float]) -> torch.Tensor:
    """One step written inline: random placement, paste, forward/backward to the patch, signed step."""
    n, dev = len(x), x.device
    patch = patch.detach().requires_grad_(True)
    if rotation == 0 and scale == (1.0, 1.0):
        top = torch.randint(0, IMAGE - SIDE + 1, (n, 1), device=dev)
        left = torch.randint(0, IMAGE - SIDE + 1, (n, 1), device=dev)
        r = torch.arange(IMAGE, device=dev)[None] - top  # (N, H) row inside the patch
        c = torch.arange(IMAGE, device=dev)[None] - left
        inside = ((r >= 0) & (r < SIDE))[:, :, None] & ((c >= 0) & (c < SIDE))[:, None, :]  # (N, H, W)
        pasted = patch[:, r.clamp(0, SIDE - 1)[:, :, None], c.clamp(0, SIDE - 1)[:, None, :]].transpose(0, 1)
        xa = torch.where(inside[:, None], pasted, x)
    else:
        angle = (torch.rand(n, device=dev) * 2 - 1) * math.radians(rotation)
        s = scale[0] + (scale[1] - scale[0]) * torch.rand(n, device=dev)
        half = SIDE * s / IMAGE  # patch half-side in the [-1, 1] image frame
        extent = half * (angle.cos().abs() + angle.sin().abs())
        ty = (torch.rand(n, device=dev) * 2 - 1) * (1 - extent)
        tx = (torch.rand(n, device=dev) * 2 - 1) * (1 - extent)
        cos, sin = angle.cos() / half, angle.sin() / half  # image frame -> patch frame
        theta = torch.stack([torch.stack([cos, sin, -(cos * tx + sin * ty)], 1),
                             torch.stack([-sin, cos, sin * tx - cos * ty], 1)], 1)
        grid = F.affine_grid(theta, [n, 3, IMAGE, IMAGE], align_corners=False)
        src = torch.cat([patch, torch.ones_like(patch[:1])]).expand(n, 4, SIDE, SIDE)
        out = F.grid_sample(src, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        xa = torch.where(out[:, 3:].bool(), out[:, :3], x)
    loss = F.cross_entropy(model(xa), torch.full((n,), TARGET, device=dev))
    (grad,) = torch.autograd.grad(loss, patch)
    return (patch.detach() - STEP * grad.sign()).clamp_(0, 1)


def implementations(model: torch.nn.Module, x_u8: torch.Tensor, y: torch.Tensor, dev: str, rotation: float,
                    scale: tuple[float, float]) -> dict[str, Callable[[], object]]:
    """One patch step of each implementation in one setting, as zero-argument callables."""
    n = len(x_u8)
    x = x_u8.float().div(255).to(dev)
    cfg = PatchTrainingConfig(side=SIDE, target=TARGET, epochs=1, step_size=STEP, decay_epochs=(),
                              batch_size=n, rotation_deg=rotation, scale_range=scale)
    state = {"patch": torch.zeros(3, SIDE, SIDE, device=dev)}
    bf16 = amp_dtype(dev, True)

    def bare() -> None:
        state.update(patch=bare_step(model, x, state["patch"], rotation, scale))

    def bare_amp() -> None:
        with autocast(dev, bf16):
            bare()

    runs: dict[str, Callable[[], object]] = {
        "bare": bare,
        "project": lambda: train_universal_patch(model, x_u8, y, cfg, seed=0, device=dev),
    }
    if bf16 is not None:
        cfg_amp = dataclasses.replace(cfg, amp=True)
        runs["bare_amp"] = bare_amp
        runs["project_amp"] = lambda: train_universal_patch(model, x_u8, y, cfg_amp, seed=0, device=dev)
    try:
        from art.attacks.evasion import AdversarialPatchPyTorch
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        return runs
    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, IMAGE, IMAGE),
                            nb_classes=10, clip_values=(0.0, 1.0), preprocessing=None,
                            device_type="gpu" if dev.startswith("cuda") else "cpu")
    base = SIDE / IMAGE  # ART scales its patch, resized to the image side, by this
    art = AdversarialPatchPyTorch(clf, rotation_max=rotation, scale_min=base * scale[0], scale_max=base * scale[1],
                                  learning_rate=STEP, max_iter=1, batch_size=n, patch_shape=(3, SIDE, SIDE),
                                  patch_type="square", optimizer="pgd", targeted=True, verbose=False)
    x_np = x.cpu().numpy()
    y_np = np.eye(10, dtype=np.float32)[np.full(n, TARGET)]
    runs["art"] = lambda: art.generate(x_np, y=y_np)
    return runs


def main() -> None:
    """Parse the arguments, time each implementation in each setting, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dev, n = args.device, args.batch

    info = DATASETS["cifar10"]
    model = build_model("resnet20", 10, info.mean, info.std).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    np.random.seed(0)
    x_u8 = torch.randint(0, 256, (n, 3, IMAGE, IMAGE), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    y[y == TARGET] = (TARGET + 1) % 10
    result = {"benchmark": "patch_step", "batch": n, "patch_side": SIDE, "image": IMAGE, "device": device_name(dev),
              "machine": machine(), "repeats": args.repeats, "settings": {}}
    for setting, (rotation, scale) in SETTINGS.items():
        runs = implementations(model, x_u8, y, dev, rotation, scale)
        timed = interleaved_medians(runs, args.repeats, dev)
        rows: dict = {}
        for label, (wall, cpu) in timed.items():
            bare_wall, bare_cpu = timed["bare_amp" if label.endswith("_amp") else "bare"]  # same precision
            rows[label] = {"images_per_s": round(n / wall, 1), "ms_per_step": round(wall * 1000, 2),
                           "wall_ratio_to_bare": round(wall / bare_wall, 3),
                           "cpu_ratio_to_bare": round(cpu / bare_cpu, 3)}
            say(f"{setting:6s} {label:12s} {n / wall:9.1f} img/s  {wall * 1000:8.1f} ms/step  "
                f"ratio to bare of its precision {wall / bare_wall:5.2f}x")
        if "art" in timed:
            for label in ("project", "project_amp"):
                if label in timed:
                    rows[f"{label}_speedup_over_art"] = round(timed["art"][0] / timed[label][0], 2)
                    say(f"{setting:6s} {label} is {rows[f'{label}_speedup_over_art']:.2f}x faster than ART")
        else:
            rows["art"] = "skipped: ART not installed (pip install adversarial-robustness-toolbox==1.20.1)"
        result["settings"][setting] = {"rotation_deg": rotation, "scale_range": list(scale), **rows}
    emit(result)


if __name__ == "__main__":
    main()
