"""Stage runs logged to a real ``mlflow server`` on 127.0.0.1 through ``MLFLOW_TRACKING_URI``
(params, tags, per-step metrics, an artifact through the server's artifact proxy), read
back with the client API."""

from __future__ import annotations

import mlflow

from pipeline.tracking import log_metrics, stage_run


def test_stage_run_through_a_real_server(mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "table.md").write_text("| a |\n| - |\n| 1 |\n")
    with stage_run("evaluate", "server-test", {"fnc": {"alpha": 1.1}},
                   {"profile": "smoke", "paper": "FNC", "model": "resnet20"}) as run:
        log_metrics({"none": {"advp": {"robust_accuracy": 0.25}}})
        for step, loss in enumerate([2.0, 1.5]):
            log_metrics({"train_loss": loss}, step=step)
        mlflow.log_artifact(str(tmp_path / "table.md"), artifact_path="evaluate")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    got = client.get_run(run.info.run_id)
    assert got.data.params["fnc.alpha"] == "1.1"
    assert got.data.tags["stage"] == "evaluate" and got.data.tags["paper"] == "FNC"
    assert got.data.metrics["none.advp.robust_accuracy"] == 0.25
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [2.0, 1.5]
    local = client.download_artifacts(run.info.run_id, "evaluate/table.md", str(tmp_path / "back"))
    assert open(local).read().startswith("| a |")
