"""The reproduction report: our numbers beside the papers', as markdown and self-contained HTML.

Reads the metrics files and the analyses of a profile (``metrics/``, ``analysis/``) and
builds one section per source paper: its table with the paper's number and source, ours,
the difference, the settings that differ and the MLflow run each of ours came from. A
number a paper does not publish is marked so, never filled in. The stage ``report`` writes
it (``reports/report.md``, ``reports/report.html``).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from pipeline import papers
from pipeline.analysis.pixel_robustness import PRM_IOU_CSV
from pipeline.attacks.patch import patch_side
from pipeline.config import PATCH_ATTACKS, Params
from pipeline.data.datasets import dataset_name
from pipeline.layout import prepared_dir
from pipeline.metrics import difference_text, rate_text
from pipeline.tracking import git_commit, tracking_uri

log = logging.getLogger("report")
NOT_PUBLISHED = "not published"


def _load(path: str | Path) -> Any:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(v: float | None) -> str:
    return NOT_PUBLISHED if v is None else ("n/a" if isinstance(v, float) and math.isnan(v) else f"{100 * v:.2f} %")


def _diff(ours: float | None, paper: float | None) -> str:
    if ours is None or paper is None or (isinstance(ours, float) and math.isnan(ours)):
        return ""
    return f"{100 * (ours - paper):+.2f} pt"


def stage_runs(experiment: str) -> dict[str, str]:
    """The latest MLflow run id of every stage instance in ``experiment`` (empty when unreachable)."""
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri())
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return {}
        out: dict[str, str] = {}
        for r in client.search_runs([exp.experiment_id], filter_string="tags.stage LIKE '%'",  # stage runs, not cells
                                    order_by=["attributes.start_time DESC"], max_results=500):
            out.setdefault(r.data.tags.get("stage", "?"), r.info.run_id)
        return out
    except Exception as exc:  # the report is still useful without run ids
        log.warning("MLflow runs not readable (%s); the report leaves run ids out", exc)
        return {}


class Report:
    """An ordered list of blocks rendered to markdown and to self-contained HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def figure(self, path: Path, caption: str) -> None:
        if Path(path).is_file():
            self.blocks.append(("img", (Path(path), caption)))

    def markdown(self) -> str:
        out = []
        for kind, v in self.blocks:
            if kind.startswith("h"):
                out.append("#" * int(kind[1]) + " " + v)
            elif kind == "p":
                out.append(v)
            elif kind == "table":
                out.append(v.to_markdown(index=False, disable_numparse=True))  # cells are formatted already
            else:
                out.append(f"![{v[1]}](../{v[0].as_posix()})\n\n*{v[1]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for kind, v in self.blocks:
            if kind.startswith("h"):
                body.append(f"<{kind}>{html.escape(v)}</{kind}>")
            elif kind == "p":
                body.append(f"<p>{html.escape(v)}</p>")
            elif kind == "table":
                body.append(v.to_html(index=False, border=0, classes="t", na_rep=""))
            else:
                data = base64.b64encode(v[0].read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(v[1])}">'
                            f"<figcaption>{html.escape(v[1])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45;color:#222}"
                 "table.t{border-collapse:collapse;margin:1em 0;font-size:14px}"
                 "table.t td,table.t th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left}"
                 "figure{margin:1em 0}img{max-width:100%}figcaption{font-size:13px;color:#555}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def build_report(params: Params, run: Callable[[str], str]) -> tuple[Report, str, dict[str, str]]:
    """The report of this profile from its metrics files and analyses (read from the working
    directory; a missing file leaves its section out or marks its numbers n/a).

    Args:
        params: the profile's params.
        run: a stage instance's name (``evaluate``, ``train_defended@fnc``) -> its MLflow run id ("" unknown).

    Returns:
        ``(report, title, verdicts)``: the blocks, the title, and per defense its
        gradient-masking verdict ("not suspected" or "suspected: ...") where checked.
    """
    name = params.model.name
    ev = (_load("metrics/evaluate.json") or {}).get(name, {})
    base = _load("metrics/train_baseline.json") or {}
    rp2 = _load("metrics/rp2.json") or {"enabled": False}
    meta = _load(prepared_dir(params.data.dataset) / "meta.json")
    rep = Report()
    title = f"Reproduction report: {params.profile} profile ({name} on {dataset_name(meta or params.data.model_dump())})"
    rep.h(1, title)
    rep.p(f"Generated by `dvc repro` (stage `report`) at commit {git_commit()}; MLflow experiment "
          f"`{params.mlflow.experiment}` at {tracking_uri()}. Accuracies and rates in percent; 'pt' are percentage "
          f"points (ours minus the paper's). '{NOT_PUBLISHED}': the source prints no such number.")
    if meta is not None:
        rep.p(data_sentence(meta, params))
    rep.h(2, "Models")
    rows = [{"model": "none (baseline)", "clean accuracy": _pct(base.get("clean_accuracy")),
             "epochs": base.get("epochs"), "MLflow run": run("train_baseline")}]
    for d in params.defended:
        m = _load(Path("metrics/train_defended") / f"{d}.json") or {}
        rows.append({"model": d, "clean accuracy": _pct(m.get("clean_accuracy")), "epochs": m.get("epochs", 0),
                     "MLflow run": run(f"train_defended@{d}")})
    rep.table(pd.DataFrame(rows))
    verdicts, checks = _masking(params, ev)
    _defense_suite(rep, params, ev, run, verdicts)
    _masking_section(rep, params, verdicts, checks, run)
    _fnc(rep, params, ev, run)
    _fnc_tradeoff(rep, run)
    _madry(rep, params, ev, run)
    _mask_fgsm(rep, params, ev, run)
    _prm(rep, params, ev, run)
    _blurnet(rep, params, rp2, run)
    return rep, title, verdicts


def patch_area_text(params: Params, meta: dict[str, Any] | None) -> str:
    """The patch's real size, e.g. ``"8x8 px, 8.2 % of the 28x28 image (patch.area_fraction 10 %, the side
    rounded down)"``: :func:`pipeline.attacks.patch.patch_side` rounds the side down, so on small
    images the area a patch covers can be well below ``patch.area_fraction``. Without ``meta``
    (the prepared dataset's) the fraction asked for."""
    f = params.patch.area_fraction
    if meta is None:
        return f"{f:.0%} of the image"
    _, h, w = meta["image_shape"]
    side = patch_side(f, h, w)
    real = side * side / (h * w)
    text = f"{side}x{side} px, {100 * real:.1f} % of the {h}x{w} image"
    return text if abs(real - f) < 5e-4 else f"{text} (patch.area_fraction {100 * f:g} %, the side rounded down)"


def data_sentence(meta: dict[str, Any], params: Params) -> str:
    """One paragraph on the data every number was measured on: the dataset's name, its classes
    (the first 12 by name), channels, image size, the split sizes and the patch's real size."""
    classes = meta["classes"]
    shown = ", ".join(f"{i} {c}" for i, c in enumerate(classes[:12])) + (", ..." if len(classes) > 12 else "")
    c, h, w = meta["image_shape"]
    n = {s: meta["splits"].get(s, {}).get("n_images", 0) for s in ("train", "val", "test")}
    kind = "" if dataset_name(meta) == meta["dataset"] else f" ({meta['dataset']})"
    return (f"Data: {dataset_name(meta)}{kind}, {len(classes)} classes ({shown}); {'grey' if c == 1 else 'RGB'} "
            f"{h}x{w} images; {n['train']:,} training, {n['val']:,} validation and {n['test']:,} test images. "
            f"Patches: {patch_area_text(params, meta)}.")


def _cell(ev: dict, defense: str, attack: str, key: str) -> float | None:
    return ev.get(defense, {}).get(attack, {}).get(key)


PATCH_KINDS = (("", "transferred"), ("_adaptive", "adaptive"), ("_bpda", "BPDA through FNC"))
"""Patch cells of one universal patch attack: made on the baseline, on each defended model
(white box), and on each defended model with FNC passed by BPDA (Athalye et al. 2018)."""


def _worst_patch(ev: dict, d: str, attacks: list[str]) -> tuple[float, str] | None:
    """The lowest robust accuracy over every patch cell of defense ``d``, with the cell's name:
    the ``<attack>_worst`` cells where the matrix has them, else every transferred/adaptive cell."""
    found = []
    for attack in PATCH_ATTACKS:
        worst = ev.get(d, {}).get(f"{attack}_worst")
        if worst is not None:
            found.append((worst["robust_accuracy"], f"{attack}: {worst['worst_attack']}"))
            continue
        for suffix, _ in PATCH_KINDS:
            cell = ev.get(d, {}).get(f"{attack}{suffix}")
            if f"{attack}{suffix}" in attacks and cell is not None:
                found.append((cell["robust_accuracy"], f"{attack}{suffix}"))
    return min(found, key=lambda t: t[0]) if found else None


def _patch_masking_checks(params: Params, ev: dict) -> list[dict[str, Any]]:
    """Check (a) for universal patches, per defended model and patch attack: the adaptive
    (white-box) patch's attack success rate is at least the transferred one's minus twice its
    noise (the larger of the standard deviation over seeds and the binomial standard error over
    the images). Rows in the layout of ``analysis/<model>/masking/checks.csv``."""
    rows = []
    for d in (d for d in params.evaluate.defenses if d != "none" and d in ev):
        for attack in PATCH_ATTACKS:
            transferred = ev[d].get(attack)
            adaptive = [(ev[d][f"{attack}{s}"], f"{attack}{s}") for s, _ in PATCH_KINDS[1:] if f"{attack}{s}" in ev[d]]
            if transferred is None or not adaptive:
                continue
            best, name = max(adaptive, key=lambda t: t[0]["attack_success_rate"])
            p, n = transferred["attack_success_rate"], max(int(transferred.get("n_images", 0)), 1)
            noise = max(transferred.get("attack_success_rate_std") or 0.0, math.sqrt(p * (1 - p) / n))
            passed = best["attack_success_rate"] >= p - 2 * noise
            rows.append({"defense": d, "check": "a", "description": "white box not weaker than transfer (patch)",
                         "value_label": f"{name} attack success rate", "value": best["attack_success_rate"],
                         "reference_label": f"{attack} (transferred) attack success rate", "reference": p,
                         "n_images": n, "p_value": math.nan, "passed": str(passed),
                         "detail": f"{best['attack_success_rate']:.3f} >= {p:.3f} - 2 x {noise:.3f}"})
    return rows


def _masking(params: Params, ev: dict) -> tuple[dict[str, str], pd.DataFrame | None]:
    """The gradient-masking verdict of every evaluated model ("suspected: a, d" or "not
    suspected") from ``analysis/<model>/masking/checks.csv`` (analyze@masking) and the patch
    check of :func:`_patch_masking_checks`, and all the checks as one table (None without any)."""
    csv = Path("analysis") / params.model.name / "masking" / "checks.csv"
    frames = [pd.read_csv(csv, dtype={"passed": str})] if csv.is_file() else []
    patch_rows = _patch_masking_checks(params, ev)
    if patch_rows:
        frames.append(pd.DataFrame(patch_rows))
    if not frames:
        return {}, None
    df = pd.concat(frames, ignore_index=True)
    verdicts = {}
    for d, g in df.groupby("defense", sort=False):
        failed = sorted(set(g.loc[g["passed"] == "False", "check"]))
        verdicts[d] = f"suspected: {', '.join(failed)}" if failed else "not suspected"
    return verdicts, df


def _masking_section(rep: Report, params: Params, verdicts: dict[str, str], df: pd.DataFrame | None, run) -> None:
    """The gradient-masking checks of every model, each with its numbers and pass/fail."""
    if df is None:
        return
    rep.h(2, "Gradient-masking checks")
    table = df.assign(value=df["value"].map(lambda v: f"{100 * v:.2f} %"),
                      reference=df["reference"].map(lambda v: f"{100 * v:.2f} %"),
                      verdict=df["defense"].map(verdicts))
    rep.table(table[["defense", "check", "description", "value_label", "value", "reference_label", "reference",
                     "n_images", "passed", "verdict"]])
    rep.p("Checks of Carlini et al. (2019, Section 5) and Athalye et al. (ICML 2018, Section 3): (a) white box not "
          "weaker than transfer, for PGD (analyze@masking) and for the patches (adaptive attack success rate at least "
          "the transferred one's minus twice its noise); (b) accuracy falls with eps and reaches the floor at 64/255; "
          "(c) more iterations and restarts are not weaker; (d) the gradient-free Square attack is not markedly "
          "stronger than the gradient attacks; (e) uniform noise is weaker than PGD. Per-image checks compare two "
          "attacks on the same images with an exact McNemar test. A model failing any check is marked 'masking "
          f"suspected': its robust numbers are upper bounds that a stronger attack may lower. MLflow runs "
          f"{run('analyze@masking')} and this report's own (stage report).")
    rep.figure(Path("analysis") / params.model.name / "masking" / "eps_sweep.png",
               "robust accuracy under PGD against eps, per model, with Wilson intervals")


def _worst_of(ev: dict) -> str:
    """The attacks the ``per_image_worst`` cells combine (the first cell's list), or 'PGD'."""
    cell = next((row["per_image_worst"] for row in ev.values() if "per_image_worst" in row), None)
    return cell["attacks"].replace(",", ", ") if cell else "PGD"


def _defense_suite(rep: Report, params: Params, ev: dict, run, masking: dict[str, str]) -> None:
    """One row per evaluated model: clean accuracy and its drop from the undefended model's,
    per-image attacks, every patch cell with its attack success rate, and the headline: the
    worst case over every patch cell, with the attack that achieved it."""
    defenses = [d for d in params.evaluate.defenses if d in ev]
    if len(defenses) < 2:
        return
    attacks = params.evaluate.attacks
    rep.h(2, "Every defense in one matrix")
    max_drop = params.report.max_clean_drop
    base_clean = _cell(ev, "none", "none", "clean_accuracy")
    per_image = [a for a in ("pgd", "autoattack") if a in attacks]
    rows, notes = [], []
    for d in defenses:
        clean = _cell(ev, d, "none", "clean_accuracy")
        row = {"model": d, f"clean (n={ev[d]['none']['n_images']})": rate_text(ev[d]["none"], "clean_accuracy")}
        drop = None if base_clean is None or clean is None or d == "none" else base_clean - clean
        marked = drop is not None and drop > max_drop + 1e-9  # 0.80 - 0.75 is not above 0.05
        row["clean drop"] = "" if drop is None else f"{100 * drop:.2f} pt" + (" (marked)" if marked else "")
        for a in per_image:
            ap = params.attack_params(a)
            label = f"PGD-{ap['steps']}" if a == "pgd" else "AutoAttack"
            row[f"{label} (n={ap['n_images']})"] = rate_text(ev[d].get(a, {}), "robust_accuracy")
        both = ev[d].get("per_image_worst")
        if both is not None:
            row[f"per-image worst case (n={both['n_images']})"] = (
                f"{rate_text(both, 'robust_accuracy')} ({both['worst_attack']})")
        for attack in PATCH_ATTACKS:
            if attack not in attacks and not any(f"{attack}{s}" in attacks for s, _ in PATCH_KINDS):
                continue
            for suffix, kind in PATCH_KINDS:
                cell = ev[d].get(f"{attack}{suffix}")
                if f"{attack}{suffix}" not in attacks or cell is None or (suffix and d == "none"):
                    continue  # the baseline's adaptive patches are its transferred ones
                text = f"{rate_text(cell, 'robust_accuracy')} / {_pct(cell['attack_success_rate'])}"
                if cell.get("selected_start"):
                    text += f" (start: {cell['selected_start']})"
                row[f"{attack} {kind}: robust / success"] = text
        worst = _worst_patch(ev, d, attacks)
        if worst is not None:
            row["worst case under a patch (attack)"] = f"{_pct(worst[0])} ({worst[1]})"
        if masking:
            row["gradient masking"] = masking.get(d, "")
        flags = []
        if marked:
            flags.append(f"clean accuracy {100 * drop:.1f} pt below the undefended model's (more than "
                         f"{100 * max_drop:.0f} pt): its robust numbers buy robustness with accuracy")
        if worst is not None and clean is not None and worst[0] > clean:
            flags.append("more accurate under the patch than clean: the defense damages clean images (its detector "
                         "or filter fires on the image's own content) and the patch draws it away; not robustness")
        if flags:
            notes.append(f"{d}: " + "; ".join(flags) + ".")
        rows.append(row)
    table = pd.DataFrame(rows).fillna("")  # a cell a model does not have is blank (the baseline's adaptive ones)
    last = [c for c in ("worst case under a patch (attack)", "gradient masking") if c in table]
    rep.table(table[[c for c in table if c not in last] + last])  # every patch cell first, then the headline
    pgd = params.attack_params("pgd") if "pgd" in attacks else None
    pgd_text = (f"PGD: {pgd['steps']} steps of {float(pgd['step_size']) * 255:.3g}/255 within "
                f"eps {float(pgd['eps']) * 255:.3g}/255 ({pgd['norm']}), {pgd['restarts']} restart(s), "
                f"{pgd.get('eot_samples', 1)} EOT sample(s) on randomised models, white box on each model. "
                f"'per-image worst case': an image counts as robust only if no attack of PGD's threat model "
                f"({_worst_of(ev)}) fools it, the number to cite for the per-image attacks; in brackets the "
                f"strongest of them alone. "
                ) if pgd is not None else ""
    rep.p(f"Robust accuracy / attack success rate (target class {params.patch.target}) in percent; '± x' is the "
          f"standard deviation over {len(params.patch.seeds)} patch seed(s), '[a, b]' a 95 % Wilson interval over the "
          f"images counted; differences inside these are not findings. 'clean drop': points below the undefended "
          f"model's clean accuracy, marked above {100 * max_drop:.0f} pt (`report.max_clean_drop`). Patches: "
          f"{patch_area_text(params, _load(prepared_dir(params.data.dataset) / 'meta.json'))}, the target class's "
          f"test images left out; 'transferred' "
          f"made on the undefended model; 'adaptive' searched on each model itself (BPDA through non-differentiable "
          f"input transforms, EOT over randomised ones) from the transferred patch and "
          f"{params.patch.adaptive_restarts} random start(s), the start kept being the one that attacks the validation "
          f"split best ('start'); 'BPDA through FNC' also passes FNC's clipping by its identity. The headline is the "
          f"worst case over all of them, per seed: a defense is as robust as its strongest known attack leaves it "
          f"(Carlini et al. 2019). {pgd_text}No paper reports this matrix; each paper's own numbers are in its "
          f"section below. MLflow run {run('evaluate')}.")
    for note in notes:
        rep.p(note)


def _fnc(rep: Report, params: Params, ev: dict, run) -> None:
    rep.h(2, "FNC against universal patches (Yu et al., ICCV 2021; seed 000)")
    if "fnc" not in ev:
        rep.p("FNC is not evaluated in this profile (`evaluate.defenses`).")
        return
    p = papers.FNC_IMAGENET if params.data.dataset == "imagenet" else papers.FNC_CIFAR10
    rows = []
    for label, attack, key, paper in (("clean accuracy", "none", "clean_accuracy", p["clean_accuracy"]),
                                      ("accuracy under AdvP (transferred)", "advp", "robust_accuracy", p["advp"]),
                                      ("accuracy under LaVAN (transferred)", "lavan", "robust_accuracy", p["lavan"]),
                                      ("accuracy under AdvP (adaptive)", "advp_adaptive", "robust_accuracy", None),
                                      ("accuracy under LaVAN (adaptive)", "lavan_adaptive", "robust_accuracy", None),
                                      ("accuracy under AdvP (adaptive, BPDA through FNC)", "advp_bpda",
                                       "robust_accuracy", None),
                                      ("accuracy under LaVAN (adaptive, BPDA through FNC)", "lavan_bpda",
                                       "robust_accuracy", None)):
        for d in ("none", "fnc"):
            ours = _cell(ev, d, attack, key)
            if ours is None:
                continue
            rows.append({"metric": label, "model": d, "paper": _pct(paper if d == "fnc" else None),
                         "ours": rate_text(ev[d][attack], key),
                         "difference": _diff(ours, paper if d == "fnc" else None),
                         "MLflow run": run("evaluate")})
    rep.table(pd.DataFrame(rows))
    patch = params.patch
    rep.p(f"Paper: {p['source']}; {p['setting']}. Ours: {params.model.name}, fnc.alpha {params.fnc.alpha}, "
          f"adjustment {params.fnc.adjustment}, {patch.area_fraction:.0%} patch targeted at class {patch.target}, "
          f"{patch.epochs} patch epochs on {patch.train_images or 'all'} {patch.train_on} images, "
          f"{len(patch.seeds)} seeds; our patched cells leave the target class out. '[a, b]': 95 % Wilson interval "
          f"over the cell's test images; '± s': standard deviation over the patch seeds.")
    ifnr = Path("analysis") / params.model.name / "feature_norms" / "ifnr.csv"
    if ifnr.is_file():
        df = pd.read_csv(ifnr)
        q = papers.IFNR_RESNET50
        rows = []
        for i, stage in enumerate(q["stages"]):
            row = {"depth": f"{(i + 1) / 4:.2f} of the network", "paper stage": stage,
                   "paper (ResNet-50, ImageNet)": f"{q['values'][i]:.2f}"}
            if params.model.name == "resnet50":  # the paper's own network: its stages exactly
                k = q["blocks"][i]
            else:  # our block nearest this fraction of the depth
                k = max(1, round((i + 1) / 4 * df["depth"].max()))
            row["our block"] = f"{k} of {df['depth'].max()}"
            for d, g in df.groupby("defense", sort=False):
                row[f"ours: {d}"] = f"{float(g[g.depth == k]['ifnr_mean'].iloc[0]):.2f}"
            rows.append(row)
        rep.h(3, "Incremental feature norm ratio by depth")
        rep.table(pd.DataFrame(rows))
        same = params.model.name == "resnet50" and params.data.dataset == "imagenet"
        where = ("the paper's stages (the same network and dataset: compare digit for digit)" if same else
                 "the blocks nearest each quarter of the depth (a different network or dataset: compare the trend)")
        rep.p(f"Paper: {q['source']}. Ours: mean over {int(df['n_images'].iloc[0])} {params.data.dataset} test "
              f"images at {where}. MLflow run {run('analyze@feature_norms')}.")
        rep.figure(ifnr.parent / "ifnr.png", "IFNR against relative depth, with the paper's ResNet-50 row")
        rep.figure(ifnr.parent / "norm_maps_none.png", "channel-norm maps of one image, clean and patched")
    rep.figure(Path("plots/evaluate.png"), "the evaluation matrix: accuracy clean and under each attack")


def _fnc_tradeoff(rep: Report, run) -> None:
    """The FNC trade-off (stage ``fnc_tradeoff``): its figure, the table of every cell with the
    rates' intervals, and the cell closest to the third-party point; or that it is off."""
    from pipeline.analysis import fnc_tradeoff as ft

    rep.h(2, "FNC trade-off")
    summary = _load("metrics/fnc_tradeoff.json")
    if not summary or not summary.get("enabled"):
        rep.p((summary or {}).get("note") or "The FNC trade-off is off in this profile (fnc_tradeoff.alphas is empty).")
        return
    rep.figure(Path("plots/fnc_tradeoff.png"), "clean accuracy against accuracy under the transferred AdvP patch, "
                                               "a line per adjustment, each point labelled with its alpha")
    rep.table(pd.DataFrame(ft.display_rows(summary)))
    rep.p(f"FNC (Eq. 4) inserted into the baseline at every alpha and adjusted as each row says, on "
          f"{summary['n_images']} test images (a prefix of evaluate's order) at evaluate's patch placements; the patches "
          f"are the baseline's ({', '.join(summary['attacks'])}, {summary['n_seeds']} seed(s)), transferred. '[a, b]': "
          f"95 % Wilson interval over the images counted; '± x': standard deviation over patch seeds. "
          f"{ft.closest_sentence(summary)} "
          + (f"The third-party point: {summary['reference']['setting']}; compare the direction, not the digits. "
             if summary.get("reference") else "")
          + f"MLflow run {run('fnc_tradeoff')}.")


def _madry(rep: Report, params: Params, ev: dict, run) -> None:
    rep.h(2, "PGD adversarial training (Madry et al., ICLR 2018; seed 003)")
    adv = [d for d in params.defended if d != "fnc" and (params.defended_config(d).train or {}).get("adversarial")]
    p = papers.MADRY_CIFAR10
    if adv:
        rows = []
        for d in ["none", *adv]:  # the undefended model for context; the paper's row is its adversarial one
            for label, attack, key, published in (("clean accuracy", "none", "clean_accuracy", p["clean_accuracy"]),
                                                  ("accuracy under PGD", "pgd", "robust_accuracy", p["pgd20"])):
                ours = _cell(ev, d, attack, key)
                if ours is None:
                    continue
                paper = None if d == "none" else published
                rows.append({"metric": label, "model": d, "paper": _pct(paper), "ours": rate_text(ev[d][attack], key),
                             "difference": _diff(ours, paper), "MLflow run": run("evaluate")})
        rep.table(pd.DataFrame(rows))
        pgd = params.attack_params("pgd")
        how = "; ".join(f"{d}: {(c := params.defended_config(d)).train['adversarial'].get('method', 'pgd')} "
                        f"training, {c.train.get('epochs', params.train.epochs)} epochs from "
                        f"{'scratch' if c.init == 'scratch' else 'the baseline'}" for d in adv)
        rep.p(f"Paper: {p['source']}; {p['setting']}. Ours: {params.model.name}, PGD with {pgd['steps']} steps and "
              f"{pgd['restarts']} restart(s) on {pgd['n_images']} test images; {how}. FGSM with a random start "
              f"(Wong et al. 2020) is the budget method; PGD-7 (params/madry-cifar10.yaml) reproduces the paper's. "
              f"'[a, b]': 95 % Wilson interval over the cell's test images.")
    else:
        rep.p("No adversarially trained model in this profile (a `defended` recipe with `train.adversarial`; see "
              "params/smoke-defenses.yaml). Paper: clean 87.3 %, PGD-20 45.8 % (" + p["source"] + ").")
    rep.figure(Path("analysis") / params.model.name / "loss_landscape" / "loss_landscape.png",
               "PGD loss along the iterations over random restarts, and the final losses")


def _mask_fgsm(rep: Report, params: Params, ev: dict, run) -> None:
    rep.h(2, "Mask-FGSM guided by Grad-CAM (Yu 2022; seed 002)")
    p = papers.MASK_FGSM
    rows = []
    for attack in ("fgsm", "jsma", "deepfool", "mask_fgsm"):
        if _cell(ev, "none", attack, "robust_accuracy") is None:
            continue
        l0, ssim = _cell(ev, "none", attack, "l0"), _cell(ev, "none", attack, "ssim")
        ssim_g = _cell(ev, "none", attack, "ssim_global")
        rows.append({"attack": attack, "L0 paper": _pct(p["l0"][attack]), "L0 ours": _pct(l0),
                     "SSIM paper (global, Eq. 8)": f"{p['ssim'][attack]:.3f}",
                     "SSIM ours (global, Eq. 8)": "" if ssim_g is None else f"{ssim_g:.3f}",
                     "SSIM ours (windowed)": "" if ssim is None else f"{ssim:.3f}",
                     "accuracy under attack (ours)": rate_text(ev["none"][attack], "robust_accuracy")})
    if rows:
        rep.table(pd.DataFrame(rows))
        rep.p(f"Paper: {p['source']}. Ours: the undefended {params.model.name} on {params.data.dataset}; L0 is the "
              f"fraction of input values changed; the paper's SSIM is its Eq. 8 over the whole image (one window), "
              f"compared with ours computed the same way (`ssim_global`); the windowed SSIM of Wang et al. 2004 "
              f"(`ssim`, 11x11 Gaussian windows) is shown beside it. MLflow run {run('evaluate')}.")
    else:
        rep.p("The L0 attacks are not evaluated in this profile (`evaluate.attacks`).")
    rep.figure(Path("analysis") / params.model.name / "gradcam_distance" / "confidence_vs_distance.png",
               "confidence against the distance of a noise block from the Grad-CAM centre")


def _prm(rep: Report, params: Params, ev: dict, run) -> None:
    rep.h(2, "Pixel robustness and masked PGD (Hwang et al., ICLR 2019 DebugML workshop; seed 004)")
    csv = Path("analysis") / params.model.name / "pixel_robustness" / "accuracy_vs_k.csv"
    if csv.is_file():
        df = pd.read_csv(csv)
        if "ci_low" in df:  # '[a, b]': 95 % Wilson interval over the images
            df["cell"] = [f"{100 * a:.2f} [{100 * lo:.1f}, {100 * hi:.1f}]"
                          for a, lo, hi in zip(df["accuracy"], df["ci_low"], df["ci_high"], strict=True)]
        else:
            df["cell"] = [f"{100 * a:.2f}" for a in df["accuracy"]]
        wide = df.pivot_table(index="k", columns=["defense", "which"], values="cell", aggfunc="first")
        wide.columns = [f"{d}, {w} k" for d, w in wide.columns]
        rep.table(wide.reset_index())
        n = f" on {int(df['n_images'].iloc[0])} test images, '[a, b]' its 95 % Wilson interval" if "n_images" in df else ""
        rep.p(f"Accuracy (%) after masked PGD on the top / bottom k of the pixel robustness map{n}; the seed "
              f"document gives the curves' shape only: {NOT_PUBLISHED} as numbers. "
              f"MLflow run {run('analyze@pixel_robustness')}.")
        rep.figure(csv.parent / "pixel_robustness.png", "robustness maps and accuracy against the fraction attacked")
    prm = [d for d in params.defended if any(e["name"] == "prm" for e in params.defended_config(d).defenses)]
    if prm:
        iou_csv = csv.parent / PRM_IOU_CSV
        iou = pd.read_csv(iou_csv).set_index("defense") if iou_csv.is_file() else None
        rows = []
        for d in prm:
            row = {"model": d, "clean": rate_text(ev.get(d, {}).get("none", {}), "clean_accuracy"),
                   "PGD": rate_text(ev.get(d, {}).get("pgd", {}), "robust_accuracy")}
            if iou is not None and d in iou.index:
                row |= {"IoU (top gradient pixels, designated set)": f"{iou.at[d, 'prm_iou']:.3f}",
                        "IoU of a random set": f"{iou.at[d, 'random_set_iou']:.3f}"}
            rows.append(row | {"paper": NOT_PUBLISHED})
        rep.table(pd.DataFrame(rows))
        rep.p("Clean and PGD accuracy of each PRM model with its designated pixels re-drawn at every inference (the "
              "defense); the IoU is measured with the set it was trained on held fixed (`analysis.defenses` must list "
              "the model for it). The seed document gives no PRM numbers.")


def _blurnet(rep: Report, params: Params, rp2: dict, run) -> None:
    rep.h(2, "BlurNet against RP2 stickers (Raju and Lipasti 2019; seed 001)")
    if not rp2.get("enabled"):
        rep.p("RP2 is off in this profile; params/blurnet.yaml reproduces the slides' tables on GTSRB.")
        return
    s, p = rp2["summary"], papers.BLURNET
    base = s.get("none", {}).get("white_box")
    for key, setting, label in (("table1", "black_box", "Table 1, black box (stickers made on the baseline)"),
                                ("table2", "white_box", "Table 2, white box (stickers made on each model)")):
        rows = []
        for d, vals in sorted(s.items(), key=lambda kv: kv[0] != "none"):  # the baseline first
            # black box on the baseline is its own white box: the slides' Table 1 baseline row
            v = vals.get(setting) or (vals.get("white_box") if d == "none" else None)
            if v is None:
                continue
            ref = p[key].get(d)
            paper_acc, paper_avg = (ref[1], ref[2]) if ref else (None, None)
            paper_worst = ref[3] if ref and key == "table2" else None
            test = _load("metrics/train_baseline.json" if d == "none" else Path("metrics/train_defended") / f"{d}.json")
            rows.append({"model": d, "slides' row": ref[0] if ref else "", "accuracy paper": _pct(paper_acc),
                         "victims classified stop (ours)": _pct(v["clean_accuracy"]),
                         "test accuracy (ours)": _pct((test or {}).get("clean_accuracy")),
                         "fooling rate (mean) paper": _pct(paper_avg),
                         "fooling rate (mean) ours [95 % CI]": rate_text(v, "fooling_rate_mean"),
                         "difference": _diff(v["fooling_rate_mean"], paper_avg),
                         "vs baseline (ours)": difference_text(v, "fooling_rate_mean"),
                         "fooling rate (worst target) paper": _pct(paper_worst),
                         "fooling rate (worst target) ours [95 % CI]": rate_text(v, "fooling_rate_worst"),
                         "L2 dissimilarity paper": f"{ref[4]:.3f}" if ref and key == "table2" else "",
                         "L2 dissimilarity ours": f"{v['l2_dissimilarity_mean']:.3f}"})
        rep.h(3, label)
        rep.table(pd.DataFrame(rows))
    rep.p(f"Paper: {p['source']}. Ours: {params.model.name} on GTSRB (not LISA), RP2 on the same 40 victims with "
          f"their sticker mask, targets {rp2['targets']}; fooling rate = victims whose prediction the sticker changes "
          f"(the slides' attack success rate), with its 95 % Wilson interval over the victims (one victim is "
          f"{100 / max(1, (base or {}).get('n_victims', 40)):.1f} points); 'vs baseline' is a model's mean fooling "
          f"rate minus the undefended model's white-box one, with its 95 % paired bootstrap interval over the "
          f"victims (both rows see the same victims), 'higher' or 'lower' only where that interval excludes 0; "
          f"no direction is read from a difference 'within noise'. The slides' accuracy reads as the "
          f"share of the victims classified stop in Table 1 (baseline 100 %) and as test accuracy in Table 2 "
          f"(baseline 91 %); ours gives both. "
          f"Comparable in direction, not digit for digit. "
          f"MLflow run {run('attack_rp2')}.")
    rep.figure(Path("rp2") / params.model.name / "stickers.png", "RP2 stickers on a victim")
    for f in sorted((Path("analysis") / params.model.name / "spectrum").glob("spectrum_*.png"))[:2]:
        rep.figure(f, f"log spectra of natural and RP2-perturbed stop signs ({f.stem})")
