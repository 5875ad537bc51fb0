"""The built-in analyses of ``analyze@<name>``, registered (:mod:`pipeline.analysis.base`):
what each reads and writes: its inputs (shared by every
model's task) and its tables, figures and MLflow metrics from the models' results
(:func:`pipeline.analysis.compute.analyse_model` computes those, one Ray task per model).

Every writer is ``write_<name>(results, out_dir, params, specs, inputs) -> metrics``:
``results`` per defense as the task returned them, ``out_dir`` ``analysis/<model>/<name>``,
``specs`` the models' checkpoint dicts, ``inputs`` :func:`analysis_inputs`'s; it writes CSV
tables (``dvc plots show`` draws those named in dvc.yaml, one line per ``series`` value)
and PNG figures, and returns a flat dict of floats for MLflow.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.analysis.base import Analysis, register_analysis  # noqa: E402
from pipeline.analysis.compute import analyse_model  # noqa: E402
from pipeline.analysis.feature_norms import norm_map_figure  # noqa: E402
from pipeline.analysis.landscape import landscape_figure  # noqa: E402
from pipeline.analysis.pixel_robustness import PRM_IOU_CSV, random_set_iou  # noqa: E402
from pipeline.analysis.spectrum import spectrum_figure  # noqa: E402
from pipeline.attacks.patch import corner_placements, patch_side  # noqa: E402
from pipeline.attacks.rp2 import RP2Params, apply_rp2  # noqa: E402
from pipeline.checkpoint import build_from_spec, load_checkpoint  # noqa: E402
from pipeline.config import Params  # noqa: E402
from pipeline.data import load_tensors, load_training_subset  # noqa: E402
from pipeline.data.rp2 import load_mask, load_victims  # noqa: E402
from pipeline.defenses.base import parse_defense  # noqa: E402
from pipeline.evaluation import fixed_placements, test_order  # noqa: E402
from pipeline.io import atomic_write, load_torch, save_figure  # noqa: E402
from pipeline.layout import model_path, patch_path, prepared_dir, rp2_mask_path, sticker_dir  # noqa: E402
from pipeline.metrics import rate_interval  # noqa: E402
from pipeline.models import find_blocks  # noqa: E402

IFNR_RESNET50 = [1.05, 1.80, 2.98, 3.39]
"""The FNC paper's IFNR row for ResNet-50 on ImageNet (conv2_3, conv3_4, conv4_6, conv5_3; seed 000)."""


def default_inputs(params: Params, n: int | None = None) -> dict:
    """The inputs of an analysis that reads test images only: ``x`` uint8 (n, C, H, W) and ``y``
    int64 (n,), the first ``n`` (default ``analysis.images``) of the seeded test order
    ``evaluate.subset_seed`` (so every analysis and evaluate's subsets share their images)."""
    x, y = load_tensors(prepared_dir(params.data.dataset), "test")
    order = test_order(len(x), params.evaluate.subset_seed)[: params.analysis.images if n is None else n]
    return {"x": x[order].contiguous(), "y": y[order].contiguous()}


def analysis_inputs(params: Params, name: str, meta: dict) -> dict:
    """The tensors analysis ``name`` reads, shared by every model's task: a seeded test subset
    (``x`` uint8 (N, C, H, W), ``y`` int64 (N,); ``analysis.images``, or
    ``analysis.masking.images`` for ``masking``); for ``feature_norms`` also the first seed's
    patch (float (3, s, s) in [0, 1]) and evaluate's fixed placements; for
    ``pixel_robustness`` a seeded training subset (``x_fit``, ``y_fit``); for ``spectrum``
    only RP2's victims, natural and with the first sticker (no test image).

    Raises:
        FileNotFoundError: a patch or sticker file is missing, or the patch's side does not
            match ``patch.area_fraction`` (rerun dvc repro).
    """
    a, ev = params.analysis, params.evaluate
    _, h, w = meta["image_shape"]
    if name == "spectrum":  # RP2's victims only, no test images

        r = params.rp2
        victims, _ = load_victims(r.victims, size=h)
        mask = load_mask(rp2_mask_path(r.victims, r.mask), size=(h, w))
        sticker = sticker_dir(params.model.name) / "none" / f"target_{r.targets[0]}_seed_{r.seeds[0]}.pt"
        fill = RP2Params.model_validate(r.attack).sticker_fill
        return {"victims": victims, "adversarial": apply_rp2(victims.float() / 255, load_torch(sticker), mask, fill),
                "target": r.targets[0]}
    inputs = default_inputs(params, a.masking.images if name == "masking" else a.images)
    if name == "feature_norms":
        attack = "advp" if "advp" in params.patch.attacks else params.patch.attacks[0]
        path = patch_path(params.model.name, attack, params.patch.seeds[0])
        inputs["patch"] = load_torch(path)
        side = inputs["patch"].shape[-1]
        if side != patch_side(params.patch.area_fraction, h, w):
            raise FileNotFoundError(f"{path}: patch side {side} does not match patch.area_fraction; rerun dvc repro")
        n = len(inputs["x"])
        inputs["placements"] = (corner_placements(n, (h, w), side) if params.patch.location == "fixed"
                                else fixed_placements(n, 1, (h, w), side, ev.placement_seed))
    elif name == "pixel_robustness":
        inputs["x_fit"], inputs["y_fit"] = load_training_subset(prepared_dir(params.data.dataset), a.fit_images,
                                                                params.seed)
    return inputs


def write_feature_norms(results, out_dir: Path, params: Params, specs, inputs) -> dict:
    """``ifnr.csv``, ``ifnr.png`` (IFNR against relative depth, with the FNC paper's ResNet-50
    row) and ``norm_maps_<defense>.png``; returns ``<defense>.ifnr_last_block``."""
    frames = [r["table"].assign(defense=d) for d, r in results.items()]
    df = pd.concat(frames, ignore_index=True)[["defense", "block", "depth", "ifnr_mean", "ifnr_std", "n_images"]]
    df["series"] = df["defense"]  # the line of dvc plots show's chart (.dvc/plots/series_line.json)
    atomic_write(out_dir / "ifnr.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for d, g in df.groupby("defense", sort=False):
        rel = g["depth"] / g["depth"].max()
        ax.errorbar(rel, g["ifnr_mean"], yerr=g["ifnr_std"], marker="o", ms=3, capsize=2,
                    label=f"{params.model.name}, defense {d}")
    ax.plot([0.25, 0.5, 0.75, 1.0], IFNR_RESNET50, "k*--", ms=9, label="paper: ResNet-50 on ImageNet (Yu et al.)")
    ax.set_xlabel("relative depth (block / number of blocks)")
    ax.set_ylabel("IFNR = max ||f*|| / mean ||f~||")
    ax.set_title(f"incremental feature norm ratio under the patch ({results[next(iter(results))]['table']['n_images'][0]}"
                 " images)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_dir / "ifnr.png")
    for d, r in results.items():
        fig = norm_map_figure(build_from_spec(specs[d]), r["clean"], r["patched"],
                              title=f"channel L2 norm per position, defense {d}: clean (top), patched (bottom)")
        save_figure(fig, out_dir / f"norm_maps_{d}.png")
    return {f"{d}.ifnr_last_block": float(g["ifnr_mean"].iloc[-1]) for d, g in df.groupby("defense", sort=False)}


def write_pixel_robustness(results, out_dir: Path, params: Params, specs, inputs) -> dict:
    """``accuracy_vs_k.csv`` (Wilson intervals), ``pixel_robustness.png`` and, for PRM models,
    ``prm_iou.csv``; returns the accuracy per (defense, top/bottom, k) and PRM's IoU."""
    n_images = len(inputs["x"])
    rows = []
    for d, r in results.items():
        for row in r["curve"]:
            low, high = rate_interval(row["accuracy"], n_images)
            rows.append({"defense": d, **row, "n_images": n_images, "ci_low": low, "ci_high": high,
                         "series": f"{d}, {row['which']} k"})
    df = pd.DataFrame(rows)
    atomic_write(out_dir / "accuracy_vs_k.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    n = len(results)
    fig, axes = plt.subplots(1, n + 1, figsize=(3.0 * n + 4.4, 3.4), gridspec_kw={"width_ratios": [1] * n + [1.6]})
    for ax, (d, r) in zip(axes, results.items(), strict=False):
        im = ax.imshow(r["map"].numpy(), cmap="magma")
        ax.set_title(f"mean |grad| per pixel, {d}", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, shrink=0.75)
    ax = axes[-1]
    for (d, which), g in df.groupby(["defense", "which"], sort=False):
        ax.plot(g["k"], g["accuracy"], marker="o", ms=3, ls="-" if which == "top" else "--", label=f"{d}, {which} k")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of pixels attacked (k)")
    ax.set_ylabel("accuracy after masked PGD")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.suptitle(f"pixel robustness (Hwang et al. 2019): PGD eps {params.analysis.eps:.4f}, "
                 f"{params.analysis.steps} steps", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_dir / "pixel_robustness.png")
    metrics = {f"{d}.{w}_k{k:g}.accuracy": float(v) for (d, w, k), v in
               df.set_index(["defense", "which", "k"])["accuracy"].items()}
    # PRM's metric (Hwang et al. 2019): IoU of the top gradient pixels with the designated set
    iou = {d: r["prm_iou"] for d, r in results.items() if r.get("prm_iou") is not None}
    metrics.update({f"{d}.prm_iou": v for d, v in iou.items()})
    if iou:  # the report's PRM table reads it
        table = pd.DataFrame([{"defense": d, "prm_iou": v, "random_set_iou": random_set_iou(prm_fraction(params, d))}
                              for d, v in iou.items()])
        atomic_write(out_dir / PRM_IOU_CSV, lambda f: f.write(table.to_csv(index=False).encode()))
    return metrics


def prm_fraction(params: Params, defense: str) -> float:
    """The designated fraction of defended model ``defense``'s PRM layer (params)."""
    entry = next(e for e in params.defended_config(defense).defenses if e["name"] == "prm")
    return parse_defense(entry)[1].fraction


def write_loss_landscape(results, out_dir: Path, params: Params, specs, inputs) -> dict:
    """``loss_history.csv``, ``final_losses.csv`` and ``loss_landscape.png``; returns the final
    loss's mean and its spread over restarts per defense."""
    hist = pd.DataFrame([{"defense": d, "restart": i, "iteration": t, "loss": float(v), "series": d, "line": i}
                         for d, r in results.items() for i, row in enumerate(r["history"]) for t, v in enumerate(row)])
    atomic_write(out_dir / "loss_history.csv", lambda f: f.write(hist.to_csv(index=False).encode()))
    final = pd.DataFrame([{"defense": d, "restart": i, "image": j, "loss": float(v)}
                          for d, r in results.items() for i, row in enumerate(r["final"]) for j, v in enumerate(row)])
    atomic_write(out_dir / "final_losses.csv", lambda f: f.write(final.to_csv(index=False).encode()))
    fig = landscape_figure({d: r for d, r in results.items()},
                           title=f"PGD loss over {params.analysis.restarts} random restarts (Madry et al. 2018)")
    save_figure(fig, out_dir / "loss_landscape.png")
    return {f"{d}.final_loss_mean": float(r["final"].mean()) for d, r in results.items()} | {
        f"{d}.final_loss_std_over_restarts": float(r["final"].mean(1).std()) for d, r in results.items()}


def write_gradcam_distance(results, out_dir: Path, params: Params, specs, inputs) -> dict:
    """``confidence_vs_distance.{csv,png}``; returns the confidence with the block at the Grad-CAM centre."""
    df = pd.DataFrame([{"defense": d, "distance": float(dist), "confidence": float(c),
                        "clean_confidence": float(r["clean_confidence"]), "series": d}
                       for d, r in results.items() for dist, c in zip(r["distance"], r["confidence"], strict=True)])
    atomic_write(out_dir / "confidence_vs_distance.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for d, g in df.groupby("defense", sort=False):
        line, = ax.plot(g["distance"], g["confidence"], marker="o", ms=3, label=f"{d}: noise block")
        ax.axhline(g["clean_confidence"].iloc[0], color=line.get_color(), ls=":", lw=1, label=f"{d}: no block")
    ax.set_xlabel("distance of the block's centre from the Grad-CAM centre (pixels)")
    ax.set_ylabel("confidence in the predicted class")
    ax.set_title(f"{params.analysis.block}x{params.analysis.block} noise block, {params.analysis.angles} directions",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_dir / "confidence_vs_distance.png")
    return {f"{d}.confidence_at_centre": float(g["confidence"].iloc[0]) for d, g in df.groupby("defense", sort=False)}


def write_spectrum(results, out_dir: Path, params: Params, specs, inputs) -> dict:
    """``high_frequency.csv`` and ``spectrum_<defense>.png``; returns the high-frequency fractions."""
    df = pd.DataFrame([{"defense": d, **row} for d, r in results.items() for row in r["rows"]])
    atomic_write(out_dir / "high_frequency.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    for d in results:
        fig = spectrum_figure(build_from_spec(specs[d]), inputs["victims"].float() / 255, inputs["adversarial"],
                              title=f"log spectra, RP2's 40 stop signs: natural vs sticker (target "
                                    f"{inputs['target']}), defense {d}")
        save_figure(fig, out_dir / f"spectrum_{d}.png")
    return {f"{r.defense}.{r.where.replace(' ', '_')}.{r.images}.high_frequency_fraction": r.high_frequency_fraction
            for r in df.itertuples()}


def write_masking(results, out_dir: Path, params: Params, specs, inputs) -> dict:
    """``checks.csv`` (a row per defense and check), ``eps_sweep.{csv,png}``; returns the
    robust accuracies, a pass flag per check and the number of failed checks per defense."""
    m = params.analysis.masking
    checks = pd.DataFrame([{"defense": d, **row} for d, r in results.items() for row in r["checks"]])
    atomic_write(out_dir / "checks.csv", lambda f: f.write(checks.to_csv(index=False).encode()))
    sweep = pd.DataFrame([{"defense": d, **row, "eps_255": row["eps"] * 255, "series": d} for d, r in results.items()
                          for row in r["sweep"]])
    atomic_write(out_dir / "eps_sweep.csv", lambda f: f.write(sweep.to_csv(index=False).encode()))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for d, g in sweep.groupby("defense", sort=False):
        err = [g["robust_accuracy"] - g["ci_low"], g["ci_high"] - g["robust_accuracy"]]
        ax.errorbar(g["eps_255"], g["robust_accuracy"], yerr=err, marker="o", ms=3, capsize=2,
                    label=f"{d}: {results[d]['verdict']}")
    ax.axhline(m.max_robust, color="k", ls=":", lw=1, label=f"check (b): at most {m.max_robust:g} at the largest eps")
    ax.set_xscale("symlog", linthresh=1)
    ticks = sorted(set(sweep["eps_255"].round(3)))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlim(-0.1, ticks[-1] * 1.15)
    ax.set_xlabel("eps (x 1/255, L-inf)")
    ax.set_ylabel(f"robust accuracy under PGD-{m.pgd_steps}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"gradient-masking checks: accuracy against eps ({int(sweep['n_images'].iloc[0])} images, "
                 f"Wilson {1 - m.alpha:.0%} intervals)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_dir / "eps_sweep.png")
    metrics = {}
    for d, r in results.items():
        metrics.update({f"{d}.robust_accuracy.{k}": v for k, v in r["accuracy"].items()})
        metrics.update({f"{d}.check_{c['check']}_passed": float(c["passed"] == "True") for c in r["checks"]
                        if c["passed"] != "NA"})
        metrics[f"{d}.checks_failed"] = float(sum(c["passed"] == "False" for c in r["checks"]))
    return metrics


WRITERS = {"feature_norms": write_feature_norms, "pixel_robustness": write_pixel_robustness,
           "loss_landscape": write_loss_landscape, "gradcam_distance": write_gradcam_distance,
           "spectrum": write_spectrum, "masking": write_masking}
"""The writer of each built-in analysis."""


def _masking_inputs(params: Params, meta: dict, specs: dict) -> dict:
    """The test subset, and the undefended baseline's checkpoint dict: check (a) transfers PGD examples from it."""
    inputs = analysis_inputs(params, "masking", meta)
    inputs["baseline"] = specs.get("none") or load_checkpoint(model_path(params.model.name))
    return inputs


def _spectrum_note(params: Params, specs: dict) -> str | None:
    if params.rp2.enabled:
        return None
    return ("The spectrum analysis compares RP2's natural and sticker-perturbed stop signs: rp2.enabled is false "
            f"in the {params.profile!r} profile (run params/gtsrb.yaml or params/blurnet.yaml).\n")


def _feature_norms_note(params: Params, specs: dict) -> str | None:
    if find_blocks(build_from_spec(next(iter(specs.values()))), params.fnc.block_types):
        return None
    return ("IFNR (Yu et al. 2021, Sec. 3) compares feature norms at the outputs of cascaded blocks (residual, "
            f"inverted-residual, inception); {params.model.name} has none, so this analysis has nothing to measure.\n")


def _builtin(name: str, source: str, **extra) -> None:
    """Register built-in analysis ``name``: :func:`pipeline.analysis.compute.analyse_model`'s
    branch, its writer here, and :func:`analysis_inputs` unless ``extra`` says otherwise."""
    inputs = extra.pop("inputs", lambda params, meta, specs: analysis_inputs(params, name, meta))
    register_analysis(Analysis(name, compute=partial(analyse_model, name), write=WRITERS[name], inputs=inputs,
                               source=source, **extra))


_builtin("feature_norms", "Yu et al., ICCV 2021, Section 3 (IFNR)", note=_feature_norms_note)
_builtin("pixel_robustness", "Hwang et al. 2019, Section 2 (pixel robustness, masked PGD)")
_builtin("loss_landscape", "Madry et al., ICLR 2018, Section 3 and Figure 1")
_builtin("gradcam_distance", "Yu 2022 (seed 002): confidence against the noise block's distance")
_builtin("spectrum", "Raju and Lipasti 2019 (BlurNet): high-frequency energy", note=_spectrum_note)
_builtin("masking", "Carlini et al. 2019, Section 5; Athalye et al., ICML 2018, Section 3", inputs=_masking_inputs,
         tags=lambda results: {f"masking.{d}": r["verdict"] for d, r in results.items()})
