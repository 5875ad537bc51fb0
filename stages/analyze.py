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

import ray
import torch

from pipeline.analysis.outputs import WRITERS, analysis_inputs
from pipeline.checkpoint import build_from_spec, load_checkpoint
from pipeline.cli import run_stage
from pipeline.config import ANALYSES, Params, ParamsError
from pipeline.data import load_meta
from pipeline.distributed import init_ray, ray_map
from pipeline.io import atomic_write
from pipeline.layout import analysis_dir, model_path, prepared_dir
from pipeline.models import fnc_block_types
from pipeline.tasks import analysis_task
from pipeline.tracking import log_artifacts, log_metrics, stage_run

log = logging.getLogger("analyze")


def main(params: Params, analysis: str) -> None:
    """Run analysis ``analysis`` on every model of ``analysis.defenses`` and write its tables and figures."""
    name = analysis
    if name not in ANALYSES:
        raise ParamsError(f"unknown analysis {name!r}; choose from {', '.join(ANALYSES)}")
    a, model_name = params.analysis, params.model.name
    out_dir = analysis_dir(model_name, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():  # a rerun leaves no file of the previous one behind
        old.unlink()
    if name == "spectrum" and not params.rp2.enabled:
        note = "The spectrum analysis compares RP2's natural and sticker-perturbed stop signs: rp2.enabled is false " \
               f"in the {params.profile!r} profile (run params/gtsrb.yaml or params/blurnet.yaml).\n"
        atomic_write(out_dir / "README.md", lambda f: f.write(note.encode()))
        return
    specs = {d: load_checkpoint(model_path(model_name, d)) for d in a.defenses}
    if name == "feature_norms" and not any(isinstance(m, fnc_block_types())
                                           for m in build_from_spec(next(iter(specs.values()))).modules()):
        note = f"IFNR (Yu et al. 2021, Sec. 3) compares feature norms at the outputs of cascaded blocks (residual, " \
               f"inverted-residual, inception); {model_name} has none, so this analysis has nothing to measure.\n"
        atomic_write(out_dir / "README.md", lambda f: f.write(note.encode()))
        return
    meta = load_meta(prepared_dir(params.data.dataset))
    inputs = analysis_inputs(params, name, meta)
    if name == "masking":  # check (a) transfers PGD examples from the undefended baseline
        inputs["baseline"] = specs.get("none") or load_checkpoint(model_path(model_name))
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analysis", required=True, help=", ".join(ANALYSES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_stage(f"analyze@{args.analysis}", main, analysis=args.analysis)
