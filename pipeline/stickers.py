"""RP2 sticker experiments (the stage ``attack_rp2``): train the stickers, evaluate them
white and black box on the victims, summarise with intervals.

RP2 (Eykholt et al., CVPR 2018, Eq. 3-4; :mod:`pipeline.attacks.rp2`) optimises one sticker
perturbation, confined to the sticker mask, over the whole victim set. Every sticker trained
on a model is evaluated on it (white box, BlurNet's Table 2); every sticker made on the
undefended model ``none`` also on each defended model (black box, transferred, Table 1).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.attacks.rp2 import RP2Params, evaluate_rp2
from pipeline.cached import cached_map
from pipeline.cli import resume_dir
from pipeline.config import Params
from pipeline.metrics import direction, paired_difference_interval, rate_interval, versus_baseline
from pipeline.tasks import rp2_task

PER_STICKER = ["clean_accuracy", "fooling_rate", "target_success", "target_success_transformed", "l2_dissimilarity"]
"""The metrics of one sticker on one model (:func:`pipeline.attacks.rp2.evaluate_rp2`)."""


def train_stickers(params: Params, specs: dict[str, dict], weights: dict[str, str], victims: torch.Tensor,
                   labels: torch.Tensor, mask: torch.Tensor, cfgs: dict[int, RP2Params]) -> dict[tuple, dict]:
    """One sticker per (white-box defense, target, seed) of ``params.rp2``, a Ray task each,
    cached under ``.cache/attack_rp2/`` by the model's weights, the victims, the mask, the
    attack settings, the target and the seed (a killed run redoes only the missing ones).

    Args:
        specs, weights: per defense, its checkpoint dict and its file's SHA-256.
        victims: uint8 (N, 3, H, W); labels: int64 (N,); mask: float (1, H, W) in {0, 1}.
        cfgs: per target, the attack's params.

    Returns:
        ``{(defense, target, seed): {"delta": float (3, H, W), "history", "seconds", "node_id"}}``.
    """
    r = params.rp2
    inputs_key = {"victims": sha256_bytes(victims), "mask": sha256_bytes(mask), "attack": r.attack,
                  "true_class": r.true_class}

    def cache_file(job: tuple[str, int, int]) -> Path:
        defense, target, seed = job
        key = {**inputs_key, "weights": weights[defense], "target": target, "seed": seed}
        return resume_dir("attack_rp2", key) / "sticker.pt"

    def item(job: tuple[str, int, int]) -> dict[str, Any]:
        d, t, s = job
        return {"spec": specs[d], "victims": victims, "labels": labels, "mask": mask, "cfg": cfgs[t], "seed": s,
                "num_threads": params.resources.num_cpus}

    jobs = [(d, t, s) for d in r.white_box_defenses for t in r.targets for s in r.seeds]
    return cached_map(rp2_task, jobs, cache_file, item=item, desc="RP2 stickers (one task per defense, target, seed)",
                      num_cpus=params.resources.num_cpus, num_gpus=params.resources.num_gpus)


def evaluate_stickers(models: dict[str, torch.nn.Module], done: dict[tuple, dict], victims: torch.Tensor,
                      labels: torch.Tensor, mask: torch.Tensor, cfgs: dict[int, RP2Params], defenses: list[str],
                      eval_transforms: int) -> tuple[pd.DataFrame, dict[tuple[str, str], torch.Tensor]]:
    """Every sticker of ``done`` on the model it was made on (``white_box``) and, for the
    undefended model's, on every other model of ``defenses`` (``black_box``).

    Returns:
        ``(rows, fooled)``: one row per (defense, setting, target, seed) with the
        :data:`PER_STICKER` columns, black box first; and per (defense, setting), float
        (N,): per victim, the fraction of the row's stickers that fool it (for
        :func:`summarise`'s paired intervals).
    """
    rows, fooled = [], {}
    for (source, target, seed), res in done.items():
        for defense in defenses:
            if source == defense:
                setting = "white_box"
            elif source == "none":
                setting = "black_box"
            else:
                continue
            m = evaluate_rp2(models[defense], victims, labels, res["delta"], mask, cfgs[target],
                             transforms=eval_transforms, seed=seed)
            if eval_transforms == 0:
                m["target_success_transformed"] = float("nan")
            fooled.setdefault((defense, setting), []).append(m["fooled"].float())
            rows.append({"defense": defense, "setting": setting, "source": source, "target": target, "seed": seed,
                         **{k: m[k] for k in PER_STICKER}, "seconds": res["seconds"]})
    table = pd.DataFrame(rows).sort_values(["setting", "defense", "target", "seed"], key=setting_order)
    return table, {k: torch.stack(v).mean(0) for k, v in fooled.items()}


def summarise(rows: pd.DataFrame, n_victims: int, fooled: dict[tuple[str, str], torch.Tensor] | None = None) -> dict:
    """Per (defense, setting): means over targets and seeds, the worst target, and 95 %
    Wilson intervals (Wilson 1927, :func:`pipeline.metrics.rate_interval`) of both rates.

    The intervals are over the ``n_victims`` victims: every sticker is evaluated on the
    same victims, so the victims, not the stickers, are the independent draws; a rate
    averaged over targets and seeds is read as ``round(rate * n_victims)`` of
    ``n_victims``. With 40 victims one victim is 2.5 points and a rate near 0.3 has an
    interval of about +-0.14: differences inside it are noise.

    Args:
        rows: one row per (defense, setting, target, seed) with the :data:`PER_STICKER` columns.
        n_victims: victims every sticker was evaluated on (> 0).
        fooled: optional, per (defense, setting), float (n_victims,): per victim, the fraction
            of the row's stickers that fool it. With it, each row's difference from the
            undefended model's white-box row is read from a paired bootstrap over the victims
            (:func:`pipeline.metrics.paired_difference_interval`: both rows are measured on
            the same victims, so a victim easy or hard for both cancels); without it, from
            whether the two Wilson intervals overlap (:func:`pipeline.metrics.versus_baseline`).

    Returns:
        ``{defense: {setting: {"clean_accuracy", "fooling_rate_mean",
        "fooling_rate_mean_ci_low", "fooling_rate_mean_ci_high", "fooling_rate_worst",
        "fooling_rate_worst_ci_low", "fooling_rate_worst_ci_high", "worst_target",
        "target_success_mean", "target_success_transformed_mean", "l2_dissimilarity_mean",
        "n_stickers", "n_seeds", "n_victims", "fooling_rate_mean_vs_none"}}}``; fractions in
        [0, 1]; ``fooling_rate_mean_vs_none`` is "higher", "lower" or "within noise": the mean
        fooling rate against the undefended model's white-box one ("" for that row itself or
        without an undefended row); with ``fooled``, also ``fooling_rate_mean_diff`` and its
        95 % interval ``fooling_rate_mean_diff_ci_low``/``_high``.

    Raises:
        ValueError: ``n_victims`` < 1.
    """
    if n_victims < 1:
        raise ValueError(f"summarise: n_victims must be >= 1, got {n_victims}")

    out: dict = {}
    for (defense, setting), g in rows.groupby(["defense", "setting"], sort=False):
        per_target = g.groupby("target")["fooling_rate"].mean()
        mean, worst = float(g["fooling_rate"].mean()), float(per_target.max())
        (mean_low, mean_high), (worst_low, worst_high) = rate_interval(mean, n_victims), rate_interval(worst, n_victims)
        out.setdefault(defense, {})[setting] = {
            "clean_accuracy": float(g["clean_accuracy"].iloc[0]),
            "fooling_rate_mean": mean,
            "fooling_rate_mean_ci_low": mean_low,
            "fooling_rate_mean_ci_high": mean_high,
            "fooling_rate_worst": worst,
            "fooling_rate_worst_ci_low": worst_low,
            "fooling_rate_worst_ci_high": worst_high,
            "worst_target": int(per_target.idxmax()),
            "target_success_mean": float(g["target_success"].mean()),
            "target_success_transformed_mean": float(g["target_success_transformed"].mean()),
            "l2_dissimilarity_mean": float(g["l2_dissimilarity"].mean()),
            "n_stickers": int(len(g)),
            "n_seeds": int(g["seed"].nunique()),
            "n_victims": int(n_victims),
        }
    base = out.get("none", {}).get("white_box")
    paired = fooled is not None and ("none", "white_box") in fooled
    for d, by in out.items():
        for setting, v in by.items():  # the undefended model's white-box rate is the baseline itself
            if base is None or v is base:
                v["fooling_rate_mean_vs_none"] = ""
            elif paired:
                diff, low, high = paired_difference_interval(fooled[(d, setting)], fooled[("none", "white_box")])
                v.update(fooling_rate_mean_diff=diff, fooling_rate_mean_diff_ci_low=low,
                         fooling_rate_mean_diff_ci_high=high, fooling_rate_mean_vs_none=direction(low, high))
            else:
                v["fooling_rate_mean_vs_none"] = versus_baseline(
                    v["fooling_rate_mean_ci_low"], v["fooling_rate_mean_ci_high"],
                    base["fooling_rate_mean_ci_low"], base["fooling_rate_mean_ci_high"])
    return out


def sha256_bytes(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (cache keys of in-memory inputs)."""
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def setting_order(col: pd.Series) -> pd.Series:
    """Sort key of a summary or sticker table: black box before white box (other columns as they are)."""
    return col.map({"black_box": 0, "white_box": 1}) if col.name == "setting" else col
