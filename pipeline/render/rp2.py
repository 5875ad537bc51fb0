"""RP2's stickers as tables and a figure (the stage ``attack_rp2``; the numbers are
:mod:`pipeline.stickers`')."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pipeline import papers  # noqa: E402
from pipeline.attacks.rp2 import apply_rp2  # noqa: E402
from pipeline.io import save_figure  # noqa: E402
from pipeline.metrics import difference_text  # noqa: E402
from pipeline.stickers import setting_order  # noqa: E402


def rate_ci(v: dict, key: str) -> str:
    """``"0.3000 [0.1800, 0.4500]"``: a rate of :func:`summarise` with its 95 % interval."""
    return f"{v[key]:.4f} [{v[key + '_ci_low']:.4f}, {v[key + '_ci_high']:.4f}]"


def slides_row(defense: str, setting: str) -> str:
    """The row of BlurNet's slides (seed 001, :data:`pipeline.papers.BLURNET`) that a summary row
    reproduces: Table 1 for black-box stickers, Table 2 for white-box ones; the undefended model's
    white-box row is both tables' baseline. ``""`` for a model the slides do not print."""
    t1, t2 = papers.BLURNET["table1"].get(defense), papers.BLURNET["table2"].get(defense)
    if defense == "none":
        return f"Table 1: {t1[0]}; Table 2: {t2[0]}"
    row = t1 if setting == "black_box" else t2
    return f"Table {1 if setting == 'black_box' else 2}: {row[0]}" if row else ""


def markdown(table: pd.DataFrame, summary: dict, classes: list[str], r, n: int) -> str:
    """The summary table (BlurNet's Tables 1 and 2 layout, every rate with its 95 % Wilson
    interval over the victims and its difference from the undefended model's white-box
    rate told apart from noise) and the per-sticker rows. The header says how the
    difference was read: a paired bootstrap where ``summary`` has ``fooling_rate_mean_diff``
    (:func:`summarise` with ``fooled``), else the overlap of the two Wilson intervals."""
    paired = any("fooling_rate_mean_diff" in v for by in summary.values() for v in by.values())
    versus = ("`vs none`: the mean fooling rate minus the undefended model's white-box one, with its 95 % paired "
              "bootstrap interval over the victims (both rows see the same victims), 'higher' or 'lower' only "
              "where that interval excludes 0." if paired else
              "`vs none`: the mean fooling rate against the undefended model's white-box one, 'higher' or 'lower' "
              "only where the two Wilson intervals do not overlap (conservative).")
    lines = [f"# RP2 on {n} stop-sign victims (true class {r.true_class}, {classes[r.true_class]})", "",
             "Fooling rate: victims whose prediction the sticker changes (BlurNet's attack success rate); "
             "mean over targets and seeds, worst over targets. Black box: stickers made on the undefended model; "
             f"white box: made on each model itself. Brackets: 95 % Wilson interval over the {n} victims (the "
             f"stickers share them, so they are the independent draws; one victim is {100 / n:.1f} points). "
             + versus, ""]
    flat = []
    named = any(d != "none" and slides_row(d, setting) for d, by in summary.items() for setting in by)
    for d, by in summary.items():
        for setting, v in by.items():
            flat.append({"setting": setting, "defense": d, **({"slides' row": slides_row(d, setting)} if named else {}),
                         "clean_accuracy": v["clean_accuracy"],
                         "fooling_rate_mean [95% CI]": rate_ci(v, "fooling_rate_mean"),
                         "vs none": difference_text(v, "fooling_rate_mean"),
                         "fooling_rate_worst [95% CI]": rate_ci(v, "fooling_rate_worst"),
                         "worst_target": f"{v['worst_target']} ({classes[v['worst_target']]})",
                         "target_success_mean": v["target_success_mean"],
                         "target_success_transformed_mean": v["target_success_transformed_mean"],
                         "l2_dissimilarity_mean": v["l2_dissimilarity_mean"], "stickers": v["n_stickers"],
                         "seeds": v["n_seeds"]})
    df = pd.DataFrame(flat).sort_values(["setting", "defense"], key=setting_order)
    lines += [df.to_markdown(index=False, floatfmt=".4f"), "", "## Per sticker", "",
              table.drop(columns=["seconds"]).to_markdown(index=False, floatfmt=".4f"), ""]
    return "\n".join(lines)


def stickers_figure(models, victims, mask, done, cfgs, classes, r, path: Path) -> None:
    """Per (white-box model, target): the first seed's perturbation and four victims with it, titled by prediction.

    One seed a row keeps the figure readable with several seeds (every seed's rates are in ``rp2.md``).
    """
    first_seed = min(seed for _, _, seed in done)
    jobs = sorted(job for job in done if job[2] == first_seed)
    shown = victims[:4].float() / 255
    fig, axes = plt.subplots(len(jobs), 5, figsize=(10, 2.2 * len(jobs)), squeeze=False)
    for row, job in zip(axes, jobs, strict=True):
        source, target, seed = job
        delta = done[job]["delta"]
        row[0].imshow((delta.abs().amax(0) / delta.abs().max().clamp_min(1e-8)).numpy(), cmap="magma")
        row[0].set_title(f"{source}, target {target}\nseed {seed}: |delta|", fontsize=8)
        adv = apply_rp2(shown, delta, mask, cfgs[target].sticker_fill)
        with torch.no_grad():
            pred = models[source](adv).argmax(1)
        for ax, img, p in zip(row[1:], adv, pred, strict=True):
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(classes[int(p)][:22], fontsize=7, color="red" if int(p) != r.true_class else "black")
        for ax in row:
            ax.axis("off")
    fig.suptitle("RP2 stickers (white box) on stop-sign victims; red: prediction changed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
