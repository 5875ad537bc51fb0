"""RP2's success-vs-distortion curve, and the ``lambda`` that meets a target L2 dissimilarity,
chosen on validation stop signs.

Run from the project root after ``dvc repro train_baseline`` (it reads ``params.yaml``, the
prepared validation split ``data/prepared/<dataset>/val.pt``, RP2's victims and mask, and
``models/<model>/baseline.pt``)::

    python scripts/rp2_distortion_curve.py --lambdas 0.001,0.003,0.01,0.03,0.1 --target-l2 0.207

For every ``lambda`` of ``--lambdas``, every target of ``--targets`` (default
``rp2.targets``) and every seed of
``--seeds`` it trains one RP2 sticker (Eykholt et al., CVPR 2018, Eq. 3-4;
:func:`pipeline.attacks.rp2.train_rp2`, every other setting from ``rp2.attack``) on the
undefended model, twice:

* on the validation split's images of ``rp2.true_class`` (training images that prepare
  held out; no test image). **The choice of lambda reads these alone**: the mean L2
  dissimilarity ``||x - x_adv||_2 / ||x_adv||_2`` falls as lambda grows, and the kept
  lambda is where the validation curve crosses ``--target-l2`` (linear interpolation in
  log lambda between the two grid points around it; the grid's end when it never crosses).
* on RP2's victims (``rp2.victims``), unless ``--no-victims``: the curve a reader compares
  with the paper (fooling rate and target success against L2 dissimilarity), reported and
  never used to choose anything.

Writes the per-sticker table (``--out``, CSV; a rerun keeps the rows it already holds with
the same steps, learning rate, transforms and NPS weight, so an extended or killed sweep
trains only the missing stickers) and the figure (``--figure``, PNG: mean
fooling rate with its 95 % Wilson interval over the (sticker, image) pairs against mean L2
dissimilarity, one line per image set), and prints the chosen lambda. Stickers run as Ray
tasks (one per lambda, target, seed and image set), as in ``attack_rp2``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pipeline.attacks.rp2 import RP2Params, evaluate_rp2, lambda_for_dissimilarity  # noqa: E402
from pipeline.checkpoint import build_from_spec, load_checkpoint  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data import load_meta, load_validation  # noqa: E402
from pipeline.data.rp2 import load_mask, load_victims  # noqa: E402
from pipeline.distributed import init_ray, ray_map  # noqa: E402
from pipeline.io import atomic_write, save_figure  # noqa: E402
from pipeline.layout import rp2_mask_path as mask_path  # noqa: E402
from pipeline.metrics import rate_interval  # noqa: E402
from pipeline.papers import BLURNET  # noqa: E402
from pipeline.tasks import rp2_task  # noqa: E402


def _finished_rows(path: Path, settings: dict) -> pd.DataFrame:
    """The rows of an earlier sweep in ``path`` made with the same ``settings`` (empty if none)."""
    if not path.is_file():
        return pd.DataFrame()
    old = pd.read_csv(path)
    same = pd.Series(True, index=old.index)
    for k, v in settings.items():
        same &= old[k].eq(v) if k in old else False
    return old[same].reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    """Sweep lambda; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", default="0.001,0.003,0.01,0.03,0.1", help="comma-separated, each > 0")
    parser.add_argument("--seeds", default="0", help="comma-separated sticker seeds")
    parser.add_argument("--targets", default=None, help="comma-separated target classes (default: rp2.targets)")
    parser.add_argument("--target-l2", type=float, default=0.207, help="BlurNet's slides: 0.207 on the baseline")
    parser.add_argument("--steps", type=int, default=None, help="default: rp2.attack.steps")
    parser.add_argument("--no-victims", action="store_true", help="validation stickers only (no curve on the victims)")
    parser.add_argument("--out", default="calibration/rp2_distortion.csv")
    parser.add_argument("--figure", default="calibration/rp2_distortion.png")
    args = parser.parse_args(argv)
    params = load_params()
    r = params.rp2
    lambdas = [float(v) for v in args.lambdas.split(",")]
    if not lambdas or min(lambdas) <= 0:
        raise SystemExit(f"--lambdas {args.lambdas}: give comma-separated values > 0")
    seeds = [int(v) for v in args.seeds.split(",")]
    targets = [int(v) for v in args.targets.split(",")] if args.targets else list(r.targets)
    prepared = Path("data/prepared") / params.data.dataset
    _, h, w = load_meta(prepared)["image_shape"]
    x_val, y_val = load_validation(prepared)
    sets = {"validation": x_val[y_val == r.true_class]}
    if len(sets["validation"]) == 0:
        raise SystemExit(f"the validation split holds no image of rp2.true_class {r.true_class}; raise data.val_per_class")
    if not args.no_victims:
        sets["victims"] = load_victims(r.victims, size=h)[0]
    mask = load_mask(mask_path(r.victims, r.mask), size=(h, w))
    spec = load_checkpoint(Path("models") / params.model.name / "baseline.pt")
    attack = {k: v for k, v in r.attack.items() if k not in ("lam", "lambda")}
    if args.steps:
        attack["steps"] = args.steps
    cfgs = {(lam, t): RP2Params.model_validate({**attack, "lambda": lam, "target": t})
            for lam in lambdas for t in targets}
    full = RP2Params.model_validate(attack).model_dump(by_alias=True)
    settings = {k: full[k] for k in ("steps", "lr", "eot_samples", "nps_weight")}
    jobs = [(s, lam, t, seed) for s in sets for lam in lambdas for t in targets for seed in seeds]
    kept = _finished_rows(Path(args.out), settings)  # a resumed or extended sweep recomputes nothing it has
    done = set(zip(kept["images"], kept["lam"], kept["target"], kept["seed"], strict=True)) if len(kept) else set()
    jobs = [j for j in jobs if j not in done]
    print(f"{len(jobs)} stickers to train ({len(kept)} kept from {args.out}): lambdas {lambdas}, targets {targets}, "
          f"seeds {seeds}, {len(sets['validation'])} validation stop signs"
          + ("" if args.no_victims else f", {len(sets['victims'])} victims"))
    if jobs:
        init_ray()
    items = [{"spec": spec, "victims": sets[s], "labels": torch.full((len(sets[s]),), r.true_class),
              "mask": mask, "cfg": cfgs[(lam, t)], "seed": seed, "num_threads": params.resources.num_cpus}
             for s, lam, t, seed in jobs]
    results = ray_map(rp2_task, items, num_cpus=params.resources.num_cpus, desc="RP2 stickers") if jobs else []
    model = build_from_spec(spec).eval()
    rows = []
    for (s, lam, t, seed), res in zip(jobs, results, strict=True):
        x = sets[s]
        m = evaluate_rp2(model, x, torch.full((len(x),), r.true_class), res["delta"], mask, cfgs[(lam, t)])
        rows.append({"images": s, "lam": lam, "target": t, "seed": seed, "n_images": len(x),
                     **{k: m[k] for k in ("clean_accuracy", "fooling_rate", "target_success", "l2_dissimilarity")},
                     **settings, "seconds": res["seconds"]})
    table = pd.concat([kept, pd.DataFrame(rows)], ignore_index=True)
    table = table[table["lam"].isin(lambdas) & table["target"].isin(targets) & table["seed"].isin(seeds)
                  & table["images"].isin(list(sets))]
    atomic_write(Path(args.out), lambda f: f.write(table.to_csv(index=False).encode()))
    curve = table.groupby(["images", "lam"], as_index=False).agg(
        l2_dissimilarity=("l2_dissimilarity", "mean"), fooling_rate=("fooling_rate", "mean"),
        target_success=("target_success", "mean"), n_images=("n_images", "sum"))
    val = curve[curve["images"] == "validation"]
    lam = lambda_for_dissimilarity(val["lam"].tolist(), val["l2_dissimilarity"].tolist(), args.target_l2)
    print(curve.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"lambda for a mean validation L2 dissimilarity of {args.target_l2}: {lam:.4g}")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s, g in curve.groupby("images"):
        g = g.sort_values("l2_dissimilarity")
        bands = [rate_interval(f, n) for f, n in zip(g["fooling_rate"], g["n_images"], strict=True)]
        lo, hi = zip(*bands, strict=True)
        (line,) = ax.plot(g["l2_dissimilarity"], g["fooling_rate"], marker="o", label=f"{s} (fooling rate)")
        ax.fill_between(g["l2_dissimilarity"], lo, hi, alpha=0.2, color=line.get_color())
        ax.plot(g["l2_dissimilarity"], g["target_success"], ls="--", marker=".", color=line.get_color(),
                label=f"{s} (target success)")
    _, _, avg, worst, l2 = BLURNET["table2"]["none"]
    ax.plot([l2], [avg], marker="*", ms=12, color="black", ls="none",
            label=f"slides' baseline (LISA): {100 * avg:.2f} % mean, {100 * worst:.0f} % worst target")
    ax.axvline(args.target_l2, color="grey", ls=":", label=f"target L2 {args.target_l2}")
    ax.set_xlabel("mean L2 dissimilarity ||x - x_adv|| / ||x_adv||")
    ax.set_ylabel("rate (95 % Wilson band)")
    ax.set_ylim(-0.02, 1)
    ax.set_title(f"RP2 on the undefended {params.model.name}: success vs distortion", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, Path(args.figure))


if __name__ == "__main__":
    main()
