"""The project's file layout: where every stage reads and writes, in one place.

Every path is relative to the project root (the folder holding ``dvc.yaml``), where DVC runs
the stages; ``dvc.yaml`` lists the same paths as the stages' outputs and dependencies. The
functions build paths only: they neither create folders nor check that a file exists.

    data/prepared/<dataset>/            prepare: the decoded splits and meta.json
    models/<model>/baseline.pt          train_baseline
    models/<model>/<defense>.pt         train_defended@<defense>
    patches/<model>/<attack>/seed_<s>.{pt,png}   generate_patches
    rp2/<model>/<defense>/target_<t>_seed_<s>.{pt,png}   attack_rp2
    analysis/<model>/<analysis>/        analyze@<analysis>
    .cache/<stage>/<key hash>/          what a killed or repeated run reuses (pipeline.cli.resume_dir)
"""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data/prepared")
"""The prepared datasets, one folder per ``data.dataset``."""
MODELS = Path("models")
"""The trained models, one folder per ``model.name``."""
PATCHES = Path("patches")
"""The baseline's universal patches, per model and attack."""
STICKERS = Path("rp2")
"""RP2's stickers, per model and defense."""
ANALYSIS = Path("analysis")
"""The analyses' outputs, per model and analysis."""
CACHE_ROOT = Path(".cache")
"""Resume caches, per stage and key hash (git- and DVC-ignored)."""


def prepared_dir(dataset: str) -> Path:
    """``data/prepared/<dataset>``: the folder :func:`pipeline.data.load_tensors` reads."""
    return PREPARED / dataset


def model_path(model: str, defense: str = "none") -> Path:
    """``models/<model>/baseline.pt`` for the defense ``none`` (the undefended baseline), else
    ``models/<model>/<defense>.pt`` (the model of ``train_defended@<defense>``)."""
    return MODELS / model / ("baseline.pt" if defense == "none" else f"{defense}.pt")


def patch_dir(model: str, attack: str) -> Path:
    """``patches/<model>/<attack>``: the patches of one universal patch attack, one file per seed."""
    return PATCHES / model / attack


def patch_path(model: str, attack: str, seed: int, suffix: str = ".pt") -> Path:
    """``patches/<model>/<attack>/seed_<seed><suffix>``: one patch (``.pt``: float (3, side,
    side) in [0, 1]; ``.png``: its picture)."""
    return patch_dir(model, attack) / f"seed_{seed}{suffix}"


def sticker_dir(model: str) -> Path:
    """``rp2/<model>``: RP2's stickers, figure and notes for one model."""
    return STICKERS / model


def analysis_dir(model: str, analysis: str) -> Path:
    """``analysis/<model>/<analysis>``: the outputs of ``analyze@<analysis>``."""
    return ANALYSIS / model / analysis


def rp2_mask_path(victims: str | Path, mask: str | Path) -> Path:
    """``rp2.mask`` as a path: absolute as given, else relative to ``rp2.victims``."""
    return Path(mask) if Path(mask).is_absolute() else Path(victims) / mask
