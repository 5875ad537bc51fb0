"""The MLflow store is checked before a stage computes; a store that fails later costs no
work: the stage finishes, what it could not log is recorded and replayed by ``sync``."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException

from pipeline import tracking
from pipeline.cli import run_stage
from pipeline.tracking import (
    TrackingStoreError,
    check_tracking_store,
    log_artifact,
    log_artifacts,
    log_dict,
    log_metrics,
    set_tags,
    stage_run,
    sync,
)

ROOT = Path(__file__).resolve().parents[1]
DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with its own SQLite store, and MLflow's HTTP limits restored after the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for key in tracking.HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    yield tmp_path
    for key in tracking.HTTP_LIMITS:  # set by the code under test, not by monkeypatch
        os.environ.pop(key, None)


def pending(folder: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((folder / ".mlflow-pending").glob("*.json"))]


def test_a_dead_server_is_found_in_seconds(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    start = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        check_tracking_store()
    assert time.monotonic() - start < 10
    message = str(exc.value)
    assert "MLFLOW_TRACKING_URI" in message and DEAD in message and "unset MLFLOW_TRACKING_URI" in message
    assert "\n" not in message
    # MLflow's own client is held to one retry and a short timeout
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "15"


def test_the_user_s_http_limits_are_kept(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    check_tracking_store()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"


def test_a_hung_server_is_given_up_on_within_the_timeout(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    waits = []

    def hang(url, timeout):
        waits.append(timeout)
        raise requests.ConnectTimeout("timed out")

    monkeypatch.setattr(requests, "get", hang)
    with pytest.raises(TrackingStoreError, match="no answer within 1 s"):
        check_tracking_store(timeout_s=2)
    assert waits == [1, 1]  # one retry, the two together within timeout_s


def test_a_reachable_server_and_writable_stores_pass(workdir, monkeypatch):
    class Answer:
        status_code = 200

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setattr(requests, "get", lambda url, timeout: Answer())
    check_tracking_store()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    check_tracking_store()
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    check_tracking_store()  # the default: mlflow.db in the working folder


def test_a_sqlite_store_in_a_missing_folder_is_refused(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'nowhere' / 'mlflow.db'}")
    with pytest.raises(TrackingStoreError, match=r"MLFLOW_TRACKING_URI=sqlite:.*nowhere does not exist"):
        check_tracking_store()


def test_the_stage_stops_before_main_on_a_dead_server(workdir, monkeypatch, capsys):
    (workdir / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    called = []
    with pytest.raises(SystemExit) as exc:
        run_stage("prepare", lambda params: called.append(params))
    assert exc.value.code == 2 and not called
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: prepare: MLFLOW_TRACKING_URI=") and "\n" not in err


def test_a_store_that_fails_midway_costs_no_work(workdir, monkeypatch):
    (workdir / "table.md").write_text("| a |\n")

    def fail(*args, **kwargs):
        raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed")

    with stage_run("evaluate", "midway", {"fnc": {"alpha": 1.1}}, {"profile": "smoke"}) as run:
        log_metrics({"before": 1.0})
        monkeypatch.setattr(mlflow, "log_metrics", fail)
        monkeypatch.setattr(mlflow, "log_artifact", fail)
        log_metrics({"none": {"advp": {"robust_accuracy": 0.25}}}, step=3)
        log_artifact(workdir / "table.md", artifact_path="evaluate")
        (workdir / "output.json").write_text("{}")  # the body runs to its end
    assert (workdir / "output.json").is_file()
    (record,) = pending(workdir)
    assert record["run_id"] == run.info.run_id and record["stage"] == "evaluate" and record["status"] == "FINISHED"
    assert [m["values"] for m in record["metrics"]] == [{"none.advp.robust_accuracy": 0.25}]
    assert record["metrics"][0]["step"] == 3
    (artifact,) = record["artifacts"]
    assert artifact["source"] == str(workdir / "table.md") and artifact["artifact_path"] == "evaluate"
    kept = Path(artifact["path"])  # a snapshot beside the record: the output may be replaced before sync
    assert kept.is_relative_to(workdir / ".mlflow-pending") and kept.read_text() == "| a |\n"
    assert record["params"]["fnc.alpha"] == "1.1" and record["tags"]["profile"] == "smoke"
    assert mlflow.active_run() is None


def test_a_dead_store_at_the_start_records_everything(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with stage_run("prepare", "offline", {"seed": 0}, {"dataset": "cifar10"}) as run:
        log_metrics({"n_train": 40})
        set_tags({"node_id": "abc"})
        log_dict({"classes": ["a"]}, "meta.json")
    assert run.info.run_id is None
    (record,) = pending(workdir)
    assert record["run_id"] is None and record["params"] == {"seed": "0"}
    assert record["tags"]["dataset"] == "cifar10" and record["tags"]["node_id"] == "abc"
    assert record["metrics"][0]["values"] == {"n_train": 40.0}
    assert record["dicts"] == [{"data": {"classes": ["a"]}, "artifact_file": "meta.json"}]


def test_a_failing_body_still_writes_its_record_and_the_error_goes_on(workdir, monkeypatch):
    monkeypatch.setattr(mlflow, "log_metrics", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("reset")))
    with pytest.raises(RuntimeError, match="boom"), stage_run("report", "failing", {}):
        log_metrics({"x": 1.0})
        raise RuntimeError("boom")
    (record,) = pending(workdir)
    assert record["status"] == "FAILED" and record["metrics"][0]["values"] == {"x": 1.0}


def test_sync_replays_pending_records_into_a_sqlite_store(workdir, monkeypatch):
    (workdir / "table.md").write_text("| a |\n")
    (workdir / "figures").mkdir()
    (workdir / "figures" / "a.png").write_bytes(b"png")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with stage_run("train_defended@fnc", "replayed", {"train": {"epochs": 2}}, {"defense": "fnc"}):
        for step, loss in enumerate([2.0, 1.5]):
            log_metrics({"train_loss": loss}, step=step)
        log_metrics({"clean_accuracy": 0.8})
        log_artifact(workdir / "table.md", artifact_path="plots")
        log_artifacts(workdir / "figures", artifact_path="figures")
    assert len(pending(workdir)) == 1
    (workdir / "table.md").unlink()  # gone or replaced before sync: the snapshot is replayed
    shutil.rmtree(workdir / "figures")

    store = f"sqlite:///{workdir / 'replayed.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert sync(workdir / ".mlflow-pending") == 0
    assert list((workdir / ".mlflow-pending").iterdir()) == []  # each replayed record is removed, snapshots too
    client = mlflow.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("replayed").experiment_id])
    assert run.info.run_name == "train_defended@fnc" and run.info.status == "FINISHED"
    assert run.data.metrics["clean_accuracy"] == 0.8 and run.data.params["train.epochs"] == "2"
    assert run.data.tags["defense"] == "fnc"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] == [(0, 2.0), (1, 1.5)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/table.md"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/a.png"]


def test_sync_from_the_command_line(workdir, monkeypatch):
    import subprocess

    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with stage_run("report", "cli", {"profile": "smoke"}):
        log_metrics({"cells": 4})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": DEAD}
    cmd = [sys.executable, "-m", "pipeline.tracking", "sync"]
    dead = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert dead.returncode != 0 and "MLFLOW_TRACKING_URI" in dead.stderr and len(pending(workdir)) == 1
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'back.db'}"
    back = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert back.returncode == 0, back.stderr[-2000:]
    assert pending(workdir) == []
    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.data.metrics["cells"] == 4


def test_reruns_are_named_by_what_changed_and_start_with_the_process(workdir, monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setattr(tracking, "PROCESS_START_MS", int(time.time() * 1000) - 60_000)  # a minute of compute
    with stage_run("train_defended@fnc", "names", {"fnc": {"alpha": 1.0, "eps": 1e-6}}) as first:
        pass
    with stage_run("train_defended@fnc", "names", {"fnc": {"alpha": 1.2, "eps": 1e-6}}) as second:
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-tank")
    with stage_run("train_defended@fnc", "names", {"fnc": {"alpha": 1.2, "eps": 1e-6}}) as third:
        pass
    client = mlflow.MlflowClient()
    runs = [client.get_run(r.info.run_id) for r in (first, second, third)]
    assert [r.info.run_name for r in runs] == ["train_defended@fnc", "train_defended@fnc fnc.alpha=1.2",
                                               "train_defended@fnc [bushy-tank]"]
    assert runs[2].data.tags["dvc_experiment"] == "bushy-tank" and runs[0].data.tags["dvc_experiment"] == "workspace"
    assert runs[0].data.tags["params_hash"] != runs[1].data.tags["params_hash"]
    assert runs[1].data.tags["params_hash"] == runs[2].data.tags["params_hash"]
    assert runs[0].data.tags["git_dirty"] in ("true", "false")
    assert all(r.info.end_time - r.info.start_time >= 60_000 for r in runs)  # the run spans the stage, not the logging


CELLS = [{"name": f"{d} / advp", "params": {"defense": d, "attack": "advp", "attack_kind": "patch transferred"},
          "tags": {"defense": d, "attack": "advp"}, "metrics": {"robust_accuracy": r, "n_images": 900, "ssim": float("nan")}}
         for d, r in (("none", 0.3), ("fnc", 0.5))]


def _children(client: mlflow.MlflowClient, parent_id: str) -> dict[str, mlflow.entities.Run]:
    exp = client.get_run(parent_id).info.experiment_id
    return {r.data.params["defense"]: r for r in client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and params.attack = 'advp'")}


def test_one_nested_run_per_cell_filterable_by_attack(workdir):
    with stage_run("evaluate", "cells", {"seed": 0}) as run:
        tracking.log_child_runs(CELLS)
    client = mlflow.MlflowClient()
    kids = _children(client, run.info.run_id)
    assert set(kids) == {"none", "fnc"}
    assert kids["fnc"].data.metrics == {"robust_accuracy": 0.5, "n_images": 900.0}  # NaN dropped
    assert kids["none"].info.run_name == "none / advp" and kids["none"].info.status == "FINISHED"
    assert kids["fnc"].data.params["attack_kind"] == "patch transferred"


def test_nested_runs_are_recorded_and_replayed_with_their_parent(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with stage_run("evaluate", "cells-offline", {"seed": 0}):
        tracking.log_child_runs(CELLS)
    (record,) = pending(workdir)
    assert [c["name"] for c in record["children"]] == ["none / advp", "fnc / advp"]
    store = f"sqlite:///{workdir / 'replayed.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert sync(workdir / ".mlflow-pending") == 0
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("cells-offline").experiment_id
    (parent,) = client.search_runs([exp], filter_string="tags.stage = 'evaluate'")
    assert _children(client, parent.info.run_id)["none"].data.metrics["robust_accuracy"] == 0.3


def test_datasets_are_logged_as_run_inputs_and_replayed(workdir, monkeypatch):
    (workdir / "prepared").mkdir()
    with stage_run("prepare", "inputs", {"seed": 0}) as run:
        tracking.log_dataset("cifar10 test", workdir / "prepared", "d" * 64, "test", {"n_images": 1000})
    (inp,) = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "cifar10 test" and inp.dataset.digest == "d" * 36
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "test", "n_images": "1000"}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with stage_run("prepare", "inputs-offline", {"seed": 0}):
        tracking.log_dataset("cifar10 val", workdir / "prepared", "e" * 64, "validation")
    store = f"sqlite:///{workdir / 'replayed.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert sync(workdir / ".mlflow-pending") == 0
    client = mlflow.MlflowClient(tracking_uri=store)
    (replayed,) = client.search_runs([client.get_experiment_by_name("inputs-offline").experiment_id])
    assert [i.dataset.name for i in replayed.inputs.dataset_inputs] == ["cifar10 val"]


def test_a_checkpoint_is_logged_as_a_loadable_mlflow_model_with_its_signature(workdir):
    import torch

    from pipeline.checkpoint import build_from_spec, model_spec, save_checkpoint

    spec = model_spec("resnet20", 10, [0.5] * 3, [0.25] * 3, None)
    spec["state_dict"] = build_from_spec(spec).state_dict()
    save_checkpoint(spec, workdir / "baseline.pt")
    with stage_run("train_baseline", "models", {"seed": 0}) as run:
        tracking.log_model(workdir / "baseline.pt", (3, 32, 32))
    uri = mlflow.MlflowClient().get_run(run.info.run_id).data.tags["model_uri.model"]
    loaded = mlflow.pytorch.load_model(uri)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x), build_from_spec(spec).eval()(x), atol=1e-6)
    info = mlflow.models.get_model_info(uri)
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 10]


def test_a_stage_that_fails_before_logging_leaves_a_failed_run(workdir, monkeypatch):
    (workdir / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setattr(tracking, "STAGE_RUNS_OPENED", 0)

    def crash(params):
        raise RuntimeError("out of memory in the attack")

    with pytest.raises(RuntimeError):
        run_stage("evaluate", crash)
    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())  # not the global URI an earlier test set
    experiment = client.get_experiment_by_name("fnc-cifar10")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED" and run.info.run_name == "evaluate"
    assert run.data.tags["error"] == "RuntimeError: out of memory in the attack" and run.data.tags["stage"] == "evaluate"

    def crash_inside(params):  # a stage that had opened its run: that run ends FAILED, no second one
        with stage_run("report", "fnc-cifar10", {}):
            raise ValueError("bad table")

    with pytest.raises(ValueError):
        run_stage("report", crash_inside)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'report'")
    assert [r.info.status for r in runs] == ["FAILED"]
