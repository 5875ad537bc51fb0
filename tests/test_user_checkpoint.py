"""train_baseline adopts a user's own checkpoint for a registered architecture instead of training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
