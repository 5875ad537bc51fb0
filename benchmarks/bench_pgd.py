"""PGD throughput: the project's ``pgd`` against ART, torchattacks and a bare loop.

Run on demand (not a test):

    python benchmarks/bench_pgd.py [--device cuda] [--batch 128] [--steps 10] [--repeats 5]

Times one L-inf PGD run (eps 8/255, step 2/255, random start, 1 restart,
``--steps`` iterations) on a batch of random CIFAR-size images (3 x 32 x 32)
with a randomly initialised ResNet-20 (weights do not matter for timing), for:

* ``project``: :func:`pipeline.attacks.pgd.pgd` with ``record_loss=False``, as
  the evaluate stage and adversarial training call it (``steps`` forward/backward
  passes, no final loss evaluation);
* ``art``: ART's ``ProjectedGradientDescentPyTorch`` (numpy in and out, as its
  API takes; the conversions are part of its cost);
* ``torchattacks``: ``torchattacks.PGD``, if importable (otherwise the line
  says how to install it: ``pip install --no-deps torchattacks==3.5.1``);
* ``bare``: the same ``steps`` forward/backward passes to the input with a
  signed step, nothing else, in this process.

Each is warmed up once, then timed ``--repeats`` times, the implementations
taking turns (so that a change in the machine's load hits all alike); prints
the median images per second and the ratios of its median wall time and
median process CPU time to the bare loop's (on a shared CPU the CPU-time ratio
is the steadier one; on a GPU read the wall-time ratio), as JSON on stdout
(a table on stderr).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from timing import device_name, emit, interleaved_medians, machine, say

from pipeline.attacks.pgd import ThreatModel, pgd
from pipeline.data import DATASETS
from pipeline.models import build_model

TORCHATTACKS_INSTALL = "pip install --no-deps torchattacks==3.5.1"


def main() -> None:
    """Parse the arguments, time each implementation, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dev, n, steps = args.device, args.batch, args.steps
    eps, alpha = 8 / 255, 2 / 255

    info = DATASETS["cifar10"]
    model = build_model("resnet20", 10, info.mean, info.std).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    x = torch.rand(n, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (n,), device=dev)

    threat = ThreatModel(norm="linf", eps=eps, step_size=alpha, steps=steps, random_start=True, restarts=1)
    gen = torch.Generator().manual_seed(0)

    def bare() -> torch.Tensor:
        """``steps`` forward/backward passes to the input, each followed by a signed step."""
        xa = x.clone()
        for _ in range(steps):
            xa.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
            xa = (xa.detach() + alpha * grad.sign()).clamp_(0, 1)
        return xa

    runs: dict[str, Callable[[], object] | str] = {
        "bare": bare,
        "project": lambda: pgd(model, x, y, threat, generator=gen, record_loss=False).x_adv,
    }

    try:
        from art.attacks.evasion import ProjectedGradientDescentPyTorch
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        runs["art"] = "ART not installed: pip install adversarial-robustness-toolbox==1.20.1"
    else:
        clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 32, 32), nb_classes=10,
                                clip_values=(0.0, 1.0), preprocessing=None,
                                device_type="gpu" if dev.startswith("cuda") else "cpu")
        art_pgd = ProjectedGradientDescentPyTorch(clf, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                                  num_random_init=1, batch_size=n, verbose=False)
        x_np, y_np = x.cpu().numpy(), y.cpu().numpy()
        runs["art"] = lambda: art_pgd.generate(x_np, y=y_np)

    try:
        import torchattacks
    except ImportError:
        runs["torchattacks"] = f"torchattacks not installed: {TORCHATTACKS_INSTALL}"
    else:
        ta_pgd = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        runs["torchattacks"] = lambda: ta_pgd(x, y)

    say(f"PGD-{steps} L-inf, ResNet-20, batch {n}, median of {args.repeats} interleaved repeats, "
        f"device {device_name(dev)}")
    timed = interleaved_medians({k: v for k, v in runs.items() if not isinstance(v, str)}, args.repeats, dev)
    bare_wall, bare_cpu = timed["bare"]
    result: dict = {"benchmark": "pgd", "steps": steps, "batch": n, "eps": eps, "step_size": alpha,
                    "device": device_name(dev), "machine": machine(), "repeats": args.repeats, "implementations": {}}
    for label, run in runs.items():
        if isinstance(run, str):
            say(f"{label:13s} skipped: {run}")
            result["implementations"][label] = f"skipped: {run}"
            continue
        wall, cpu = timed[label]
        result["implementations"][label] = {"images_per_s": round(n / wall, 1), "ms_per_batch": round(wall * 1000, 2),
                                            "wall_ratio_to_bare": round(wall / bare_wall, 3),
                                            "cpu_ratio_to_bare": round(cpu / bare_cpu, 3)}
        say(f"{label:13s} {n / wall:9.1f} img/s  {wall * 1000:9.1f} ms/batch  ratio to bare: wall {wall / bare_wall:5.2f}x"
            f"  process CPU time {cpu / bare_cpu:5.2f}x")
    emit(result)


if __name__ == "__main__":
    main()
