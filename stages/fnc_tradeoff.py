"""DVC stage ``fnc_tradeoff``: FNC's clipping trade-off curve (:mod:`pipeline.analysis.fnc_tradeoff`).

For every ``fnc_tradeoff.alphas`` x ``fnc_tradeoff.adjustments`` cell, the baseline with
feature norm clipping (Yu et al., ICCV 2021, Eq. 4) inserted at that alpha and adjusted
(the other settings from the ``fnc`` section), and the baseline itself: predictions on a
seeded test subset (a prefix of evaluate's order, ``fnc_tradeoff.test_images``), clean and
under every transferred universal patch of ``generate_patches`` at evaluate's placements.
One Ray task per cell; each finished cell is cached under ``.cache/fnc_tradeoff/`` by a
hash of what it depends on (:func:`pipeline.analysis.fnc_tradeoff.cell_key`: the baseline
file, the patches, alpha, the adjustment and its settings, the images, the placements, the
code), so adding an alpha computes only its cells and a killed run resumes.

Writes ``metrics/fnc_tradeoff.json`` (the baseline, every cell with its rates and 95 %
Wilson intervals, the published point and the cell closest to it), ``metrics/fnc_tradeoff.md``,
``plots/fnc_tradeoff.csv`` (a row per cell) and ``plots/fnc_tradeoff.png`` (clean against
AdvP accuracy, a line per adjustment), and logs them to MLflow with a nested run per cell.
With ``fnc_tradeoff.alphas`` empty (the default) it writes only a note that it is off.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.analysis import fnc_tradeoff as ft
from pipeline.cli import run_stage
from pipeline.config import Params
from pipeline.io import atomic_write, save_json
from pipeline.tracking import flatten, log_artifact, log_child_runs, log_metrics, stage_run
from pipeline.tradeoff import tradeoff_curve

log = logging.getLogger("fnc_tradeoff")
JSON, MD = Path("metrics/fnc_tradeoff.json"), Path("metrics/fnc_tradeoff.md")
CSV, PNG = Path("plots/fnc_tradeoff.csv"), Path("plots/fnc_tradeoff.png")


def _write_csv(rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> None:
    data = pd.DataFrame(rows, columns=list(columns) if columns else None).to_csv(index=False).encode()
    atomic_write(CSV, lambda f: f.write(data))


def write_off(params: Params) -> None:
    """The outputs of a profile without alphas: a note (JSON and markdown), the CSV's header and a
    PNG saying so (DVC needs every output); no task, no MLflow run."""
    note = ft.off_note(params.profile)
    save_json({"enabled": False, "note": note}, JSON)
    atomic_write(MD, lambda f: f.write(f"# FNC trade-off\n\n{note}\n".encode()))
    _write_csv([], ft.CSV_HEAD)
    png = ft.off_figure(params.profile)
    atomic_write(PNG, lambda f: f.write(png))
    log.info("%s", note)


def main(params: Params) -> None:
    """Compute (or read from the cache) every cell of the trade-off and write its outputs."""
    cfg, fnc, ev, p = params.fnc_tradeoff, params.fnc, params.evaluate, params.patch
    if not cfg.alphas:
        write_off(params)
        return
    summary, fnc_cells, node_ids = tradeoff_curve(params)
    name = params.model.name
    save_json(summary, JSON)
    md = ft.markdown(summary)
    atomic_write(MD, lambda f: f.write(md.encode()))
    _write_csv(ft.table(summary))
    png = ft.figure(summary)
    atomic_write(PNG, lambda f: f.write(png))
    log.info("%s\n%s", ft.closest_sentence(summary),
             pd.DataFrame(ft.display_rows(summary)).to_string(index=False))

    section = {"model": params.model.model_dump(), "fnc_tradeoff": cfg.model_dump(mode="json"),
               "fnc": {k: v for k, v in fnc.model_dump().items() if k not in ("alpha", "adjustment")},
               "patch": {k: getattr(p, k) for k in ("attacks", "seeds", "location", "area_fraction", "target")},
               "evaluate": {k: getattr(ev, k) for k in ("subset_seed", "placement_seed", "placements", "test_images")},
               "seed": params.seed}
    tags = {"profile": params.profile, "paper": params.mlflow.paper, "model": name, "dataset": summary["dataset"],
            "node_ids": ",".join(node_ids)}
    if summary["closest"] is not None:
        tags["closest_to_reference"] = f"alpha {summary['closest']['alpha']:g}, {summary['closest']['adjustment']}"
    with stage_run("fnc_tradeoff", params.mlflow.experiment, section, tags):
        log_metrics({"baseline": _numbers(summary["baseline"]),
                     **{adj: {f"alpha_{k}": _numbers(c) for k, c in by_alpha.items()}
                        for adj, by_alpha in summary["cells"].items()}})
        log_child_runs([{"name": f"{c['adjustment']} / alpha {c['alpha']:g}",
                         "params": {"model": name, "fnc.alpha": c["alpha"], "fnc.adjustment": c["adjustment"],
                                    "n_images": c["n_images"]},
                         "tags": {"fnc.adjustment": c["adjustment"]},
                         "metrics": flatten(_numbers(c))} for c in fnc_cells])
        for f in (JSON, MD, CSV, PNG):
            log_artifact(f, artifact_path="fnc_tradeoff")


def _numbers(record: dict[str, Any]) -> dict[str, Any]:
    """A cell's rates and counts for MLflow (``advp.robust_accuracy``, ...), without alpha and adjustment."""
    return {k: v for k, v in record.items() if k not in ("alpha", "adjustment")}


if __name__ == "__main__":
    run_stage("fnc_tradeoff", main)
