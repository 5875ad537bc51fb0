"""Training throughput: the project's Trainer against a bare loop of the same passes.

Run on demand (not a test):

    python benchmarks/bench_train.py [--device cuda] [--batches 20] [--repeats 3] > train.json

For each workload, one epoch of :class:`pipeline.train.Trainer` (``run_epoch``: the
real loop with its data path, random crop and flip, channels_last, the optional bf16
autocast, the epoch's metrics, and its test evaluation on 128 images) over
``--batches`` batches of 128 random CIFAR-size uint8 images, against a bare loop in
the same process: the same number of SGD steps on one pre-made float batch already on
the device, nothing else. Workloads:

* ``resnet20``, ``resnet110``: clean training (fp32, and bf16 autocast where the
  device runs bf16 natively: ``train.amp``);
* ``resnet20_pgd10``: Madry et al.'s adversarial training with PGD-10 (eps 8/255, step
  2/255; the held-out check off), against a bare loop doing the same ten input-gradient
  passes and the step.

Prints images per second and the Trainer's share of the bare loop's throughput as
JSON on stdout (a table on stderr). On a GPU the Trainer holds the data on the device
and augments it there; the target there is at least 80 % of the bare loop's images per
second.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import device_name, emit, interleaved_medians, machine, say

from pipeline.checkpoint import build_from_spec, model_spec
from pipeline.config import TrainConfig
from pipeline.data import DATASETS
from pipeline.precision import amp_dtype, autocast
from pipeline.train import Trainer

CFG = {"batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "pct_start": 0.15,
       "anneal_strategy": "linear", "label_smoothing": 0.0, "channels_last": True, "eval_batch_size": 128}
PGD10 = {"method": "pgd", "eps": 8 / 255, "step_size": 2 / 255, "steps": 10, "eval_images": 0}


def workloads(device: str) -> list[tuple[str, str, bool, dict | None]]:
    """(label, architecture, amp, adversarial params) of each timed workload."""
    out = []
    for arch in ("resnet20", "resnet110"):
        out.append((f"{arch}_fp32", arch, False, None))
        if amp_dtype(device, True) is not None:
            out.append((f"{arch}_bf16", arch, True, None))
    out.append(("resnet20_pgd10_fp32", "resnet20", False, PGD10))
    return out


def time_workload(arch: str, amp: bool, adversarial: dict | None, train: tuple, test: tuple, dev: str, batches: int,
                  repeats: int) -> tuple[float, float]:
    """Images per second of one Trainer epoch and of the bare loop of the same steps."""
    info = DATASETS["cifar10"]
    spec = model_spec(arch, 10, info.mean, info.std, None)
    cfg = TrainConfig(**CFG, epochs=1000, amp=amp, adversarial=adversarial)
    trainer = Trainer(spec, train, test, cfg, seed=0, num_threads=torch.get_num_threads())
    if trainer.device.type != torch.device(dev).type:
        raise SystemExit(f"the Trainer chose {trainer.device}, not {dev}")
    epoch = iter(range(1000))
    model = build_from_spec(spec).to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    xb = torch.rand(128, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    yb = torch.randint(0, 10, (128,), device=dev)
    dtype = amp_dtype(dev, amp)

    def bare() -> None:
        for _ in range(batches):
            x = xb
            if adversarial:  # PGD-10 from a random start, model frozen in eval mode, as adversarial_examples
                model.eval()
                x = (xb + torch.empty_like(xb).uniform_(-8 / 255, 8 / 255)).clamp(0, 1)
                for _ in range(10):
                    x.requires_grad_(True)
                    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), yb), x)
                    x = torch.min(torch.max(x.detach() + 2 / 255 * grad.sign(), xb - 8 / 255), xb + 8 / 255)
                    x = x.clamp(0, 1)
                model.train()
            with autocast(dev, dtype):
                loss = F.cross_entropy(model(x).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    timed = interleaved_medians({"bare": bare, "trainer": lambda: trainer.run_epoch(next(epoch))}, repeats, dev)
    n = len(train[1])
    return n / timed["trainer"][0], n / timed["bare"][0]


def main() -> None:
    """Parse the arguments, time every workload, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dev, n = args.device, 128 * args.batches
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)
    test = train[0][:128], train[1][:128]
    result: dict = {"benchmark": "train", "images_per_epoch": n, "batch": 128, "device": device_name(dev),
                    "machine": machine(), "repeats": args.repeats, "workloads": {}}
    for label, arch, amp, adversarial in workloads(dev):
        trainer_ips, bare_ips = time_workload(arch, amp, adversarial, train, test, dev, args.batches, args.repeats)
        result["workloads"][label] = {"trainer_images_per_s": round(trainer_ips, 1), "bare_images_per_s": round(bare_ips, 1),
                                      "trainer_share_of_bare": round(trainer_ips / bare_ips, 3)}
        say(f"{label:22s} trainer {trainer_ips:8.1f} img/s  bare {bare_ips:8.1f} img/s  "
            f"share {trainer_ips / bare_ips:5.1%}")
    emit(result)


if __name__ == "__main__":
    main()
