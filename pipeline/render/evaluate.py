"""The evaluation matrix as ``metrics/evaluate.md``, ``plots/evaluate.png`` and
``plots/evaluate_accuracy.csv`` (the stage ``evaluate``; the numbers are :mod:`pipeline.matrix`'s)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.config import Params  # noqa: E402
from pipeline.io import figure_png  # noqa: E402


def markdown(df: pd.DataFrame, params: Params) -> str:
    """The matrix as a markdown table (pandas + tabulate), one row per cell."""
    cols = [c for c in ("defense", "attack", "n_images", "clean_accuracy", "robust_accuracy", "robust_accuracy_std",
                        "attack_success_rate", "attack_success_rate_std", "fooling_rate", "l0", "l2", "linf", "ssim",
                        "worst_attack", "selected_start", "val_robust_accuracy")
            if c in df]
    head = (f"# {params.model.name}: evaluation matrix ({params.profile} profile)\n\n"
            "Fractions in [0, 1]; `_std` is the standard deviation over patch seeds; `l0` is the fraction of input "
            "values changed, `l2`/`linf` in pixel units of [0, 1]. Patch attacks are made on the undefended model "
            "and transferred; `*_adaptive` patches are made on each defended model itself (white box), `*_bpda` ones "
            "also pass FNC's clipping as the identity in the backward pass (BPDA); each adaptive search starts from "
            "the transferred patch and from `patch.adaptive_restarts` random patches and keeps the start that attacks "
            "the validation split best (`selected_start`, `val_robust_accuracy`); `*_worst` is the worst case over "
            "the transferred and adaptive cells per seed (`worst_attack`: the cell that achieved it). Per-image "
            "attacks are white-box on each model; `per_image_worst` counts an image as robust only if no attack of "
            "PGD's threat model fools it (`worst_attack`: the strongest of them alone).\n\n")
    return head + df[cols].to_markdown(index=False, floatfmt=".4f", missingval="") + "\n"


def figure(df: pd.DataFrame, model: str, params: Params) -> bytes:
    """Grouped bars: accuracy per defense, clean and under each attack, with seed spread; one
    colour per attack (never reused) and each attack labelled with the images it was measured
    on, since the per-image attacks run on subsets of the clean cell's images."""
    defenses = list(dict.fromkeys(df["defense"]))
    attacks = list(dict.fromkeys(df["attack"]))
    labels = attack_labels(df)
    colours = distinct_colours(len(attacks))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.5 + 0.45 * len(attacks) * len(defenses)), 3.8))
    width = 0.8 / len(attacks)
    for j, attack in enumerate(attacks):
        sub = df[df["attack"] == attack].set_index("defense").reindex(defenses)
        col = "clean_accuracy" if attack == "none" else "robust_accuracy"
        err = None if attack == "none" else sub.get("robust_accuracy_std")
        xs = [i + (j - (len(attacks) - 1) / 2) * width for i in range(len(defenses))]
        bars = ax.bar(xs, sub[col], width, yerr=err, capsize=3, color=colours[j], label=labels[attack])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(len(defenses)), [f"defense: {d}" for d in defenses])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    target = params.patch.target
    ax.set_title(f"{model}: accuracy clean and under attack ({params.patch.area_fraction:.0%} patches"
                 + (f", target {target})" if target is not None else ")") + "; n: test images per cell", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return figure_png(fig)


def distinct_colours(n: int) -> list:
    """``n`` colours, no two the same: matplotlib's qualitative tab20 (then tab20b and tab20c,
    60 in all; beyond that, evenly spaced hues of a continuous map)."""
    pool = [c for m in ("tab20", "tab20b", "tab20c") for c in plt.get_cmap(m).colors]
    if n <= len(pool):
        return pool[:n]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def attack_labels(df: pd.DataFrame) -> dict[str, str]:
    """Each attack's label with the number of test images its cells were measured on, e.g.
    ``one_pixel (n=30)``, ``clean (n=1000)`` (``n=30/40`` where defenses differ)."""
    out = {}
    for attack, g in df.groupby("attack", sort=False):
        ns = "/".join(str(int(n)) for n in dict.fromkeys(g["n_images"].dropna()))
        out[attack] = f"{'clean' if attack == 'none' else attack} (n={ns})" if ns else attack
    return out


def accuracy_bars(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``plots/evaluate_accuracy.csv``, the chart ``dvc plots show`` draws of the
    matrix: one row per (defense, attack) cell with its accuracy (clean for ``none``, robust
    otherwise), ``label`` the attack with its images (:func:`attack_labels`) and ``series``
    the defense (the bars' colour in ``.dvc/plots/series_bar.json``)."""
    labels = attack_labels(df)
    robust = df["robust_accuracy"] if "robust_accuracy" in df else pd.Series(float("nan"), index=df.index)
    return pd.DataFrame({"defense": df["defense"], "attack": df["attack"], "n_images": df["n_images"],
                         "accuracy": robust.where(df["attack"] != "none", df["clean_accuracy"]),
                         "label": df["attack"].map(labels), "series": df["defense"]})
