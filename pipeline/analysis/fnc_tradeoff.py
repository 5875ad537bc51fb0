"""FNC's clipping trade-off: clean accuracy against accuracy under universal patches, per alpha.

Feature norm clipping (Yu et al., "Defending Against Universal Adversarial Patches by
Clipping Feature Norms", ICCV 2021, Section 4, Eq. 4) caps every feature vector's channel
norm at ``alpha`` times its sample's mean norm. It needs no retraining, so the whole
trade-off over ``alpha`` costs only inference and the (optional) adjustment: every cell
``(alpha, adjustment)`` of ``fnc_tradeoff.alphas`` x ``fnc_tradeoff.adjustments`` is the
baseline with FNC inserted at ``alpha`` (eps from ``fnc.eps``), adjusted as
:func:`pipeline.defenses.adjust.adjust_after_insertion` says (settings from the ``fnc``
section), and evaluated on the same seeded test images, clean and under every transferred
universal patch of ``generate_patches`` (AdvP, LaVAN; one per ``patch.seeds``) at the fixed
placements evaluate uses (:func:`subset_placements`). A cell at ``(fnc.alpha, fnc.adjustment)``
on evaluate's images is therefore evaluate's ``fnc`` cell: the same weights (the code path of
``train_defended``), images and placements (up to floating-point differences of batching).

Rates are fractions in [0, 1] with their 95 % Wilson interval over the images counted
(:func:`pipeline.metrics.wilson_interval`); a patch attack's rates are means over the patch
seeds, with their standard deviation over seeds (``_std``). The stage
(``stages/fnc_tradeoff.py``) runs one Ray task per cell and caches each under
``.cache/fnc_tradeoff/`` by :func:`cell_key`; this module holds the keys, the placements,
the metrics, the closest cell to a published point, and the table, figure and note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.attacks.patch import Placements, corner_placements
from pipeline.evaluation import cell_metrics, fixed_placements
from pipeline.io import figure_png
from pipeline.metrics import attack_success_rate, rate_interval, rate_text

REFERENCE_ATTACK = "advp"
"""The patch attack of the figure's y axis and of the distance to a published point (AdvP)."""

RATES = ("robust_accuracy", "attack_success_rate")
"""The rates of a patch attack reported with a Wilson interval (and a spread over seeds)."""

CODE = ("evaluation.py", "attacks/patch.py", "defenses/fnc.py", "defenses/adjust.py", "checkpoint.py", "train.py")
"""The files of the ``pipeline`` package a cell's predictions are computed by (:func:`code_hashes`)."""

CSV_HEAD = ("alpha", "adjustment", "n_images", "clean_accuracy", "clean_accuracy_ci_low", "clean_accuracy_ci_high")
"""The first columns of every row of :func:`table` (the whole header of the stage's CSV when it is off)."""


@dataclass(frozen=True)
class Cell:
    """One point of the curve: FNC at ``alpha`` adjusted by ``adjustment``; both None for
    the baseline itself (no FNC), the reference every cell is read against."""

    alpha: float | None
    adjustment: str | None

    @property
    def is_baseline(self) -> bool:
        """True for the undefended baseline."""
        return self.alpha is None


def alpha_key(alpha: float) -> str:
    """The JSON key of an alpha: ``str(float(alpha))`` (``1.0``, ``1.05``), one key per distinct value."""
    return str(float(alpha))


def cell_settings(fnc: Any, adjustment: str) -> dict[str, Any]:
    """The ``fnc`` settings a cell of ``adjustment`` depends on, besides alpha: ``eps`` always;
    ``adjust_batches`` and ``batch_size`` for ``bn_recalibration``; ``finetune_epochs``,
    ``finetune_lr`` and ``batch_size`` for ``finetune_classifier``. Changing another setting
    keeps the cell's cache entry.

    Args:
        fnc: the ``fnc`` params section (:class:`pipeline.config.FNCConfig`).
        adjustment: ``none``, ``bn_recalibration`` or ``finetune_classifier``.

    Raises:
        ValueError: an unknown adjustment.
    """
    keys = {"none": ("eps",), "bn_recalibration": ("eps", "adjust_batches", "batch_size"),
            "finetune_classifier": ("eps", "finetune_epochs", "finetune_lr", "batch_size")}
    if adjustment not in keys:
        raise ValueError(f"unknown adjustment {adjustment!r}; choose from {', '.join(keys)}")
    return {k: getattr(fnc, k) for k in keys[adjustment]}


def code_hashes() -> list[str]:
    """SHA-256 of each file of :data:`CODE` (found beside this package, whatever the working
    directory): part of every :func:`cell_key`, so a change to that code recomputes the cells."""
    from pipeline.io import sha256_file

    package = Path(__file__).resolve().parents[1]
    return [sha256_file(package / f) for f in CODE]


def cell_key(common: dict[str, Any], cell: Cell, fnc: Any, seed: int) -> dict[str, Any]:
    """What a cell's predictions depend on, for :func:`pipeline.cli.resume_dir`.

    Args:
        common: what every cell shares: the baseline model file's hash, the patch files'
            hashes, the test images (subset and data checksums), the placements and the
            :func:`code_hashes`.
        cell: the cell; the baseline's key is ``common`` alone.
        fnc: the ``fnc`` params section (only :func:`cell_settings` of it counts).
        seed: the top-level ``seed``, which draws the adjustment's training images (not
            counted for ``none``, which draws none).

    Returns:
        A JSON-serialisable dict.
    """
    if cell.is_baseline:
        return {**common, "cell": "baseline"}
    key = {**common, "alpha": float(cell.alpha), "adjustment": cell.adjustment,
           "fnc": cell_settings(fnc, cell.adjustment)}
    if cell.adjustment != "none":
        key["seed"] = seed
    return key


def subset_placements(n: int, n_reference: int, placements: int, image_size: tuple[int, int], side: int, seed: int,
                    location: str) -> Placements:
    """The patch placements of the first ``n`` images of evaluate's test order, as evaluate
    draws them for its ``n_reference`` images (:func:`pipeline.evaluation.fixed_placements`,
    entry ``p * n_reference + i`` for image i; the corner for ``location: fixed``), so both
    stages paste every patch at the same place in the same image.

    Args:
        n: images of this subset (a prefix of evaluate's order), >= 0.
        n_reference: images evaluate draws placements for, >= ``n`` (its subset's size, or
            ``n`` when this subset is the larger one: then drawn in the same way for ``n``).
        placements: ``evaluate.placements`` (P >= 1).
        image_size: (H, W) in pixels.
        side: patch side in pixels.
        seed: ``evaluate.placement_seed``.
        location: ``patch.location``, ``random`` or ``fixed``.

    Returns:
        ``P * n`` placements, entry ``p * n + i`` for image i (the layout of
        :func:`pipeline.evaluation.predict_shard`).

    Raises:
        ValueError: ``n_reference < n``.
    """
    if n_reference < n:
        raise ValueError(f"n_reference ({n_reference}) must be at least n ({n})")
    if location == "fixed":
        return corner_placements(n * placements, image_size, side)
    drawn = fixed_placements(n_reference, placements, image_size, side, seed)
    return drawn[torch.cat([torch.arange(n) + p * n_reference for p in range(placements)])]


def summarize(preds: dict[str, torch.Tensor], labels: torch.Tensor, target: int | None,
              attacks: list[str]) -> dict[str, Any]:
    """The metrics of one cell from its predictions.

    Args:
        preds: ``{"none": int64 (N,), <attack>: int64 (S, P, N)}``
            (:func:`pipeline.evaluation.predict_shard`).
        labels: int64 (N,).
        target: the patches' target class (targeted rates leave its images out), or None.
        attacks: the patch attacks to report, each a key of ``preds``.

    Returns:
        ``clean_accuracy`` with ``clean_accuracy_ci_low`` / ``_high`` and ``n_images`` (N), and
        per attack a dict: :func:`pipeline.evaluation.cell_metrics` (``robust_accuracy``,
        ``attack_success_rate``, ``fooling_rate``, means over the S seeds with ``_std``;
        ``n_images`` the images robust accuracy counts, ``n_seeds``, ``placements``) plus a
        95 % Wilson interval (``_ci_low`` / ``_ci_high``) of each of :data:`RATES` over the
        images it counts. Fractions in [0, 1].

    Raises:
        KeyError: an attack without predictions.
    """
    out: dict[str, Any] = dict(cell_metrics(preds["none"], None, labels, None))
    for attack in attacks:
        m = dict(cell_metrics(preds["none"], preds[attack], labels, target))
        counted = {"robust_accuracy": m["n_images"],
                   "attack_success_rate": attack_success_rate(preds["none"], preds["none"], labels, target).n_images}
        for rate in RATES:
            m[f"{rate}_ci_low"], m[f"{rate}_ci_high"] = rate_interval(m[rate], counted[rate])
        m.pop("clean_accuracy")  # the cell's own, above
        out[attack] = m
    return out


def cell_record(cell: Cell, result: dict[str, Any], labels: torch.Tensor, target: int | None,
                attacks: list[str]) -> dict[str, Any]:
    """A cell's entry of ``metrics/fnc_tradeoff.json``: ``alpha`` and ``adjustment`` (None for the
    baseline), :func:`summarize` of its predictions, and what its adjustment reported
    (``adjust_images``, ``finetune_loss``) and its compute ``seconds``.

    Args:
        cell: the cell.
        result: what its task returned (``preds`` and the adjustment's numbers).
        labels, target, attacks: as :func:`summarize`.
    """
    extra = {k: result[k] for k in ("adjust_images", "finetune_loss", "seconds") if k in result}
    return {"alpha": cell.alpha, "adjustment": cell.adjustment,
            **summarize(result["preds"], labels, target, attacks), **extra}


def curve_attack(attacks: list[str]) -> str:
    """The attack of the figure's y axis: :data:`REFERENCE_ATTACK` when evaluated, else the first.

    Raises:
        ValueError: no attack.
    """
    if not attacks:
        raise ValueError("the trade-off needs at least one patch attack (patch.attacks)")
    return REFERENCE_ATTACK if REFERENCE_ATTACK in attacks else attacks[0]


def closest(cells: list[dict[str, Any]], reference: dict[str, Any] | None) -> dict[str, Any] | None:
    """The cell nearest a published (clean accuracy, AdvP robust accuracy) point, by Euclidean
    distance in those two fractions; the first listed on a tie.

    Args:
        cells: :func:`cell_record` entries (FNC cells; the baseline is not a candidate).
        reference: ``{"clean_accuracy": float, "advp": float, ...}`` (e.g.
            :data:`pipeline.papers.FNC_CIFAR10`), or None.

    Returns:
        ``{"alpha", "adjustment", "distance", "clean_accuracy", "robust_accuracy"}`` (the
        distance in the same fractions), or None without a reference, an AdvP number in it,
        or a cell with AdvP.
    """
    if reference is None or reference.get("advp") is None or reference.get("clean_accuracy") is None:
        return None
    best = None
    for c in cells:
        if REFERENCE_ATTACK not in c or c["alpha"] is None:
            continue
        d = math.hypot(c["clean_accuracy"] - reference["clean_accuracy"],
                       c[REFERENCE_ATTACK]["robust_accuracy"] - reference["advp"])
        if best is None or d < best["distance"]:
            best = {"alpha": c["alpha"], "adjustment": c["adjustment"], "distance": d,
                    "clean_accuracy": c["clean_accuracy"], "robust_accuracy": c[REFERENCE_ATTACK]["robust_accuracy"]}
    return best


def closest_sentence(summary: dict[str, Any]) -> str:
    """One sentence naming the cell nearest the published point of ``summary`` (the stage's
    JSON), or saying why there is none."""
    ref, near = summary.get("reference"), summary.get("closest")
    if ref is None:
        return (f"No published FNC point for {summary.get('dataset')} to compare with (the third-party re-run is on "
                "CIFAR-10).")
    if near is None:
        return "No cell has AdvP numbers (patch.attacks), so none is compared with the third-party point."
    return (f"Closest to the third-party re-run ({100 * ref['clean_accuracy']:.2f} % clean, {100 * ref['advp']:.2f} % "
            f"under AdvP) is alpha {near['alpha']:g} with {near['adjustment']}: {100 * near['clean_accuracy']:.2f} % "
            f"clean, {100 * near['robust_accuracy']:.2f} % under AdvP, {100 * near['distance']:.2f} points away "
            f"(Euclidean, in clean and AdvP accuracy).")


def table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``plots/fnc_tradeoff.csv``, one per FNC cell in (adjustment, alpha) order:
    :data:`CSV_HEAD`, then per attack ``<attack>_<rate>`` with ``_std``, ``_ci_low``,
    ``_ci_high`` for each of :data:`RATES` and ``<attack>_n_images``, then ``n_seeds``,
    ``placements`` and ``series`` (the adjustment: one line per value in a chart)."""
    rows = []
    for adjustment, by_alpha in summary["cells"].items():
        for c in by_alpha.values():
            row = {k: c[k] for k in CSV_HEAD}
            for attack in summary["attacks"]:
                m = c[attack]
                for rate in RATES:
                    row.update({f"{attack}_{rate}{s}": m[f"{rate}{s}"] for s in ("", "_std", "_ci_low", "_ci_high")})
                row[f"{attack}_n_images"] = m["n_images"]
            row.update(n_seeds=summary["n_seeds"], placements=summary["placements"], series=adjustment)
            rows.append(row)
    return rows


def display_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """The table of the markdown note and of the report, formatted: per row (the baseline
    first, then every cell) the adjustment, alpha, clean accuracy and robust accuracy under
    each attack with their intervals (:func:`pipeline.metrics.rate_text`), and the images counted."""
    attacks = summary["attacks"]
    entries = [summary["baseline"], *(c for by_alpha in summary["cells"].values() for c in by_alpha.values())]
    rows = []
    for c in entries:
        row = {"adjustment": c["adjustment"] or "baseline (no FNC)",
               "alpha": "" if c["alpha"] is None else f"{c['alpha']:g}",
               f"clean (n={c['n_images']})": rate_text(c, "clean_accuracy")}
        for attack in attacks:
            row[f"{attack} robust (n={c[attack]['n_images']})"] = rate_text(c[attack], "robust_accuracy")
        rows.append(row)
    return rows


def markdown(summary: dict[str, Any]) -> str:
    """``metrics/fnc_tradeoff.md``: what was measured, the table (:func:`display_rows`) and the
    closest cell to the published point (:func:`closest_sentence`)."""
    import pandas as pd

    head = (f"# {summary['model']}: FNC trade-off over alpha ({summary['profile']} profile)\n\n"
            f"Feature norm clipping (Yu et al., ICCV 2021, Eq. 4) inserted into the baseline at every alpha, adjusted "
            f"as each row says, on {summary['n_images']} test images; accuracy clean and under the transferred "
            f"universal patches ({', '.join(summary['attacks'])}; {summary['n_seeds']} seed(s), "
            f"{summary['placements']} placement(s) an image, evaluate's placements; the target class's images left "
            f"out of the patched rates). Percent; [a, b]: 95 % Wilson interval over the images counted; ± x: "
            f"standard deviation over patch seeds.\n\n")
    body = pd.DataFrame(display_rows(summary)).to_markdown(index=False)
    return head + body + "\n\n" + closest_sentence(summary) + "\n"


def off_note(profile: str) -> str:
    """The sentence the stage writes when ``fnc_tradeoff.alphas`` is empty."""
    return (f"The FNC trade-off is off in the {profile!r} profile: fnc_tradeoff.alphas is empty. List alphas "
            "(and adjustments) in the fnc_tradeoff section to compute it.")


def figure(summary: dict[str, Any]) -> bytes:
    """``plots/fnc_tradeoff.png``: clean accuracy (x) against robust accuracy under AdvP (y;
    :func:`curve_attack`), one line per adjustment through its alphas (each point labelled
    with its alpha, 95 % Wilson intervals as error bars), the baseline as a black cross and,
    where ``summary`` has one, the published point as a red star. PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attack = curve_attack(summary["attacks"])
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    colours = plt.get_cmap("tab10").colors

    def errors(cs: list[dict], get) -> list[list[float]]:
        return [[get(c)[0] - get(c)[1] for c in cs], [get(c)[2] - get(c)[0] for c in cs]]

    clean = lambda c: (c["clean_accuracy"], c["clean_accuracy_ci_low"], c["clean_accuracy_ci_high"])  # noqa: E731
    robust = lambda c: (c[attack]["robust_accuracy"], c[attack]["robust_accuracy_ci_low"],  # noqa: E731
                        c[attack]["robust_accuracy_ci_high"])
    for k, (adjustment, by_alpha) in enumerate(summary["cells"].items()):
        cs = sorted(by_alpha.values(), key=lambda c: c["alpha"])
        xs, ys = [clean(c)[0] for c in cs], [robust(c)[0] for c in cs]
        ax.errorbar(xs, ys, xerr=errors(cs, clean), yerr=errors(cs, robust), color=colours[k % 10], marker="o",
                    markersize=4, linewidth=1.4, elinewidth=0.6, capsize=2, label=f"FNC, {adjustment}")
        for c, x, y in zip(cs, xs, ys, strict=True):
            ax.annotate(f"{c['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=colours[k % 10])
    base = summary["baseline"]
    ax.plot(clean(base)[0], robust(base)[0], marker="X", color="black", linestyle="none", markersize=8,
            label="baseline (no FNC)")
    ref = summary.get("reference")
    if ref is not None and attack == REFERENCE_ATTACK and ref.get("advp") is not None:
        ax.plot(ref["clean_accuracy"], ref["advp"], marker="*", color="red", linestyle="none", markersize=14,
                label="third-party re-run of FNC (ResNet-110)")
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel(f"accuracy under {attack} (transferred; mean of {summary['n_seeds']} patch seed(s))")
    ax.set_title(f"{summary['model']}: FNC trade-off over alpha (labels), {summary['n_images']} test images; "
                 "bars: 95 % Wilson intervals", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return figure_png(fig)


def off_figure(profile: str) -> bytes:
    """A small PNG saying the trade-off is off (``plots/fnc_tradeoff.png`` is a DVC output in every profile)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.0, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, f"FNC trade-off: off in the {profile!r} profile\n(fnc_tradeoff.alphas is empty)",
            ha="center", va="center", fontsize=9)
    return figure_png(fig, dpi=100)
