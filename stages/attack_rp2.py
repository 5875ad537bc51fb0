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

import torch

from pipeline.attacks.rp2 import RP2Params, apply_rp2
from pipeline.checkpoint import build_from_spec, load_checkpoint
from pipeline.cli import run_stage
from pipeline.config import Params, ParamsError
from pipeline.data import load_meta
from pipeline.data.rp2 import load_mask, load_victims
from pipeline.io import atomic_write, save_json, save_png, save_torch, sha256_file
from pipeline.layout import model_path, prepared_dir, rp2_mask_path, sticker_dir
from pipeline.render.rp2 import markdown, stickers_figure
from pipeline.stickers import evaluate_stickers, summarise, train_stickers
from pipeline.tracking import log_artifact, log_artifacts, log_metrics, stage_run

log = logging.getLogger("attack_rp2")
METRICS = Path("metrics/rp2.json")
TABLE = Path("metrics/rp2.md")


def _disabled(params: Params) -> None:
    out_dir = sticker_dir(params.model.name)
    note = (f"RP2 is off in the {params.profile!r} profile (rp2.enabled: false): it needs a traffic-sign model. "
            "Run params/gtsrb.yaml for the stop-sign setting.\n")
    atomic_write(out_dir / "README.md", lambda f: f.write(note.encode()))
    atomic_write(TABLE, lambda f: f.write(note.encode()))
    save_json({"enabled": False}, METRICS)
    log.info("rp2.enabled is false: nothing to do")


def main(params: Params) -> None:
    """Train the RP2 stickers (cached per sticker), evaluate white and black box, write the tables."""
    r = params.rp2
    if not r.enabled:
        _disabled(params)
        return
    name = params.model.name
    meta = load_meta(prepared_dir(params.data.dataset))
    _, h, w = meta["image_shape"]
    files = {d: model_path(name, d) for d in r.defenses}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} not found; run the training stages first (dvc repro)")
    if h != w:
        raise ParamsError(f"rp2: the model takes {h}x{w} images; RP2's victims are square (32 or 256)")
    victims, names = load_victims(r.victims, size=h)
    mpath = rp2_mask_path(r.victims, r.mask)
    mask = load_mask(mpath, size=(h, w))
    labels = torch.full((len(victims),), r.true_class, dtype=torch.int64)
    log.info("RP2 on %d victims (%s), mask %s (%d px, %.1f%% of the image), true class %d (%s), targets %s, "
             "defenses %s", len(victims), r.victims, mpath, int(mask.sum()), 100 * float(mask.float().mean()),
             r.true_class, meta["classes"][r.true_class], r.targets, r.defenses)
    cfgs = {t: RP2Params.model_validate({**r.attack, "target": t}) for t in r.targets}
    specs = {d: load_checkpoint(f) for d, f in files.items()}
    weights = {d: sha256_file(f) for d, f in files.items()}
    done = train_stickers(params, specs, weights, victims, labels, mask, cfgs)
    models = {d: build_from_spec(spec).eval() for d, spec in specs.items()}
    table, fooled = evaluate_stickers(models, done, victims, labels, mask, cfgs, r.defenses, r.eval_transforms)
    summary = summarise(table, len(victims), fooled)

    out_dir = sticker_dir(name)
    for (source, target, seed), res in done.items():
        save_torch(res["delta"], out_dir / source / f"target_{target}_seed_{seed}.pt")
        adv = apply_rp2(victims[:1].float() / 255, res["delta"], mask, cfgs[target].sticker_fill)
        save_png(adv[0], out_dir / source / f"target_{target}_seed_{seed}.png", upscale=8)
    stickers_figure(models, victims, mask, done, cfgs, meta["classes"], r, out_dir / "stickers.png")
    metrics = {"enabled": True, "n_victims": len(victims), "mask_pixels": int(mask.sum()),
               "true_class": r.true_class, "targets": r.targets, "summary": summary,
               "stickers": table.to_dict(orient="records")}
    save_json(metrics, METRICS)
    md = markdown(table, summary, meta["classes"], r, len(victims))
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


if __name__ == "__main__":
    run_stage("attack_rp2", main)
