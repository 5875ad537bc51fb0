"""One analysis on one model: the unit of work of ``analyze@<name>`` (one Ray task per model).

:func:`analyse_model` dispatches on the analysis name and returns plain tensors and
lists (picklable, on the CPU); the stage combines the models' results into tables and
figures. Inputs are uint8 images as prepared (converted to float in [0, 1] here).

* ``feature_norms`` (Yu et al., ICCV 2021, Section 3): the IFNR of every block between
  the clean and the patched images (:func:`pipeline.analysis.feature_norms.ifnr_table`).
* ``pixel_robustness`` (Hwang et al. 2019, Section 2): the mean absolute input-gradient
  map on training images, and accuracy after masked PGD on the top / bottom ``k`` of it.
* ``loss_landscape`` (Madry et al., ICLR 2018, Section 3 and Figure 1): cross-entropy
  along PGD for many random restarts.
* ``gradcam_distance`` (Yu 2022, seed 002): confidence with a noise block at a distance
  from the Grad-CAM centre.
* ``spectrum`` (Raju and Lipasti 2019): high-frequency energy of the inputs and first-layer
  maps, natural versus RP2-perturbed stop signs.
* ``masking`` (Carlini et al. 2019, Section 5; Athalye et al. 2018, Section 3): the
  gradient-masking checks (:mod:`pipeline.analysis.masking`). Check (a) transfers PGD
  examples from the undefended baseline: the stage puts the baseline's checkpoint dict in
  ``inputs["baseline"]`` (one copy in the object store for all models) and names each
  model in ``cfg["defense"]``; for ``"none"`` (the baseline itself) or without
  ``inputs["baseline"]``, (a) is n/a.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.attacks.patch import apply_patch
from pipeline.attacks.pgd import ThreatModel


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def analyse_model(name: str, model: torch.nn.Module, inputs: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Run analysis ``name`` on ``model`` (eval mode, images in [0, 1] -> logits).

    Args:
        name: a built-in analysis (:mod:`pipeline.analysis.outputs` registers them).
        model: the (defended) network.
        inputs: what the analysis reads: ``x`` uint8 (N, 3, H, W) and ``y`` int64 (N,) test
            images; ``patch`` float (3, s, s) in [0, 1] and ``placements`` (feature_norms);
            ``x_fit``, ``y_fit`` training images (pixel_robustness); ``victims`` uint8
            (40, 3, H, W) and ``adversarial`` float (40, 3, H, W) in [0, 1] (spectrum);
            ``baseline``, the undefended model's checkpoint dict (masking).
        cfg: the ``analysis`` params section as a dict (masking: plus ``defense``, the
            model's name in ``analysis.defenses``).

    Returns:
        A dict of CPU tensors / lists / DataFrames, by analysis (see the module docstring).

    Raises:
        ValueError: an unknown analysis name.
    """
    model.eval()
    x = _float(inputs["x"]) if "x" in inputs else None
    y = inputs.get("y")
    threat = ThreatModel("linf", cfg["eps"], cfg["step_size"], cfg["steps"], True, 1)
    if name == "feature_norms":
        from pipeline.analysis.feature_norms import ifnr_table

        patched = apply_patch(x, inputs["patch"], inputs["placements"])
        with torch.no_grad():
            table = ifnr_table(model, x, patched, cfg["batch_size"], cfg.get("block_types"))
        return {"table": table, "clean": x[:1], "patched": patched[:1]}
    if name == "pixel_robustness":
        from pipeline.attacks.masked_pgd import accuracy_vs_k, pixel_robustness_map

        rmap = pixel_robustness_map(model, _float(inputs["x_fit"]), inputs["y_fit"], cfg["batch_size"])
        rows = []
        for which in ("top", "bottom"):
            rows += accuracy_vs_k(model, x, y, rmap, cfg["ks"], threat, which, batch_size=cfg["batch_size"],
                                  generator=torch.Generator().manual_seed(0))
        from pipeline.defenses.prm import prm_iou

        iou = prm_iou(model, _float(inputs["x_fit"]), inputs["y_fit"], cfg["batch_size"])  # None without PRM
        return {"map": rmap.cpu(), "curve": rows, "prm_iou": iou}
    if name == "loss_landscape":
        from pipeline.analysis.landscape import pgd_loss_landscape

        n = cfg["landscape_images"]
        t = ThreatModel("linf", cfg["eps"], cfg["step_size"], cfg["landscape_steps"], True, cfg["restarts"])
        return pgd_loss_landscape(model, x[:n], y[:n], t, seed=0)
    if name == "gradcam_distance":
        from pipeline.analysis.landscape import gradcam_distance_curve

        return gradcam_distance_curve(model, x[: cfg["gradcam_images"]], cfg["distances"], cfg["block"],
                                      cfg["angles"], seed=0)
    if name == "spectrum":
        from pipeline.analysis.spectrum import first_layer_maps, high_frequency_fraction

        clean, adv = _float(inputs["victims"]), inputs["adversarial"]
        with torch.no_grad():
            maps = {k: first_layer_maps(model, v) for k, v in (("natural", clean), ("perturbed", adv))}
        return {"rows": [{"where": where, "images": k, "high_frequency_fraction": high_frequency_fraction(v)}
                         for where, pair in (("input", {"natural": clean, "perturbed": adv}), ("layer 1", maps))
                         for k, v in pair.items()]}
    if name == "masking":
        from pipeline.analysis.masking import MaskingParams, masking_analysis
        from pipeline.checkpoint import build_from_spec

        params = MaskingParams.model_validate(cfg["masking"])
        spec = inputs.get("baseline")
        baseline = None if spec is None or cfg.get("defense") == "none" else build_from_spec(spec)
        n = params.images
        return masking_analysis(model, x[:n], y[:n], params, baseline, cfg["batch_size"], seed=0)
    raise ValueError(f"unknown analysis {name!r}")


__all__ = ["analyse_model"]
