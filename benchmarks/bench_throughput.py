"""Throughput of the pipeline's hot loops against bare loops of the same passes.

Run on demand (not a test):  python benchmarks/bench_throughput.py [--device cuda] [--steps 20]

* patch: one AdvP step of ``train_universal_patch`` (random placement per image,
  forward, gradient to the patch only, signed update) versus a bare loop that
  pastes at fixed slices and does the same forward/backward;
* train: one SGD step of ResNet-20 (channels_last) as the Trainer does it.

Prints images per second for each and the ratio (pipeline / bare).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipeline.attacks.patch import apply_patch, patch_loss, sample_placements
from pipeline.models import build_model


def timed(fn, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=80)
    args = parser.parse_args()
    dev, n = args.device, args.batch
    model = build_model("resnet20", 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(n, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (n,), device=dev)
    gen = torch.Generator().manual_seed(0)
    state = {"patch": torch.zeros(3, 10, 10, device=dev)}

    def pipeline_step():
        pl = sample_placements(n, (32, 32), 10, generator=gen)
        patch = state["patch"].requires_grad_(True)
        loss = patch_loss(model(apply_patch(x, patch, pl)), y, 5)
        (grad,) = torch.autograd.grad(loss, patch)
        state["patch"] = (patch.detach() - 2 / 255 * grad.sign()).clamp_(0, 1)

    def bare_step():
        patch = state["patch"].requires_grad_(True)
        xa = x.clone()
        xa[:, :, 3:13, 5:15] = patch
        loss = F.cross_entropy(model(xa), torch.full_like(y, 5))
        (grad,) = torch.autograd.grad(loss, patch)
        state["patch"] = (patch.detach() - 2 / 255 * grad.sign()).clamp_(0, 1)

    t_pipe = timed(pipeline_step, args.steps, 3, dev)
    t_bare = timed(bare_step, args.steps, 3, dev)
    print(f"patch step  pipeline {n * args.steps / t_pipe:8.0f} img/s   bare {n * args.steps / t_bare:8.0f} img/s"
          f"   ratio {t_pipe / t_bare:.2f}x")

    net = build_model("resnet20", 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    xb = torch.rand(128, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    yb = torch.randint(0, 10, (128,), device=dev)

    def train_step():
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_train = timed(train_step, args.steps, 3, dev)
    print(f"train step  ResNet-20 {128 * args.steps / t_train:8.0f} img/s (batch 128, channels_last)")


if __name__ == "__main__":
    main()
