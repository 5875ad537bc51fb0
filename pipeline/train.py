"""Standard training and batched inference.

:class:`Trainer` trains a registered model with SGD (momentum, Nesterov, weight
decay) under a one-cycle learning-rate schedule (Smith and Topin 2019) and the
standard CIFAR augmentation (random crop with 4-pixel zero padding, horizontal
flip; He et al. 2016, Section 4.2) done with ``torchvision.transforms.v2`` on
uint8 tensors on the CPU; on a GPU the uint8 training set is held on the device and
augmented there a batch at a time (:func:`batch_crop_flip`, the same transforms), so
training is not bound by the host. Mixed precision: ``train.amp``
(:mod:`pipeline.precision`). The epoch's loss and accuracy are summed on the device
and read once an epoch (no per-step synchronisation). It runs one epoch per call so that the caller (the stage,
through a Ray actor) can checkpoint, log and resume between epochs; each epoch
is seeded by ``(seed, epoch)``, so a resumed run repeats exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipeline.checkpoint import build_from_spec
from pipeline.data.datasets import TensorImageDataset
from pipeline.defenses.base import penalty_modules, training_hooks, training_penalty
from pipeline.precision import amp_dtype, autocast, precision_name

if TYPE_CHECKING:  # the params schema sits above the trainer; only its type is named here
    from pipeline.config import TrainConfig


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CROP_PADDING = 4
"""Zero padding of the random-crop augmentation, pixels (He et al. 2016, Section 4.2)."""


def cifar_augmentation(image_size: int | tuple[int, int] = 32, padding: int = CROP_PADDING,
                       horizontal_flip: bool = True) -> v2.Compose:
    """Random crop of ``image_size`` (a side, or ``(H, W)``) with zero padding and (unless
    ``horizontal_flip`` is False, as for traffic signs, whose mirror image can be another
    class) a horizontal flip, on one uint8 (C, H, W) tensor."""
    crop = [v2.RandomCrop(image_size, padding=padding)]
    return v2.Compose(crop + [v2.RandomHorizontalFlip()] if horizontal_flip else crop)


def batch_crop_flip(
    x: torch.Tensor, padding: int, horizontal_flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """The augmentation of :func:`cifar_augmentation` for a whole batch at once, on its device.

    Each image gets its own random crop of the zero-padded image (offsets uniform in
    ``[0, 2 * padding]``, as ``v2.RandomCrop(padding=...)``) and, if ``horizontal_flip``,
    a flip with probability 1/2 (as ``v2.RandomHorizontalFlip``), by one gather: no
    Python loop over images, no host-device copy of the images. Used where the training
    data lives on a GPU; the draws come from the CPU ``generator`` (reproducible on any
    device). Matches ``torchvision.transforms.v2.functional`` ``pad``, ``crop`` and
    ``horizontal_flip`` image for image (tested).

    Args:
        x: uint8 (N, C, H, W), any device.
        padding: zero padding on each side, pixels (>= 0).
        horizontal_flip: flip half of the images, at random.
        generator: CPU generator of the offsets and flips.

    Returns:
        uint8 (N, C, H, W) on ``x``'s device.
    """
    n, c, h, w = x.shape
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5 if horizontal_flip else torch.zeros(n, dtype=torch.bool)
    rows = (top[:, None] + torch.arange(h)).to(x.device)  # (N, H) rows of the padded image
    cols = left[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(x.device)  # (N, W), reversed where flipped
    padded = F.pad(x, (padding, padding, padding, padding))
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def iterate_batches(
    x: torch.Tensor, y: torch.Tensor | None, batch_size: int, device: torch.device | str, channels_last: bool = False
):
    """Yield float batches in [0, 1] on ``device`` (with labels if ``y`` is given), in order."""
    for s in range(0, len(x), batch_size):
        xb = x[s : s + batch_size].to(device, non_blocking=True).float().div_(255)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield xb if y is None else (xb, y[s : s + batch_size].to(device, non_blocking=True))


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int = 500, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Predicted classes, int64 (N,) on the CPU, for uint8 images (N, 3, H, W)."""
    model.eval()
    preds = [model(xb).argmax(1) for xb in iterate_batches(x, None, batch_size, device)]
    return torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.int64)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500, device: Any = "cpu") -> float:
    """Clean top-1 accuracy in [0, 1] on uint8 images (N, 3, H, W) and labels (N,)."""
    return int((predict(model, x, batch_size, device) == y).sum()) / max(len(y), 1)


class Trainer:
    """Train one model, an epoch per :meth:`run_epoch` call.

    Args:
        spec: checkpoint dict (:mod:`pipeline.checkpoint`) of the untrained model.
        train: uint8 images (N, 3, H, W) and int64 labels (N,).
        test: same, evaluated after every epoch.
        cfg: the ``train`` params section, a :class:`pipeline.config.TrainConfig` (epochs,
            batch_size, lr, momentum, nesterov, weight_decay, pct_start, anneal_strategy,
            label_smoothing, channels_last, eval_batch_size, amp: bf16 autocast of the
            training forward passes where the device supports it, :mod:`pipeline.precision`;
            the adversarial examples and the test accuracy are computed in float32;
            adversarial: the training hook of that key).
        seed: seeds initialisation and every epoch's order and augmentation.
        num_threads: torch intra-op threads (the CPUs this task was given).
        horizontal_flip: use flip augmentation (:func:`pipeline.data.horizontal_flip`: ``train.augment``'s
            or the prepared dataset's). The crop's zero padding is ``cfg.augment.crop_padding``
            (:data:`CROP_PADDING` without ``train.augment``).
        shard: ``(rank, world_size)`` of data-parallel training (Ray Train,
            :mod:`pipeline.training_run`): with ``world_size > 1`` a
            ``torch.distributed`` process group must exist; every worker draws the
            same seeded epoch order, takes ``batch[rank::world_size]`` of each global
            batch of ``batch_size`` images (a last global batch with fewer images
            than workers is dropped), and ``DistributedDataParallel`` averages the
            workers' gradients: the global batch's mean gradient when it splits
            evenly, so the same ``lr`` applies (BatchNorm statistics are per worker,
            as in plain DDP). Epoch metrics are
            summed over workers; the test accuracy is measured by rank 0 only (NaN
            on the others).

    Raises:
        ValueError: a bad ``shard``, or a one-cycle warm-up of exactly one step.
        TypeError: ``cfg`` is a dict (validate it: ``TrainConfig(**section)``).
    """

    def __init__(
        self,
        spec: dict[str, Any],
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        cfg: TrainConfig,
        seed: int,
        num_threads: int = 1,
        horizontal_flip: bool = True,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if isinstance(cfg, Mapping):
            raise TypeError("Trainer takes a validated pipeline.config.TrainConfig, not a dict: TrainConfig(**section)")
        self.rank, self.world_size = shard
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"shard {shard}: need 0 <= rank < world_size")
        torch.set_num_threads(max(1, num_threads))
        torch.manual_seed(seed)
        self.device = default_device()
        self.amp_dtype = amp_dtype(self.device, bool(cfg.amp))
        self.cfg, self.seed = cfg, seed
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = build_from_spec(spec).to(self.device, memory_format=self.memory_format)
        self.forward_model: nn.Module = self.model  # what the training step calls: DDP-wrapped when sharded
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        self.spec = spec
        image_size = tuple(train[0].shape[-2:])
        self.crop_padding = cfg.augment.crop_padding if cfg.augment is not None else CROP_PADDING
        augment = cifar_augmentation(image_size, self.crop_padding, horizontal_flip=horizontal_flip)
        self.train_set: Dataset = TensorImageDataset(*train, transform=augment)
        self.horizontal_flip = horizontal_flip
        # on a GPU the uint8 training set lives on the device and is augmented there in
        # batches (batch_crop_flip), so training is not bound by the host; on the CPU a
        # DataLoader applies torchvision's v2 transforms image by image
        self.train_on_device = (train[0].to(self.device), train[1].to(self.device)) \
            if self.device.type != "cpu" else None
        self.test = test
        steps_per_epoch = -(-len(self.train_set) // cfg.batch_size)
        warmup = cfg.pct_start * cfg.epochs * steps_per_epoch
        if abs(warmup - 1) < 1e-9:  # torch's OneCycleLR divides by (warm-up steps - 1)
            raise ValueError(f"train: a one-cycle warm-up of exactly 1 step ({cfg.epochs} epochs x {steps_per_epoch} "
                             f"steps x pct_start {cfg.pct_start}) divides by zero; change pct_start or batch_size")
        self.opt = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
        self.hooks = training_hooks(cfg)  # a defense's change to training: train.adversarial (Madry et al. 2018)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt,
            max_lr=cfg.lr,
            epochs=cfg.epochs,
            steps_per_epoch=steps_per_epoch,
            pct_start=cfg.pct_start,
            anneal_strategy=cfg.anneal_strategy,
        )

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch, then evaluate on the test split.

        Returns:
            ``{"train_loss", "train_accuracy", "test_accuracy", "lr", "train_images"}``
            (accuracies in [0, 1], ``lr`` the last learning rate used,
            ``train_images`` the images trained on this epoch, over all workers).

        Raises:
            FloatingPointError: the epoch's loss is not finite (training diverged); the
                message names the learning rate to lower.
        """
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        penalty_sum = torch.zeros((), device=self.device)
        penalised = bool(penalty_modules(self.model))  # defenses with a training-loss term (BlurNet)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7)  # random starts of this epoch
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen = 0
        lr = self.sched.get_last_lr()[0]
        for xb, y in self._epoch_batches(epoch):
            x = xb.float().div_(255).contiguous(memory_format=self.memory_format)
            for hook in self.hooks:  # e.g. adversarial training: the step learns from the batch under attack
                x = hook.training_batch(self.model, x, y, gen)
            with autocast(self.device, self.amp_dtype):  # bf16 forward where enabled; loss in float32
                logits = self.forward_model(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
            if penalised:  # the defenses' training-loss hooks (BlurNet's L-inf / TV penalties)
                penalty = training_penalty(self.model).to(loss.device)
                penalty_sum += penalty.detach() * len(y)
                loss = loss + penalty
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            lr = self.sched.get_last_lr()[0]
            self.sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        if self.world_size > 1:  # one all-reduce an epoch: the sums over every worker's shard
            import torch.distributed as dist

            sums = torch.stack([loss_sum.double(), penalty_sum.double(), correct.double(),
                                torch.tensor(float(seen), dtype=torch.float64, device=self.device)])
            dist.all_reduce(sums)
            loss_sum, penalty_sum, correct, seen = sums[0], sums[1], sums[2], int(sums[3])
        if not torch.isfinite(loss_sum):  # checked once an epoch: no per-step host-device synchronisation
            raise FloatingPointError(f"training diverged in epoch {epoch + 1} (loss is {float(loss_sum)}): lower "
                                     f"train.lr (now {self.cfg.lr}) or raise train.pct_start")
        test_acc = accuracy(self.model, *self.test, batch_size=self.cfg.eval_batch_size, device=self.device) \
            if self.rank == 0 else float("nan")
        out = {
            "train_loss": float(loss_sum) / seen,
            "train_accuracy": float(correct) / seen,
            "test_accuracy": test_acc,
            "lr": float(lr),
            "train_images": seen,
        }
        if penalised:
            out["train_penalty"] = float(penalty_sum) / seen
        for hook in self.hooks:  # held-out metrics of the hooks (adversarial training's robust accuracy)
            if self.rank == 0:
                out.update(hook.epoch_metrics(self.model, self.test, self.cfg.eval_batch_size, self.device,
                                              self.seed, epoch))
            else:
                out.update(dict.fromkeys(hook.metric_names(), float("nan")))
        return out

    def _epoch_batches(self, epoch: int):
        """Yield this epoch's augmented batches, uint8 (B, C, H, W) and int64 (B,) on the
        device, in an order and with augmentations seeded by ``(seed, epoch)``."""
        seed = self.seed * 100_003 + epoch
        bs = self.cfg.batch_size
        if self.train_on_device is not None:
            x, y = self.train_on_device
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(self.device)
            gen = torch.Generator().manual_seed(seed + 1)
            for s in range(0, len(x) - self.world_size + 1, bs):  # sharded: no global batch smaller than the world
                idx = order[s : s + bs][self.rank :: self.world_size]
                yield batch_crop_flip(x[idx], self.crop_padding, self.horizontal_flip, gen), y[idx]
            return
        torch.manual_seed(seed + self.rank)  # the v2 transforms draw from torch's global RNG
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(seed))
        batches = [order[s : s + bs][self.rank :: self.world_size].tolist()  # this worker's part of each batch
                   for s in range(0, len(order) - self.world_size + 1, bs)]
        loader = DataLoader(self.train_set, batch_sampler=batches)
        for xb, yb in loader:
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)

    def precision(self) -> str:
        """``"bf16-autocast"`` or ``"fp32"``: how the training forward passes run (``train.amp``)."""
        return precision_name(self.amp_dtype)

    def state(self) -> dict[str, Any]:
        """Model, optimiser and schedule state (CPU tensors) for a resume checkpoint."""
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.opt.state_dict()),
            "scheduler": self.sched.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights (of the ``Normalized`` model), CPU tensors."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
