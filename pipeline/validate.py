"""Check a params file before anything runs: the DVC stage ``validate`` and a command.

DVC deletes a stage's outputs just before it runs the stage's command, so a bad
value that only the command rejects would cost the finished outputs of that stage
(hours of training, for ``train_baseline``). The first stage of ``dvc.yaml``,
``validate``, depends on every key of ``params.yaml`` and every other stage depends
on its stamp file: a bad value stops ``dvc repro`` at ``validate``, before DVC
touches any other stage's outputs. The stamp's content never depends on the param
values, so a valid change reruns only the stages that read the changed keys. The
sections a profile may leave out (:data:`OPTIONAL_SECTIONS`) are written as validated to
``validate/<section>.json`` for the stages that read them (DVC cannot list a missing key).

Checked, with the schema every stage uses (:func:`pipeline.config.load_params`):
unknown keys at every level, types and ranges, every ``defended`` name has its
section, known models, attacks and defenses, and on disk: ``data.root`` holds an
accepted layout (or may be downloaded), ``model.checkpoint`` exists, and the RP2
victims and mask exist when ``rp2.enabled``; the command also checks that the MLflow
tracking store answers (:func:`pipeline.tracking.check_tracking_store`).

Usage (also before submitting a profile to a cluster)::

    python -m pipeline.validate params/fnc-cifar10.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import Params, ParamsError, load_params

STAMP = Path("validate/params.ok")
"""The ``validate`` stage's output; every other stage of ``dvc.yaml`` depends on it."""

STAMP_TEXT = "params.yaml passed python -m pipeline.validate\n"
"""The stamp's content: the same for every valid params file, so that downstream
stages rerun only for the keys they read."""

OPTIONAL_SECTIONS = ("fnc_tradeoff",)
"""Top-level sections a profile may leave out (their defaults apply). DVC stops a stage
whose ``params:`` names a key the params file lacks ("Parameters ... are missing"), so a
stage that reads one of these depends instead on ``<dir>/<section>.json``, which the
``validate`` stage writes (``--sections``): the section as validated, defaults filled in.
Its bytes change only when the section's values do, so the stage reruns exactly then."""


def check_paths(params: Params) -> None:
    """Check what the params point at on disk, without reading any image.

    Raises:
        ParamsError: ``data.root`` holds no accepted layout and cannot be
            downloaded, or the RP2 victims folder or sticker mask is missing
            while ``rp2.enabled``; one line naming the key and the fix.
    """
    from pipeline.data.prepare import check_source
    from pipeline.data.sources import DatasetError

    try:
        check_source(params.data)
    except DatasetError as exc:
        raise ParamsError(str(exc)) from None
    if params.rp2.enabled:
        victims = Path(params.rp2.victims).expanduser()
        if not (victims / "victim-32").is_dir():
            raise ParamsError(f"rp2.victims: {victims} has no victim-32/ folder; point it at RP2's stop signs "
                              "(README, Data) or set rp2.enabled: false")
        mask = Path(params.rp2.mask).expanduser()
        mask = mask if mask.is_absolute() else victims / mask
        if not mask.is_file():
            raise ParamsError(f"rp2.mask: {mask} does not exist; name a PNG under {victims} or an absolute path")


def validate(path: str | Path = "params.yaml") -> Params:
    """Validate the params file at ``path`` and the paths it names.

    Returns:
        The validated :class:`pipeline.config.Params`.

    Raises:
        ParamsError: one line naming the file or key, what is wrong, and the fix.
    """
    params = load_params(path)
    check_paths(params)
    return params


def write_sections(params: Params, folder: str | Path) -> list[Path]:
    """Write every section of :data:`OPTIONAL_SECTIONS` as validated (defaults filled in) to
    ``folder/<section>.json`` (atomically; keys in the schema's order, so equal values give equal bytes).

    Returns:
        The files written.
    """
    from pipeline.io import save_json

    dumped = params.model_dump(mode="json")
    return [save_json(dumped[name], Path(folder) / f"{name}.json") for name in OPTIONAL_SECTIONS]


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.validate [PARAMS] [--stamp FILE] [--sections DIR]``: exit 0 when
    valid (writing the stamp and :func:`write_sections`' files where asked), 2 with one line when not."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.validate", description=__doc__.splitlines()[0])
    parser.add_argument("params", nargs="?", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--stamp", type=Path, default=None,
                        help=f"write this file when valid (the DVC stage writes {STAMP})")
    parser.add_argument("--sections", type=Path, default=None,
                        help=f"write the optional sections ({', '.join(OPTIONAL_SECTIONS)}) as validated to "
                             "DIR/<section>.json when valid (the DVC stage writes them to validate/)")
    args = parser.parse_args(argv)
    from pipeline.tracking import TrackingStoreError, check_tracking_store

    try:
        params = validate(args.params)
        check_tracking_store()  # a dead MLflow server stops dvc repro here too, before any output is deleted
    except (ParamsError, TrackingStoreError) as exc:
        print(f"error: validate: {exc}", file=sys.stderr)
        return 2
    if args.sections is not None:
        write_sections(params, args.sections)
    if args.stamp is not None:
        args.stamp.parent.mkdir(parents=True, exist_ok=True)
        args.stamp.write_text(STAMP_TEXT)
    print(f"{args.params}: valid (profile {params.profile}, defended {', '.join(params.defended)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
