"""DVC stage ``evaluate``: the (model, defense, attack) matrix on the test set.

Defenses from ``evaluate.defenses`` (``none``: the baseline; any other name: the
model ``train_defended@<name>`` made), attacks from ``evaluate.attacks``: ``none``
(clean), the universal patches of generate_patches (``advp``, ``lavan``: made on the
undefended model and transferred, as the FNC authors evaluate), their adaptive
counterparts (``advp_adaptive``, ``lavan_adaptive``: the same training against each
defended model itself, white box; Athalye et al. 2018), ``occlusion`` (uniform-noise
patches of the same size at the same placements), and the registered per-image
attacks (run white-box on each model, with their params from the ``attacks``
section; gradients through non-differentiable input transforms by BPDA).

The matrix is :func:`pipeline.matrix.evaluate_matrix` (one Ray task per defense and
test shard, or per defense, attack and shard; every cell cached under
``.cache/evaluate/``, so a rerun computes only new or changed cells and a killed
run only the tasks that had not finished); this driver writes
``metrics/evaluate.json`` (nested model -> defense -> attack -> metric,
fractions in [0, 1]), ``metrics/headline.json`` (per defense the few numbers
``dvc metrics show`` prints: :func:`headline`), ``metrics/evaluate.md`` (the
table), ``plots/evaluate.csv``, ``plots/evaluate_accuracy.csv`` (the bar chart
``dvc plots show`` draws) and ``plots/evaluate.png``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd

from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.io import atomic_write, save_json, save_png
from pipeline.layout import patch_path
from pipeline.matrix import HEADLINE_METRICS, cell_runs, evaluate_matrix, headline
from pipeline.render.evaluate import accuracy_bars, figure, markdown
from pipeline.tracking import log_artifact, log_artifacts, log_child_runs, log_metrics, stage_run

log = logging.getLogger("evaluate")
HEADLINE = Path("metrics/headline.json")
"""Per defense: clean, worst-case patch, PGD and AutoAttack accuracy (:func:`pipeline.matrix.headline`)."""
ACCURACY_CSV = Path("plots/evaluate_accuracy.csv")
"""Accuracy per (defense, attack) cell, labelled with its images, for ``dvc plots show``."""


def main(params: Params) -> None:
    """Evaluate every (defense, attack) cell of ``params.evaluate`` and write the matrix."""
    name, ev, seeds = params.model.name, params.evaluate, params.patch.seeds
    result = evaluate_matrix(params)
    table = result.table
    save_json({name: table}, "metrics/evaluate.json")
    save_json(headline(table, params), HEADLINE)

    df = pd.DataFrame([{"model": name, "defense": d, "attack": a, **m} for d, row in table.items() for a, m in row.items()])
    atomic_write("plots/evaluate.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    bars = accuracy_bars(df).to_csv(index=False).encode()
    atomic_write(ACCURACY_CSV, lambda f: f.write(bars))
    atomic_write("metrics/evaluate.md", lambda f: f.write(markdown(df, params).encode()))
    png = figure(df, name, params)
    atomic_write("plots/evaluate.png", lambda f: f.write(png))
    log.info("results (%d test images, %d placement(s), %d patch seed(s)):\n%s", result.n_images, ev.placements,
             len(seeds), df[["defense", "attack", "n_images", "clean_accuracy", "robust_accuracy",
                             "attack_success_rate"]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    section = {"model": params.model.model_dump(), "evaluate": ev.model_dump(), "patch": params.patch.model_dump(),
               "fnc": params.fnc.model_dump(), "seed": params.seed,
               "attacks": {a: params.attack_params(a) for a in result.per_image}}
    tags = {"profile": params.profile, "paper": params.mlflow.paper, "model": name, "defenses": ",".join(ev.defenses),
            "attacks": ",".join(ev.attacks), "node_ids": ",".join(result.node_ids)}
    with stage_run("evaluate", params.mlflow.experiment, section, tags):
        # the parent run holds the three rates per cell; every cell is a nested run too, with
        # its defense, attack and budget as params, for the runs table and the compare view
        log_metrics({d: {a: {k: m[k] for k in HEADLINE_METRICS if k in m} for a, m in row.items()}
                     for d, row in table.items()})
        log_child_runs(cell_runs(table, params, name))
        for f in ("plots/evaluate.csv", "plots/evaluate.png", "metrics/evaluate.md"):
            log_artifact(f, artifact_path="evaluate")
        for attack in result.transferred:
            for s in seeds:
                log_artifact(patch_path(name, attack, s, ".png"), artifact_path=f"patches/{attack}")
        with tempfile.TemporaryDirectory() as tmp:  # the adaptive patches, as PNGs per defense
            for d in (d for d in ev.defenses if d != "none"):
                for attack in result.adaptive:
                    for s, patch in zip(seeds, result.patches[d][attack], strict=True):
                        save_png(patch, Path(tmp) / d / attack / f"seed_{s}.png", upscale=8)
            if any(Path(tmp).iterdir()):
                log_artifacts(tmp, artifact_path="patches_adaptive")


if __name__ == "__main__":
    run_stage("evaluate", main)
