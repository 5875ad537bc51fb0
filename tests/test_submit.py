"""``python -m pipeline.submit``'s round trip of the results through the job's log (no Ray):
what the job packs comes back into the project, and nothing else can."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest

from pipeline.submit import BEGIN, END, SubmitError, entrypoint, pack, unpack


def _project(root: Path, accuracy: float) -> None:
    (root / "metrics").mkdir(parents=True)
    (root / "plots").mkdir()
    (root / "dvc.lock").write_text(f"schema: '2.0'\nstages: {{evaluate: {{cmd: x, accuracy: {accuracy}}}}}\n")
    (root / "metrics" / "evaluate.json").write_text(json.dumps({"accuracy": accuracy}))
    (root / "plots" / "evaluate.csv").write_text("a,b\n1,2\n")


def test_the_job_s_results_replace_those_here(tmp_path):
    job, here = tmp_path / "job", tmp_path / "here"
    _project(job, 0.9)
    _project(here, 0.1)
    (here / "metrics" / "stale.json").write_text("{}")  # not in the job's copy: gone with the old metrics/
    (here / "params.yaml").write_text("seed: 0\n")  # not a result: untouched
    out = io.StringIO()
    pack(job, out)
    log = "epoch 1\n" + out.getvalue() + "done\n"
    written = unpack(log, here)
    assert written == ["dvc.lock", "metrics/evaluate.json", "plots/evaluate.csv"]
    assert json.loads((here / "metrics" / "evaluate.json").read_text()) == {"accuracy": 0.9}
    assert "accuracy: 0.9" in (here / "dvc.lock").read_text()
    assert not (here / "metrics" / "stale.json").exists()
    assert (here / "params.yaml").read_text() == "seed: 0\n"


def _log_with(members: dict[str, bytes]) -> str:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "\n".join([BEGIN, base64.b64encode(buffer.getvalue()).decode(), END]) + "\n"


@pytest.mark.parametrize("name", ["pipeline/cli.py", "../outside", "metrics/../../outside", "/etc/x"])
def test_only_the_results_come_back(tmp_path, name):
    log = _log_with({"metrics/ok.json": b"{}", name: b"print('ran')"})
    with pytest.raises(SubmitError, match="is not a file of dvc.lock, metrics, plots; nothing was written"):
        unpack(log, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_log_without_results_is_one_line(tmp_path):
    with pytest.raises(SubmitError, match=r"^the job's log ends without its results \(it stopped before packing"):
        unpack("Traceback ...\nKilled\n", tmp_path)


def test_the_job_pushes_only_after_a_successful_command_and_always_packs():
    line = entrypoint("dvc repro", "shared")
    assert line.startswith("bash -c ")
    script = line[len("bash -c '"):-1]
    assert script == ("dvc repro; rc=$?; if [ $rc -eq 0 ]; then dvc push -r shared || rc=$?; fi; "
                      "python -m pipeline.submit --pack; exit $rc")
    assert "push" not in entrypoint("dvc repro", None)


class _FakeJobs:
    """A job API that replays a log in pieces: the job runs for ``len(pieces)`` polls."""

    def __init__(self, pieces: list[str], status: str):
        self.pieces, self.final, self.polls = pieces, status, 0
        self.submitted: dict = {}

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return "raysubmit_1"

    def get_job_status(self, job):
        self.polls += 1
        return "RUNNING" if self.polls < len(self.pieces) else self.final

    def get_job_logs(self, job):
        return "".join(self.pieces[:self.polls])


@pytest.mark.parametrize("status", ["SUCCEEDED", "FAILED"])
def test_submit_streams_the_log_and_brings_the_results_back(tmp_path, monkeypatch, status):
    import pipeline.submit as submit_module

    job, here = tmp_path / "job", tmp_path / "here"
    _project(job, 0.9)
    here.mkdir()
    (here / "dvc.yaml").write_text("stages: {}\n")
    (here / ".git").mkdir()
    packed = io.StringIO()
    pack(job, packed)
    pieces = ["Running stage 'evaluate':\n", "cells:  50%|#####     | 1/2\r", "cells: 100%|##########| 2/2\n",
              packed.getvalue()[:100], packed.getvalue()[100:] + "the end"]
    fake = _FakeJobs(pieces, status)
    monkeypatch.setattr(submit_module, "_client", lambda address: fake)
    monkeypatch.setattr(submit_module, "POLL_S", 0.0)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    out = io.StringIO()
    if status == "SUCCEEDED":
        assert submit_module.submit("http://127.0.0.1:8265", "dvc repro", None, here, out) == "raysubmit_1"
    else:
        with pytest.raises(SubmitError, match="^job raysubmit_1 failed: read its log above"):
            submit_module.submit("http://127.0.0.1:8265", "dvc repro", None, here, out)
    assert out.getvalue() == ("Running stage 'evaluate':\ncells:  50%|#####     | 1/2\rcells: 100%|##########| 2/2\n"
                              "the end\n")  # the log as the job wrote it, without the packed results
    assert json.loads((here / "metrics" / "evaluate.json").read_text()) == {"accuracy": 0.9}  # also after a failure
    env = fake.submitted["runtime_env"]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert env["excludes"] == [".venv", "mlflow*.db", "mlruns"] and env["working_dir"] == str(here)
