"""Functions run as Ray tasks (and the training actor), one per unit of work.

Each takes one picklable ``item`` dict, resolves the ``ObjectRef``s inside it
(large inputs shared by many tasks are put in the object store once), sets the
torch threads to the CPUs the task was given, and returns plain results
(tensors, floats) to the stage process, which writes files and logs to MLflow.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from pipeline.attacks.patch import PatchAttack
from pipeline.checkpoint import apply_defenses, build_from_spec
from pipeline.defenses.adjust import adjust_after_insertion
from pipeline.distributed import node_id
from pipeline.evaluation import attack_shard, fit_attack, predict_shard, score_patches
from pipeline.train import accuracy, default_device


def _get(value: Any) -> Any:
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def patch_task(item: dict[str, Any]) -> dict[str, Any]:
    """Train one universal patch (:class:`pipeline.attacks.patch.PatchAttack`'s ``fit``). ``item``:
    spec, data (ref to (x, y) uint8/int64), cfg (:class:`PatchTrainingConfig`), seed,
    num_threads, and optionally bpda (True: gradients pass every BPDA-switchable defense,
    FNC's clipping, as the identity, :func:`pipeline.defenses.base.set_bpda`) and init (the
    starting patch, float (3, s, s) in [0, 1]; None: zeros)."""
    from pipeline.defenses.base import set_bpda

    torch.set_num_threads(max(1, int(item["num_threads"])))
    x, y = _get(item["data"])
    start = time.perf_counter()
    model = build_from_spec(item["spec"])
    if item.get("bpda"):
        set_bpda(model, True)
    patch, history = PatchAttack(item["cfg"]).fit(model, x, y, item["seed"], default_device(), init=item.get("init"))
    return {"patch": patch, "history": history, "seconds": time.perf_counter() - start, "node_id": node_id()}


def score_patches_task(item: dict[str, Any]) -> dict[str, Any]:
    """Score candidate patches on one model (:func:`score_patches`). ``item``: spec,
    data (ref to the validation (x, y)), patches (K, 3, s, s), placements, target,
    attack, batch_size, num_threads."""
    x, y = _get(item["data"])
    scores = score_patches(item["spec"], x, y, item["patches"], item["placements"], item["target"], item["attack"],
                           item["batch_size"], int(item["num_threads"]))
    return {**scores, "node_id": node_id()}


def rp2_task(item: dict[str, Any]) -> dict[str, Any]:
    """Optimise one RP2 sticker (:class:`pipeline.attacks.rp2.RP2Attack`'s ``fit``). ``item``:
    spec, victims (uint8 (N, 3, H, W)), labels (int64 (N,)), mask ((1, H, W) of 0 / 1),
    cfg (:class:`RP2Params`, its target set), seed, num_threads."""
    from pipeline.attacks.rp2 import RP2Attack

    torch.set_num_threads(max(1, int(item["num_threads"])))
    start = time.perf_counter()
    delta, history = RP2Attack(item["cfg"], item["mask"]).fit(build_from_spec(item["spec"]), item["victims"],
                                                              item["labels"], item["seed"], default_device())
    return {"delta": delta, "history": history, "seconds": time.perf_counter() - start, "node_id": node_id()}


def evaluate_task(item: dict[str, Any]) -> dict[str, Any]:
    """Predictions of one model on one test shard, clean and under the patch
    attacks named in ``item["attacks"]``. ``item``: spec, x, placements, patches
    (ref to name -> (S, 3, s, s)), attacks, batch_size, num_threads (see
    :func:`predict_shard`)."""
    patches = {a: p for a, p in _get(item["patches"]).items() if a in item["attacks"]}
    preds = predict_shard(
        _get(item["spec"]), item["x"], item["placements"], patches, item["batch_size"], int(item["num_threads"])
    )
    return {"preds": preds, "node_id": node_id()}


def fit_task(item: dict[str, Any]) -> dict[str, Any]:
    """Fit a data-dependent attack once on one model (:func:`fit_attack`). ``item``:
    spec, attack, params, fit_data (ref to uint8 images, labels), num_threads."""
    start = time.perf_counter()
    state = fit_attack(_get(item["spec"]), item["attack"], item["params"], _get(item["fit_data"]),
                       int(item["num_threads"]))
    return {"state": state, "seconds": time.perf_counter() - start, "node_id": node_id()}


def attack_task(item: dict[str, Any]) -> dict[str, Any]:
    """A per-image attack on one test shard. ``item``: spec, attack, params, x,
    y, seed, fit_data (ref or None), fitted (ref or None: the state of
    :func:`fit_task`), num_threads (see :func:`attack_shard`)."""
    start = time.perf_counter()
    out = attack_shard(
        _get(item["spec"]), item["attack"], item["params"], item["x"], item["y"], item["seed"],
        _get(item.get("fit_data")), int(item["num_threads"]), _get(item.get("fitted")),
    )
    return {**out, "seconds": time.perf_counter() - start, "node_id": node_id()}


def defend_task(item: dict[str, Any]) -> dict[str, Any]:
    """Insert the defenses of ``item["defenses"]`` into the model ``item["spec"]`` (the
    baseline, or a model trained with its own defenses), adjust it as
    ``item["adjustment"]`` says (:mod:`pipeline.defenses.adjust`), and measure clean
    accuracy before insertion (``baseline_clean_accuracy``), after it
    (``clean_accuracy_unadjusted``) and after the adjustment (``clean_accuracy``), all in
    [0, 1] on ``item["test"]``. Returns those and the adjusted state dict."""
    torch.set_num_threads(max(1, int(item["num_threads"])))
    device = default_device()
    (x_train, y_train), (x_test, y_test) = _get(item["train"]), _get(item["test"])
    spec = item["spec"]
    model = apply_defenses(build_from_spec(spec), item["defenses"])
    model.to(device).eval()
    bs = item["batch_size"]
    out: dict[str, Any] = {"node_id": node_id()}
    start = time.perf_counter()
    out["clean_accuracy_unadjusted"] = accuracy(model, x_test, y_test, bs, device)
    adjustment = item["adjustment"]
    out.update(adjust_after_insertion(model, adjustment, x_train, y_train, batch_size=bs, seed=item["seed"],
                                      adjust_batches=item["adjust_batches"], finetune_epochs=item["finetune_epochs"],
                                      finetune_lr=item["finetune_lr"], horizontal_flip=item["horizontal_flip"],
                                      device=device))
    if adjustment in ("bn_recalibration", "finetune_classifier"):
        out["clean_accuracy"] = accuracy(model, x_test, y_test, bs, device)
    else:  # nothing adjusted: the same model on the same images (a randomised one: the same draw)
        out["clean_accuracy"] = out["clean_accuracy_unadjusted"]
    out["baseline_clean_accuracy"] = accuracy(
        build_from_spec(spec).to(device), x_test, y_test, bs, device
    )
    out["seconds"] = time.perf_counter() - start
    out["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return out


def analysis_task(item: dict[str, Any]) -> dict[str, Any]:
    """One analysis on one model: the ``compute`` of the registered analysis ``item["name"]``
    (:mod:`pipeline.analysis.base`; the built-ins: :func:`pipeline.analysis.compute.analyse_model`).
    ``item``: name, spec, inputs (a ref to the dict of tensors), cfg, num_threads."""
    from pipeline.analysis.base import get_analysis

    torch.set_num_threads(max(1, int(item["num_threads"])))
    start = time.perf_counter()
    model = build_from_spec(_get(item["spec"])).eval()
    out = get_analysis(item["name"]).compute(model, _get(item["inputs"]), item["cfg"])
    return {**out, "seconds": time.perf_counter() - start, "node_id": node_id()}


def fnc_tradeoff_task(item: dict[str, Any]) -> dict[str, Any]:
    """One cell of FNC's trade-off curve (:mod:`pipeline.analysis.fnc_tradeoff`): the baseline
    with feature norm clipping inserted at ``alpha`` (Yu et al., ICCV 2021, Eq. 4), adjusted
    (:func:`pipeline.defenses.adjust.adjust_after_insertion`, the code path of
    :func:`defend_task`), then its predictions clean and under every patch at fixed placements
    (:func:`predict_shard`, the code path of :func:`evaluate_task`).

    ``item``: spec (the baseline's checkpoint dict, or a ref), alpha (> 0; None: the baseline
    itself, no insertion and no adjustment), eps, adjustment, adjust_batches, finetune_epochs,
    finetune_lr, adjust_batch_size, seed (draws the adjustment's training images and their
    augmentation), horizontal_flip (the dataset's training flips), train (ref
    to the uint8 (N, 3, H, W) training images and int64 (N,) labels; unread for ``none``), x
    (ref to the uint8 (n, 3, H, W) test images), placements (``P * n``), patches (ref to
    attack -> float (S, 3, s, s) in [0, 1]), batch_size (images per forward pass), num_threads.

    Returns:
        ``{"preds": {"none": int64 (n,), <attack>: int64 (S, P, n)}, "seconds", "node_id"}``
        and what the adjustment reported (``adjust_images`` / ``finetune_loss``).

    Raises:
        ValueError: alpha <= 0, an unknown adjustment, or a model FNC does not fit.
    """
    torch.set_num_threads(max(1, int(item["num_threads"])))
    start = time.perf_counter()
    spec = _get(item["spec"])
    out: dict[str, Any] = {"node_id": node_id()}
    if item["alpha"] is not None:
        device = default_device()
        fnc = {"name": "fnc", "alpha": float(item["alpha"]), "eps": float(item["eps"]),
               "block_types": item.get("block_types")}  # null: FNC's own rule (pipeline.models.find_blocks)
        model = apply_defenses(build_from_spec(spec), [fnc]).to(device).eval()
        x_train, y_train = _get(item["train"]) if item["adjustment"] != "none" else (None, None)
        out.update(adjust_after_insertion(
            model, item["adjustment"], x_train, y_train, batch_size=item["adjust_batch_size"], seed=item["seed"],
            adjust_batches=item["adjust_batches"], finetune_epochs=item["finetune_epochs"],
            finetune_lr=item["finetune_lr"], horizontal_flip=item["horizontal_flip"], device=device))
        spec = {**spec, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "defenses": [*spec.get("defenses", []), fnc]}
    out["preds"] = predict_shard(spec, _get(item["x"]), item["placements"], _get(item["patches"]),
                                 item["batch_size"], int(item["num_threads"]))
    out["seconds"] = time.perf_counter() - start
    return out
