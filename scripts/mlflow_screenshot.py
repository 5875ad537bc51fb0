"""Screenshot the MLflow UI's compare view of a profile's runs with headless Chromium.

Needs Debian's Chromium (``apt-get install chromium``); not part of CI. Run from the
project root after a ``dvc repro``:

    python scripts/mlflow_screenshot.py [--store sqlite:///mlflow.db] [--out docs/figures/mlflow_compare.png]

It starts ``mlflow server`` on a free port of 127.0.0.1 over the store, opens the compare
view of the latest run of every stage instance in the profile's experiment
(``mlflow.experiment`` in params.yaml), saves the screenshot and stops the server it
started (by its process group).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow

from pipeline.config import load_params
from pipeline.tracking import mlflow_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    parser.add_argument("--out", default="docs/figures/mlflow_compare.png", type=Path)
    parser.add_argument("--size", default="1800,1100", help="window width,height in pixels")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("error: no chromium on PATH; install Debian's package: apt-get install chromium")
    experiment = load_params().mlflow.experiment
    client = mlflow.MlflowClient(tracking_uri=args.store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"error: no experiment {experiment!r} in {args.store}; run dvc repro first")
    latest: dict[str, str] = {}
    for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=500):
        latest.setdefault(r.data.tags.get("stage", "?"), r.info.run_id)
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-shot"))
    try:
        with mlflow_server(args.store, workdir) as base:
            runs = urllib.parse.quote(json.dumps(sorted(latest.values())))
            exps = urllib.parse.quote(json.dumps([exp.experiment_id]))
            url = f"{base}/#/compare-runs?runs={runs}&experiments={exps}"
            args.out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--window-size={args.size}", "--virtual-time-budget=20000",
                            f"--screenshot={args.out.resolve()}", url], check=True, timeout=180,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir)
        print(f"{args.out} ({len(latest)} runs: {', '.join(sorted(latest))})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

if __name__ == "__main__":
    main()
