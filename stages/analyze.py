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

import torch

from pipeline.analysis.base import get_analysis
from pipeline.analysis.outputs import default_inputs
from pipeline.cached import shared
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import run_stage
from pipeline.config import Params, ParamsError
from pipeline.data import load_meta
from pipeline.distributed import init_ray, ray_map
from pipeline.io import atomic_write, empty_dir
from pipeline.layout import analysis_dir, model_path, prepared_dir
from pipeline.tasks import analysis_task
from pipeline.tracking import log_artifacts, log_metrics, stage_run

log = logging.getLogger("analyze")


def main(params: Params, analysis: str) -> None:
    """Run analysis ``analysis`` on every model of ``analysis.defenses`` and write its tables and figures."""
    name = analysis
    try:
        spec = get_analysis(name)
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    a, model_name = params.analysis, params.model.name
    out_dir = empty_dir(analysis_dir(model_name, name))
    specs = {d: load_checkpoint(model_path(model_name, d)) for d in a.defenses} if a.defenses else {}
    note = spec.note(params, specs) if spec.note is not None else None
    if note:  # this profile or model cannot run it: say why, compute nothing
        atomic_write(out_dir / "README.md", lambda f: f.write(note.encode()))
        log.info("%s: %s", name, note.strip())
        return
    meta = load_meta(prepared_dir(params.data.dataset))
    inputs = spec.inputs(params, meta, specs) if spec.inputs is not None else default_inputs(params)
    cfg = a.model_dump(mode="json")
    cfg.update(eps=float(a.eps), step_size=float(a.step_size))
    init_ray()
    ref = shared(inputs)
    blocks = {"block_types": params.fnc.block_types} if params.fnc.block_types else {}  # FNC's blocks, for IFNR
    items = [{"name": name, "spec": specs[d], "inputs": ref, "cfg": {**cfg, **blocks, "defense": d},
              "num_threads": params.resources.num_cpus} for d in a.defenses]
    results = dict(zip(a.defenses, ray_map(analysis_task, items, num_cpus=params.resources.num_cpus,
                                            num_gpus=params.resources.num_gpus, desc=f"analysis {name} (per model)"),
                       strict=True))
    summary = spec.write(results, out_dir, params, specs, inputs)
    section = {"model": params.model.model_dump(), "analysis": cfg, "seed": params.seed}
    tags = {"profile": params.profile, "paper": params.mlflow.paper, "model": model_name,
            "defenses": ",".join(a.defenses), "analysis": name,
            "node_ids": ",".join(sorted({r["node_id"] for r in results.values()}))}
    tags.update(spec.tags(results) if spec.tags is not None else {})
    with stage_run(f"analyze@{name}", params.mlflow.experiment, section, tags):
        log_metrics(summary)
        log_artifacts(out_dir, artifact_path=f"analysis/{name}")
    log.info("%s: %s", name, summary)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analysis", required=True, help="a registered analysis (pipeline.analysis)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_stage(f"analyze@{args.analysis}", main, analysis=args.analysis)
