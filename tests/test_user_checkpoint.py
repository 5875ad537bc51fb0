"""train_baseline adopts a user's own checkpoint for a registered architecture instead of training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.checkpoint import load_checkpoint
from pipeline.config import DataConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.models import build_model
from tests.test_data import make_zip

ROOT = Path(__file__).resolve().parents[1]


def test_train_baseline_adopts_user_weights(tmp_path):
    src = make_zip(tmp_path / "src")
    meta = prepare_dataset(DataConfig(root=str(src)), tmp_path / "data/prepared/cifar10", seed=0)
    torch.manual_seed(0)
    net = build_model("resnet20", 10, meta["mean"], meta["std"]).net  # a bare network's state dict
    torch.save(net.state_dict(), tmp_path / "mine.pt")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["root"] = str(src)
    params["model"]["checkpoint"] = str(tmp_path / "mine.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.run([sys.executable, "-m", "stages.train_baseline"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = load_checkpoint(tmp_path / "models/resnet20/baseline.pt")
    assert all(torch.equal(spec["state_dict"][f"net.{k}"], v) for k, v in net.state_dict().items())
    metrics = json.loads((tmp_path / "metrics/train_baseline.json").read_text())
    assert metrics["epochs"] == 0 and metrics["n_images"] == 20


class _RunsCode:
    """Unpickled without ``weights_only``, it creates ``path``: code hidden in a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _refused(message: str, path: Path) -> None:
    """The one-line message for a checkpoint holding objects: names the file, says it must be
    re-saved as a state_dict, and never suggests loading it with weights_only=False."""
    assert message.startswith(f"{path}: holds objects other than tensors") and "\n" not in message
    assert "re-save it as a state_dict" in message and "owner" in message
    assert "weights_only=False" not in message and "`False`" not in message


def test_a_checkpoint_holding_objects_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from pipeline.cli import run_stage
    from pipeline.io import RefusedFileError

    marker, path = tmp_path / "ran", tmp_path / "fnc.pt"
    torch.save({"arch": "resnet20", "state_dict": {"w": torch.zeros(1)}, "extra": _RunsCode(marker)}, path)
    with pytest.raises(RefusedFileError) as exc:
        load_checkpoint(path)
    _refused(str(exc.value), path)
    with pytest.raises(ValueError) as exc:  # the user's own weights (model.checkpoint)
        build_model("resnet20", 10, [0.5] * 3, [0.25] * 3, weights=path)
    _refused(str(exc.value), path)
    assert not marker.exists()

    # a stage that meets it stops with that line, not a traceback
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(SystemExit) as stop:
        run_stage("evaluate", lambda params: load_checkpoint(path))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: evaluate: {path}: holds objects other than tensors") and "\n" not in err
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    from pipeline.io import RefusedFileError

    path = tmp_path / "baseline.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(RefusedFileError) as exc:
        load_checkpoint(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: not a file torch.load(weights_only=True) can read") and "\n" not in message
    assert "weights_only=False" not in message
