"""DVC stage ``analyze@<name>``: one of the source papers' analyses on every model of ``analysis.defenses``.

``feature_norms`` (seed 000): IFNR per block, clean versus AdvP-patched test images
(the first patch seed, at evaluate's fixed placements), and channel-norm maps of one
image. ``pixel_robustness`` (seed 004): the mean absolute input-gradient map and the
accuracy after masked PGD on its top / bottom ``k`` of pixels. ``loss_landscape`` (seed
003): PGD loss over many random restarts. ``gradcam_distance`` (seed 002): confidence
with a noise block at a distance from the Grad-CAM centre. ``spectrum`` (seed 001):
spectra of RP2's natural and sticker-perturbed stop signs (only where ``rp2.enabled``;
otherwise a note). ``masking`` (Carlini et al. 2019, Section 5): the gradient-masking checks
(:mod:`pipeline.analysis.masking`), a pass / fail per check and model, the eps sweep with
Wilson intervals, and an MLflow tag ``masking.<defense>`` ("suspected: b, d" or "not
suspected"); check (a) transfers from the baseline, whose checkpoint the stage always loads.

One Ray task per model. Writes ``analysis/<model>/<name>/`` (CSV tables and PNG
figures; ``dvc plots show`` draws the CSVs named in dvc.yaml's ``plots:``, one line per
value of their ``series`` column) and logs them to MLflow.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from pipeline.attacks.patch import corner_placements, patch_side  # noqa: E402
from pipeline.checkpoint import build_from_spec, load_checkpoint  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.config import ANALYSES, Params, ParamsError  # noqa: E402
from pipeline.data import load_meta, load_tensors  # noqa: E402
from pipeline.distributed import init_ray, ray_map  # noqa: E402
from pipeline.evaluation import fixed_placements, test_order  # noqa: E402
from pipeline.io import atomic_write, load_torch, save_figure  # noqa: E402
from pipeline.metrics import rate_interval  # noqa: E402
from pipeline.models import fnc_block_types  # noqa: E402
from pipeline.tasks import analysis_task  # noqa: E402
from pipeline.tracking import log_artifacts, log_metrics, stage_run  # noqa: E402

log = logging.getLogger("analyze")
PREPARED = Path("data/prepared")
IFNR_RESNET50 = [1.05, 1.80, 2.98, 3.39]
"""The FNC paper's IFNR row for ResNet-50 on ImageNet (conv2_3, conv3_4, conv4_6, conv5_3; seed 000)."""


def main(params: Params, analysis: str) -> None:
    """Run analysis ``analysis`` on every model of ``analysis.defenses`` and write its tables and figures."""
    name = analysis
    if name not in ANALYSES:
        raise ParamsError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
    a, model_name = params.analysis, params.model.name
    out_dir = Path("analysis") / model_name / name
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():  # a rerun leaves no file of the previous one behind
        old.unlink()
    if name == "spectrum" and not params.rp2.enabled:
        note = "The spectrum analysis compares RP2's natural and sticker-perturbed stop signs: rp2.enabled is false " \
               f"in the {params.profile!r} profile (run params/gtsrb.yaml or params/blurnet.yaml).\n"
        atomic_write(out_dir / "README.md", lambda f: f.write(note.encode()))
        return
    specs = {d: load_checkpoint(Path("models") / model_name / ("baseline.pt" if d == "none" else f"{d}.pt"))
             for d in a.defenses}
    if name == "feature_norms" and not any(isinstance(m, fnc_block_types())
                                           for m in build_from_spec(next(iter(specs.values()))).modules()):
        note = f"IFNR (Yu et al. 2021, Sec. 3) compares feature norms at the outputs of cascaded blocks (residual, " \
               f"inverted-residual, inception); {model_name} has none, so this analysis has nothing to measure.\n"
        atomic_write(out_dir / "README.md", lambda f: f.write(note.encode()))
        return
    meta = load_meta(PREPARED / params.data.dataset)
    inputs = _inputs(params, name, meta)
    if name == "masking":  # check (a) transfers PGD examples from the undefended baseline
        inputs["baseline"] = specs.get("none") or load_checkpoint(Path("models") / model_name / "baseline.pt")
    cfg = a.model_dump(mode="json")
    cfg.update(eps=float(a.eps), step_size=float(a.step_size))
    init_ray()
    ref = ray.put(inputs)
    items = [{"name": name, "spec": specs[d], "inputs": ref, "cfg": {**cfg, "defense": d},
              "num_threads": params.resources.num_cpus} for d in a.defenses]
    results = dict(zip(a.defenses, ray_map(analysis_task, items, num_cpus=params.resources.num_cpus,
                                            num_gpus=params.resources.num_gpus, desc=f"analysis {name} (per model)"),
                       strict=True))
    summary = WRITERS[name](results, out_dir, params, specs, inputs)
    section = {"model": params.model.model_dump(), "analysis": cfg, "seed": params.seed}
    tags = {"profile": params.profile, "paper": params.mlflow.paper, "model": model_name,
            "defenses": ",".join(a.defenses), "analysis": name,
            "node_ids": ",".join(sorted({r["node_id"] for r in results.values()}))}
    if name == "masking":
        tags.update({f"masking.{d}": r["verdict"] for d, r in results.items()})
    with stage_run(f"analyze@{name}", params.mlflow.experiment, section, tags):
        log_metrics(summary)
        log_artifacts(out_dir, artifact_path=f"analysis/{name}")
    log.info("%s: %s", name, summary)


def _inputs(params: Params, name: str, meta: dict) -> dict:
    """The tensors analysis ``name`` reads (test subset, patch, training subset, victims)."""
    a, ev = params.analysis, params.evaluate
    _, h, w = meta["image_shape"]
    if name == "spectrum":  # RP2's victims only, no test images
        from pipeline.attacks.rp2 import RP2Params, apply_rp2
        from pipeline.data.rp2 import load_mask, load_victims
        from pipeline.layout import rp2_mask_path as mask_path

        r = params.rp2
        victims, _ = load_victims(r.victims, size=h)
        mask = load_mask(mask_path(r.victims, r.mask), size=(h, w))
        sticker = Path("rp2") / params.model.name / "none" / f"target_{r.targets[0]}_seed_{r.seeds[0]}.pt"
        fill = RP2Params.model_validate(r.attack).sticker_fill
        return {"victims": victims, "adversarial": apply_rp2(victims.float() / 255, load_torch(sticker), mask, fill),
                "target": r.targets[0]}
    x, y = load_tensors(PREPARED / params.data.dataset, "test")
    order = test_order(len(x), ev.subset_seed)[: a.masking.images if name == "masking" else a.images]
    inputs = {"x": x[order].contiguous(), "y": y[order].contiguous()}
    if name == "feature_norms":
        attack = "advp" if "advp" in params.patch.attacks else params.patch.attacks[0]
        path = Path("patches") / params.model.name / attack / f"seed_{params.patch.seeds[0]}.pt"
        inputs["patch"] = load_torch(path)
        side = inputs["patch"].shape[-1]
        if side != patch_side(params.patch.area_fraction, h, w):
            raise FileNotFoundError(f"{path}: patch side {side} does not match patch.area_fraction; rerun dvc repro")
        n = len(inputs["x"])
        inputs["placements"] = (corner_placements(n, (h, w), side) if params.patch.location == "fixed"
                                else fixed_placements(n, 1, (h, w), side, ev.placement_seed))
    elif name == "pixel_robustness":
        from pipeline.data import load_training_subset

        inputs["x_fit"], inputs["y_fit"] = load_training_subset(PREPARED / params.data.dataset, a.fit_images, params.seed)
    return inputs


def _feature_norms(results, out_dir: Path, params: Params, specs, inputs) -> dict:
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
    from pipeline.analysis.feature_norms import norm_map_figure

    for d, r in results.items():
        fig = norm_map_figure(build_from_spec(specs[d]), r["clean"], r["patched"],
                              title=f"channel L2 norm per position, defense {d}: clean (top), patched (bottom)")
        save_figure(fig, out_dir / f"norm_maps_{d}.png")
    return {f"{d}.ifnr_last_block": float(g["ifnr_mean"].iloc[-1]) for d, g in df.groupby("defense", sort=False)}


def _pixel_robustness(results, out_dir: Path, params: Params, specs, inputs) -> dict:
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
        from pipeline.analysis.pixel_robustness import PRM_IOU_CSV, random_set_iou

        table = pd.DataFrame([{"defense": d, "prm_iou": v, "random_set_iou": random_set_iou(_prm_fraction(params, d))}
                              for d, v in iou.items()])
        atomic_write(out_dir / PRM_IOU_CSV, lambda f: f.write(table.to_csv(index=False).encode()))
    return metrics


def _prm_fraction(params: Params, defense: str) -> float:
    """The designated fraction of defended model ``defense``'s PRM layer (params)."""
    from pipeline.defenses.base import parse_defense

    entry = next(e for e in params.defended_config(defense).defenses if e["name"] == "prm")
    return parse_defense(entry)[1].fraction


def _loss_landscape(results, out_dir: Path, params: Params, specs, inputs) -> dict:
    from pipeline.analysis.landscape import landscape_figure

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


def _gradcam_distance(results, out_dir: Path, params: Params, specs, inputs) -> dict:
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


def _spectrum(results, out_dir: Path, params: Params, specs, inputs) -> dict:
    from pipeline.analysis.spectrum import spectrum_figure

    df = pd.DataFrame([{"defense": d, **row} for d, r in results.items() for row in r["rows"]])
    atomic_write(out_dir / "high_frequency.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    for d in results:
        fig = spectrum_figure(build_from_spec(specs[d]), inputs["victims"].float() / 255, inputs["adversarial"],
                              title=f"log spectra, RP2's 40 stop signs: natural vs sticker (target "
                                    f"{inputs['target']}), defense {d}")
        save_figure(fig, out_dir / f"spectrum_{d}.png")
    return {f"{r.defense}.{r.where.replace(' ', '_')}.{r.images}.high_frequency_fraction": r.high_frequency_fraction
            for r in df.itertuples()}


def _masking(results, out_dir: Path, params: Params, specs, inputs) -> dict:
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


WRITERS = {"feature_norms": _feature_norms, "pixel_robustness": _pixel_robustness, "loss_landscape": _loss_landscape,
           "gradcam_distance": _gradcam_distance, "spectrum": _spectrum, "masking": _masking}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analysis", required=True, help=", ".join(ANALYSES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_stage(f"analyze@{args.analysis}", main, analysis=args.analysis)
