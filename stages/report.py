"""DVC stage ``report``: the reproduction report, our numbers beside the papers'.

Reads the metrics files and the analyses of this profile and writes
``reports/report.md`` (figures linked from ``plots/`` and ``analysis/``) and
``reports/report.html`` (self-contained: figures embedded), one section per source
paper: its table with the paper's number and source, ours, the difference, the
settings that differ and the MLflow run each of ours came from. A number a paper does
not publish is marked so, never filled in. Logged to MLflow as artifacts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.io import atomic_write
from pipeline.render.report import build_report, stage_runs
from pipeline.tracking import log_artifacts, stage_run

log = logging.getLogger("report")
OUT = Path("reports")


def main(params: Params) -> None:
    """Build the report from this profile's metrics and analyses, write it and log it to MLflow."""
    runs = stage_runs(params.mlflow.experiment)
    rep, title, verdicts = build_report(params, lambda stage: runs.get(stage, ""))
    OUT.mkdir(exist_ok=True)
    atomic_write(OUT / "report.md", lambda f: f.write(rep.markdown().encode()))
    atomic_write(OUT / "report.html", lambda f: f.write(rep.html(title).encode()))
    tags = {"profile": params.profile, "paper": params.mlflow.paper, "model": params.model.name}
    tags |= {f"masking.{d}": v for d, v in verdicts.items()}
    if verdicts:  # the models suspected of masking, in one tag the runs table can filter on
        tags["masking"] = ",".join(d for d, v in verdicts.items() if v != "not suspected") or "none suspected"
    with stage_run("report", params.mlflow.experiment, {"profile": params.profile}, tags):
        log_artifacts(OUT, artifact_path="report")
    log.info("wrote %s and %s", OUT / "report.md", OUT / "report.html")


if __name__ == "__main__":
    run_stage("report", main)
