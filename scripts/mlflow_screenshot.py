"""Screenshot the MLflow UI's compare view of a profile's runs with headless Chromium.

Needs Debian's Chromium (``apt-get install chromium``) and Playwright's Python package
(``pip install playwright``; its own browser download is not needed: the script drives
``/usr/bin/chromium``). Not part of CI. Run from the project root after a ``dvc repro``:

    python scripts/mlflow_screenshot.py [--store sqlite:///mlflow.db] [--stages 'train_*']
                                        [--out docs/figures/mlflow_compare.png]
    python scripts/mlflow_screenshot.py --cells advp [--dvc-experiments exp-a,exp-b]

The second form compares evaluation cells (evaluate's nested runs, one per defense) under
one attack across two (or more) DVC experiments, cell by cell.

It starts ``mlflow server`` on a free port of 127.0.0.1 over the store, opens the compare
view of the latest run of every stage instance matching ``--stages`` (shell pattern over
the ``stage`` tag; default: the baseline and every defended model) in the profile's
experiment (``mlflow.experiment`` in params.yaml), closes the assistant panel and the
navigation, folds the plots, the params and the artifacts, shows only the metrics and tags
that differ between the runs, saves the screenshot of that table and stops the server it
started (by its process group).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import shutil
import sys
import tempfile
import urllib.parse
from pathlib import Path

import mlflow

from pipeline.config import load_params
from pipeline.tracking import mlflow_server

FOLD = ("Visualizations", "Parameters", "Artifacts")  # compare-view sections folded away
DIFF_ONLY = ("Metrics", "Tags")  # sections reduced to what differs


def latest_runs(client: mlflow.MlflowClient, experiment_id: str, pattern: str) -> dict[str, str]:
    """``stage tag -> run id`` of the newest run of every stage instance matching ``pattern``."""
    latest: dict[str, str] = {}
    for r in client.search_runs([experiment_id], filter_string="tags.stage LIKE '%'",  # stage runs, not cells
                                order_by=["attributes.start_time DESC"], max_results=1000):
        stage = r.data.tags.get("stage", "?")
        if fnmatch.fnmatch(stage, pattern):
            latest.setdefault(stage, r.info.run_id)
    return latest


def cell_runs(client: mlflow.MlflowClient, experiment_id: str, attack: str,
              dvc_experiments: list[str] | None) -> dict[str, str]:
    """``"<DVC experiment>: <cell>" -> run id`` of the evaluation cells under ``attack`` (the
    nested runs of evaluate, one per defense) of the latest evaluate run of each DVC
    experiment in ``dvc_experiments`` (its ``dvc_experiment`` tag); without names, of the
    two latest evaluate runs."""
    parents = [r for r in client.search_runs([experiment_id], filter_string="tags.stage = 'evaluate'",
                                             order_by=["attributes.start_time DESC"], max_results=500)]
    chosen: dict[str, str] = {}  # dvc experiment (or run name) -> evaluate run id
    for r in parents:
        name = r.data.tags.get("dvc_experiment", "workspace")
        if dvc_experiments is not None and name not in dvc_experiments:
            continue
        key = name if dvc_experiments is not None else f"{name} {r.info.run_name} {r.info.run_id[:6]}"
        chosen.setdefault(key, r.info.run_id)
        if dvc_experiments is None and len(chosen) == 2:
            break
    out = {}
    for name, parent in chosen.items():
        for c in client.search_runs([experiment_id], max_results=1000, filter_string=(
                f"tags.mlflow.parentRunId = '{parent}' and params.attack = '{attack}'")):
            out[f"{name}: {c.info.run_name}"] = c.info.run_id
    return out


def screenshot(url: str, out: Path, chromium: str, width: int, wait_ms: int) -> None:
    """Open ``url`` in headless Chromium, tidy the compare view and save the PNG ``out``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 4000})
            page.goto(url)
            page.get_by_text("Run details").first.wait_for(timeout=wait_ms)
            page.wait_for_timeout(2000)  # the tables fill in after the heading
            for label in ("Close", "Toggle sidebar"):  # MLflow 3's assistant panel and navigation
                button = page.get_by_label(label)
                if button.count():
                    button.first.click()
            for section in FOLD:
                button = page.get_by_label(f"collapse {section}")
                if button.count():
                    button.first.click()
            for section in DIFF_ONLY:
                switch = page.get_by_label(f"{section} - Show diff only")
                if switch.count() and switch.first.get_attribute("aria-checked") != "true":
                    switch.first.click()
            page.wait_for_timeout(1000)
            # The metrics and tags tables are virtualised grids of fixed height: let them grow,
            # then cut the shot at the bottom of the last section.
            page.evaluate("""() => { for (const g of document.querySelectorAll('.ReactVirtualized__Grid')) {
                const inner = g.querySelector('.ReactVirtualized__Grid__innerScrollContainer');
                if (!inner) continue;
                g.style.height = inner.scrollHeight + 'px'; g.style.overflow = 'visible';
                for (let e = g.parentElement; e && !e.className.toString().includes('collapse-content');
                     e = e.parentElement) { e.style.height = 'auto'; } } }""")
            page.wait_for_timeout(500)
            bottom = page.evaluate("""() => Math.max(0, ...Array.from(
                document.querySelectorAll('table, [role=row], [role=table]')).map(e => e.getBoundingClientRect().bottom))""")
            height = int(bottom) + 24 if bottom > 0 else 4000
            page.set_viewport_size({"width": width, "height": max(height, 600)})
            page.wait_for_timeout(500)
            page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": width, "height": max(height, 600)})
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    parser.add_argument("--experiment", default=None, help="default: mlflow.experiment of params.yaml")
    parser.add_argument("--stages", default="train_*", help="shell pattern over the runs' stage tag")
    parser.add_argument("--cells", default=None, metavar="ATTACK",
                        help="compare evaluate's cells under this attack (e.g. advp) across DVC experiments "
                             "instead of stage runs")
    parser.add_argument("--dvc-experiments", default=None,
                        help="with --cells: comma-separated dvc exp names (default: the two latest evaluate runs)")
    parser.add_argument("--out", default="docs/figures/mlflow_compare.png", type=Path)
    parser.add_argument("--width", default=1800, type=int, help="window width in pixels")
    parser.add_argument("--wait", default=60, type=float, help="seconds to wait for the page")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("error: no chromium on PATH; install Debian's package: apt-get install chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        sys.exit("error: Playwright is not installed; pip install playwright (Debian's chromium is used)")
    experiment = args.experiment or load_params().mlflow.experiment
    client = mlflow.MlflowClient(tracking_uri=args.store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"error: no experiment {experiment!r} in {args.store}; run dvc repro first")
    if args.cells:
        names = args.dvc_experiments.split(",") if args.dvc_experiments else None
        latest = cell_runs(client, exp.experiment_id, args.cells, names)
        what = f"evaluation cells under {args.cells!r}"
    else:
        latest = latest_runs(client, exp.experiment_id, args.stages)
        what = f"run(s) with a stage tag matching {args.stages!r}"
    if len(latest) < 2:
        sys.exit(f"error: {len(latest)} {what} in {experiment!r}; the compare view needs two or more "
                 "(try --stages '*', or run two dvc experiments before --cells)")
    workdir = Path(tempfile.mkdtemp(prefix="mlflow-shot"))
    try:
        with mlflow_server(args.store, workdir) as base:
            runs = urllib.parse.quote(json.dumps(sorted(latest.values())))
            exps = urllib.parse.quote(json.dumps([exp.experiment_id]))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            screenshot(f"{base}/#/compare-runs?runs={runs}&experiments={exps}", args.out.resolve(), chromium,
                       args.width, int(args.wait * 1000))
        print(f"{args.out} ({len(latest)} runs: {', '.join(sorted(latest))})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
