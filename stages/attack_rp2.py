"""DVC stage ``attack_rp2``: RP2 stickers on RP2's 40 stop-sign victims, as BlurNet reports them.

RP2 (Eykholt et al., CVPR 2018, Eq. 3-4; :mod:`pipeline.attacks.rp2`) optimises one
sticker perturbation, confined to the sticker mask, over the whole victim set. For
every defense in ``rp2.defenses`` (``none`` is the undefended model), every target in
``rp2.targets`` and every seed in ``rp2.seeds``, one Ray task trains a sticker on that
model (white box; ``rp2.white_box`` can limit which models, as stickers cost the most).
Every sticker made on ``none`` is also applied to each defended model of ``rp2.defenses``
(black box, transferred), BlurNet's Table 1 setting; Table 2 is the white-box one.

Metrics per (defense, setting, target, seed): the victims' clean accuracy, the fooling
rate (BlurNet's "attack success rate": victims whose prediction the sticker changes),
the targeted success (victims classified as the target), the same under
``rp2.eval_transforms`` random transforms per victim, and the L2 dissimilarity
``||x - x_adv|| / ||x_adv||``. Per (defense, setting): the fooling rate averaged over
targets and seeds (``fooling_rate_mean``) and the worst target's
(``fooling_rate_worst``, the highest mean over seeds).

Writes ``rp2/<model>/<defense>/target_<t>_seed_<s>.{pt,png}``, ``rp2/<model>/stickers.png``,
``metrics/rp2.json`` and ``metrics/rp2.md``. A finished sticker is cached under
``.cache/attack_rp2/`` (keyed by the model file, the victims, the mask and the attack
settings), so a killed run redoes only what had not finished. With ``rp2.enabled: false``
(the CIFAR-10 profiles) the stage writes a note saying so and does nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pipeline import papers  # noqa: E402
from pipeline.attacks.rp2 import RP2Params, apply_rp2, evaluate_rp2  # noqa: E402
from pipeline.checkpoint import build_from_spec, load_checkpoint  # noqa: E402
from pipeline.cli import resume_dir, run_stage  # noqa: E402
from pipeline.config import Params, ParamsError  # noqa: E402
from pipeline.data import load_meta  # noqa: E402
from pipeline.data.rp2 import load_mask, load_victims  # noqa: E402
from pipeline.distributed import init_ray, ray_map  # noqa: E402
from pipeline.io import atomic_write, load_torch, save_figure, save_json, save_png, save_torch, sha256_file  # noqa: E402
from pipeline.metrics import (  # noqa: E402
    difference_text,
    direction,
    paired_difference_interval,
    rate_interval,
    versus_baseline,
)
from pipeline.tasks import rp2_task  # noqa: E402
from pipeline.tracking import log_artifact, log_artifacts, log_metrics, stage_run  # noqa: E402

log = logging.getLogger("attack_rp2")
PREPARED = Path("data/prepared")
METRICS = Path("metrics/rp2.json")
TABLE = Path("metrics/rp2.md")
PER_STICKER = ["clean_accuracy", "fooling_rate", "target_success", "target_success_transformed", "l2_dissimilarity"]


def model_file(name: str, defense: str) -> Path:
    """``models/<name>/baseline.pt`` for ``none``, else ``models/<name>/<defense>.pt``."""
    return Path("models") / name / ("baseline.pt" if defense == "none" else f"{defense}.pt")


def mask_path(victims: str, mask: str) -> Path:
    """``rp2.mask`` as a path: absolute as given, else relative to ``rp2.victims``."""
    return Path(mask) if Path(mask).is_absolute() else Path(victims) / mask


def _disabled(params: Params) -> None:
    out_dir = Path("rp2") / params.model.name
    note = (f"RP2 is off in the {params.profile!r} profile (rp2.enabled: false): it needs a traffic-sign model. "
            "Run params/gtsrb.yaml for the stop-sign setting.\n")
    atomic_write(out_dir / "README.md", lambda f: f.write(note.encode()))
    atomic_write(TABLE, lambda f: f.write(note.encode()))
    save_json({"enabled": False}, METRICS)
    log.info("rp2.enabled is false: nothing to do")


def summarise(rows: pd.DataFrame, n_victims: int, fooled: dict[tuple[str, str], torch.Tensor] | None = None) -> dict:
    """Per (defense, setting): means over targets and seeds, the worst target, and 95 %
    Wilson intervals (Wilson 1927, :func:`pipeline.metrics.rate_interval`) of both rates.

    The intervals are over the ``n_victims`` victims: every sticker is evaluated on the
    same victims, so the victims, not the stickers, are the independent draws; a rate
    averaged over targets and seeds is read as ``round(rate * n_victims)`` of
    ``n_victims``. With 40 victims one victim is 2.5 points and a rate near 0.3 has an
    interval of about +-0.14: differences inside it are noise.

    Args:
        rows: one row per (defense, setting, target, seed) with the :data:`PER_STICKER` columns.
        n_victims: victims every sticker was evaluated on (> 0).
        fooled: optional, per (defense, setting), float (n_victims,): per victim, the fraction
            of the row's stickers that fool it. With it, each row's difference from the
            undefended model's white-box row is read from a paired bootstrap over the victims
            (:func:`pipeline.metrics.paired_difference_interval`: both rows are measured on
            the same victims, so a victim easy or hard for both cancels); without it, from
            whether the two Wilson intervals overlap (:func:`pipeline.metrics.versus_baseline`).

    Returns:
        ``{defense: {setting: {"clean_accuracy", "fooling_rate_mean",
        "fooling_rate_mean_ci_low", "fooling_rate_mean_ci_high", "fooling_rate_worst",
        "fooling_rate_worst_ci_low", "fooling_rate_worst_ci_high", "worst_target",
        "target_success_mean", "target_success_transformed_mean", "l2_dissimilarity_mean",
        "n_stickers", "n_seeds", "n_victims", "fooling_rate_mean_vs_none"}}}``; fractions in
        [0, 1]; ``fooling_rate_mean_vs_none`` is "higher", "lower" or "within noise": the mean
        fooling rate against the undefended model's white-box one ("" for that row itself or
        without an undefended row); with ``fooled``, also ``fooling_rate_mean_diff`` and its
        95 % interval ``fooling_rate_mean_diff_ci_low``/``_high``.

    Raises:
        ValueError: ``n_victims`` < 1.
    """
    if n_victims < 1:
        raise ValueError(f"summarise: n_victims must be >= 1, got {n_victims}")

    out: dict = {}
    for (defense, setting), g in rows.groupby(["defense", "setting"], sort=False):
        per_target = g.groupby("target")["fooling_rate"].mean()
        mean, worst = float(g["fooling_rate"].mean()), float(per_target.max())
        (mean_low, mean_high), (worst_low, worst_high) = rate_interval(mean, n_victims), rate_interval(worst, n_victims)
        out.setdefault(defense, {})[setting] = {
            "clean_accuracy": float(g["clean_accuracy"].iloc[0]),
            "fooling_rate_mean": mean,
            "fooling_rate_mean_ci_low": mean_low,
            "fooling_rate_mean_ci_high": mean_high,
            "fooling_rate_worst": worst,
            "fooling_rate_worst_ci_low": worst_low,
            "fooling_rate_worst_ci_high": worst_high,
            "worst_target": int(per_target.idxmax()),
            "target_success_mean": float(g["target_success"].mean()),
            "target_success_transformed_mean": float(g["target_success_transformed"].mean()),
            "l2_dissimilarity_mean": float(g["l2_dissimilarity"].mean()),
            "n_stickers": int(len(g)),
            "n_seeds": int(g["seed"].nunique()),
            "n_victims": int(n_victims),
        }
    base = out.get("none", {}).get("white_box")
    paired = fooled is not None and ("none", "white_box") in fooled
    for d, by in out.items():
        for setting, v in by.items():  # the undefended model's white-box rate is the baseline itself
            if base is None or v is base:
                v["fooling_rate_mean_vs_none"] = ""
            elif paired:
                diff, low, high = paired_difference_interval(fooled[(d, setting)], fooled[("none", "white_box")])
                v.update(fooling_rate_mean_diff=diff, fooling_rate_mean_diff_ci_low=low,
                         fooling_rate_mean_diff_ci_high=high, fooling_rate_mean_vs_none=direction(low, high))
            else:
                v["fooling_rate_mean_vs_none"] = versus_baseline(
                    v["fooling_rate_mean_ci_low"], v["fooling_rate_mean_ci_high"],
                    base["fooling_rate_mean_ci_low"], base["fooling_rate_mean_ci_high"])
    return out


def main(params: Params) -> None:
    """Train the RP2 stickers (cached per sticker), evaluate white and black box, write the tables."""
    r = params.rp2
    if not r.enabled:
        _disabled(params)
        return
    name = params.model.name
    meta = load_meta(PREPARED / params.data.dataset)
    _, h, w = meta["image_shape"]
    files = {d: model_file(name, d) for d in r.defenses}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} not found; run the training stages first (dvc repro)")
    if h != w:
        raise ParamsError(f"rp2: the model takes {h}x{w} images; RP2's victims are square (32 or 256)")
    victims, names = load_victims(r.victims, size=h)
    mpath = mask_path(r.victims, r.mask)
    mask = load_mask(mpath, size=(h, w))
    labels = torch.full((len(victims),), r.true_class, dtype=torch.int64)
    log.info("RP2 on %d victims (%s), mask %s (%d px, %.1f%% of the image), true class %d (%s), targets %s, "
             "defenses %s", len(victims), r.victims, mpath, int(mask.sum()), 100 * float(mask.float().mean()),
             r.true_class, meta["classes"][r.true_class], r.targets, r.defenses)
    cfgs = {t: RP2Params.model_validate({**r.attack, "target": t}) for t in r.targets}
    specs = {d: load_checkpoint(f) for d, f in files.items()}
    inputs_key = {"victims": sha256_bytes(victims), "mask": sha256_bytes(mask), "attack": r.attack,
                  "true_class": r.true_class}
    weights = {d: sha256_file(f) for d, f in files.items()}
    jobs = [(d, t, s) for d in r.white_box_defenses for t in r.targets for s in r.seeds]

    def cache_file(defense: str, target: int, seed: int) -> Path:
        key = {**inputs_key, "weights": weights[defense], "target": target, "seed": seed}
        return resume_dir("attack_rp2", key) / "sticker.pt"

    done = {job: load_torch(cache_file(*job)) for job in jobs if cache_file(*job).is_file()}
    todo = [job for job in jobs if job not in done]
    if done:
        log.info("reusing %d finished sticker(s) from .cache/attack_rp2", len(done))
    if todo:
        init_ray()
        items = [{"spec": specs[d], "victims": victims, "labels": labels, "mask": mask, "cfg": cfgs[t], "seed": s,
                  "num_threads": params.resources.num_cpus} for d, t, s in todo]

        def finished(i: int, res: dict) -> None:  # cached as each task ends: a killed run redoes only the others
            done[todo[i]] = res
            save_torch(res, cache_file(*todo[i]))

        ray_map(rp2_task, items, num_cpus=params.resources.num_cpus, num_gpus=params.resources.num_gpus,
                desc="RP2 stickers (one task per defense, target, seed)", on_result=finished)

    models = {d: build_from_spec(spec).eval() for d, spec in specs.items()}
    rows, fooled = [], {}
    for (source, target, seed), res in done.items():
        for defense in r.defenses:
            if source == defense:
                setting = "white_box"
            elif source == "none":
                setting = "black_box"
            else:
                continue
            m = evaluate_rp2(models[defense], victims, labels, res["delta"], mask, cfgs[target],
                             transforms=r.eval_transforms, seed=seed)
            if r.eval_transforms == 0:
                m["target_success_transformed"] = float("nan")
            fooled.setdefault((defense, setting), []).append(m["fooled"].float())
            rows.append({"defense": defense, "setting": setting, "source": source, "target": target, "seed": seed,
                         **{k: m[k] for k in PER_STICKER}, "seconds": res["seconds"]})
    table = pd.DataFrame(rows).sort_values(["setting", "defense", "target", "seed"], key=_setting_order)
    summary = summarise(table, len(victims), {k: torch.stack(v).mean(0) for k, v in fooled.items()})

    out_dir = Path("rp2") / name
    for (source, target, seed), res in done.items():
        save_torch(res["delta"], out_dir / source / f"target_{target}_seed_{seed}.pt")
        adv = apply_rp2(victims[:1].float() / 255, res["delta"], mask, cfgs[target].sticker_fill)
        save_png(adv[0], out_dir / source / f"target_{target}_seed_{seed}.png", upscale=8)
    _figure(models, victims, mask, done, cfgs, meta["classes"], r, out_dir / "stickers.png")
    metrics = {"enabled": True, "n_victims": len(victims), "mask_pixels": int(mask.sum()),
               "true_class": r.true_class, "targets": r.targets, "summary": summary,
               "stickers": table.to_dict(orient="records")}
    save_json(metrics, METRICS)
    md = _markdown(table, summary, meta["classes"], r, len(victims))
    atomic_write(TABLE, lambda f: f.write(md.encode()))
    log.info("\n%s", md)

    section = {"model": params.model.model_dump(), "rp2": r.model_dump(mode="json"), "seed": params.seed}
    tags = {"profile": params.profile, "paper": params.mlflow.paper,
            "model": name, "attack": "rp2", "defense": ",".join(r.defenses),
            "node_ids": ",".join(sorted({res.get("node_id", "?") for res in done.values()}))}
    with stage_run("attack_rp2", params.mlflow.experiment, section, tags):
        log_metrics({f"{d}.{s}.{k}": v for d, by in summary.items() for s, vals in by.items()
                     for k, v in vals.items() if isinstance(v, float)})
        for (source, target, seed), res in done.items():
            for key, values in res["history"].items():
                for step in range(0, len(values), max(1, len(values) // 100)):
                    log_metrics({f"rp2_{key}.{source}.target_{target}.seed_{seed}": values[step]}, step=step)
        log_artifacts(out_dir, artifact_path="rp2")
        log_artifact(TABLE, artifact_path="rp2")


def sha256_bytes(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (cache keys of in-memory inputs)."""
    import hashlib

    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def _setting_order(col: pd.Series) -> pd.Series:
    return col.map({"black_box": 0, "white_box": 1}) if col.name == "setting" else col


def _rate(v: dict, key: str) -> str:
    """``"0.3000 [0.1800, 0.4500]"``: a rate of :func:`summarise` with its 95 % interval."""
    return f"{v[key]:.4f} [{v[key + '_ci_low']:.4f}, {v[key + '_ci_high']:.4f}]"


def slides_row(defense: str, setting: str) -> str:
    """The row of BlurNet's slides (seed 001, :data:`pipeline.papers.BLURNET`) that a summary row
    reproduces: Table 1 for black-box stickers, Table 2 for white-box ones; the undefended model's
    white-box row is both tables' baseline. ``""`` for a model the slides do not print."""
    t1, t2 = papers.BLURNET["table1"].get(defense), papers.BLURNET["table2"].get(defense)
    if defense == "none":
        return f"Table 1: {t1[0]}; Table 2: {t2[0]}"
    row = t1 if setting == "black_box" else t2
    return f"Table {1 if setting == 'black_box' else 2}: {row[0]}" if row else ""


def _markdown(table: pd.DataFrame, summary: dict, classes: list[str], r, n: int) -> str:
    """The summary table (BlurNet's Tables 1 and 2 layout, every rate with its 95 % Wilson
    interval over the victims and its difference from the undefended model's white-box
    rate told apart from noise) and the per-sticker rows. The header says how the
    difference was read: a paired bootstrap where ``summary`` has ``fooling_rate_mean_diff``
    (:func:`summarise` with ``fooled``), else the overlap of the two Wilson intervals."""
    paired = any("fooling_rate_mean_diff" in v for by in summary.values() for v in by.values())
    versus = ("`vs none`: the mean fooling rate minus the undefended model's white-box one, with its 95 % paired "
              "bootstrap interval over the victims (both rows see the same victims), 'higher' or 'lower' only "
              "where that interval excludes 0." if paired else
              "`vs none`: the mean fooling rate against the undefended model's white-box one, 'higher' or 'lower' "
              "only where the two Wilson intervals do not overlap (conservative).")
    lines = [f"# RP2 on {n} stop-sign victims (true class {r.true_class}, {classes[r.true_class]})", "",
             "Fooling rate: victims whose prediction the sticker changes (BlurNet's attack success rate); "
             "mean over targets and seeds, worst over targets. Black box: stickers made on the undefended model; "
             f"white box: made on each model itself. Brackets: 95 % Wilson interval over the {n} victims (the "
             f"stickers share them, so they are the independent draws; one victim is {100 / n:.1f} points). "
             + versus, ""]
    flat = []
    named = any(d != "none" and slides_row(d, setting) for d, by in summary.items() for setting in by)
    for d, by in summary.items():
        for setting, v in by.items():
            flat.append({"setting": setting, "defense": d, **({"slides' row": slides_row(d, setting)} if named else {}),
                         "clean_accuracy": v["clean_accuracy"],
                         "fooling_rate_mean [95% CI]": _rate(v, "fooling_rate_mean"),
                         "vs none": difference_text(v, "fooling_rate_mean"),
                         "fooling_rate_worst [95% CI]": _rate(v, "fooling_rate_worst"),
                         "worst_target": f"{v['worst_target']} ({classes[v['worst_target']]})",
                         "target_success_mean": v["target_success_mean"],
                         "target_success_transformed_mean": v["target_success_transformed_mean"],
                         "l2_dissimilarity_mean": v["l2_dissimilarity_mean"], "stickers": v["n_stickers"],
                         "seeds": v["n_seeds"]})
    df = pd.DataFrame(flat).sort_values(["setting", "defense"], key=_setting_order)
    lines += [df.to_markdown(index=False, floatfmt=".4f"), "", "## Per sticker", "",
              table.drop(columns=["seconds"]).to_markdown(index=False, floatfmt=".4f"), ""]
    return "\n".join(lines)


def _figure(models, victims, mask, done, cfgs, classes, r, path: Path) -> None:
    """Per (white-box model, target): the first seed's perturbation and four victims with it, titled by prediction.

    One seed a row keeps the figure readable with several seeds (every seed's rates are in ``rp2.md``).
    """
    first_seed = min(seed for _, _, seed in done)
    jobs = sorted(job for job in done if job[2] == first_seed)
    shown = victims[:4].float() / 255
    fig, axes = plt.subplots(len(jobs), 5, figsize=(10, 2.2 * len(jobs)), squeeze=False)
    for row, job in zip(axes, jobs, strict=True):
        source, target, seed = job
        delta = done[job]["delta"]
        row[0].imshow((delta.abs().amax(0) / delta.abs().max().clamp_min(1e-8)).numpy(), cmap="magma")
        row[0].set_title(f"{source}, target {target}\nseed {seed}: |delta|", fontsize=8)
        adv = apply_rp2(shown, delta, mask, cfgs[target].sticker_fill)
        with torch.no_grad():
            pred = models[source](adv).argmax(1)
        for ax, img, p in zip(row[1:], adv, pred, strict=True):
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(classes[int(p)][:22], fontsize=7, color="red" if int(p) != r.true_class else "black")
        for ax in row:
            ax.axis("off")
    fig.suptitle("RP2 stickers (white box) on stop-sign victims; red: prediction changed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    run_stage("attack_rp2", main)
