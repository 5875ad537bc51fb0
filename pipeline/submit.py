"""Run ``dvc repro`` as a Ray job on a cluster's head and bring its results back here.

``ray job submit`` runs the driver in a copy of the project that Ray uploads to the
head node; the outputs and ``dvc.lock`` are written in that copy and vanish with the
Ray session (README, Cluster). This command does what the README spells out by hand::

    python -m pipeline.submit --address http://<head>:8265 [--remote <dvc remote>] [-- <command>]

* uploads the project with ``.git`` and the DVC outputs already computed (Ray's
  default excludes and ``.gitignore`` switched off; ``.venv``, ``mlflow*.db`` and
  ``mlruns`` left out, :data:`pipeline.local_cluster.JOB_EXCLUDES`), and passes
  ``MLFLOW_TRACKING_URI`` of this shell to the job (the job sees none of this shell's
  variables);
* runs ``dvc repro`` (or ``<command>``) there, streaming its log here;
* when the job ends, successful or not, copies ``dvc.lock``, ``metrics/`` and ``plots/``
  of the job's copy back into this project (the job prints them, packed, at the end
  of its log: no storage shared with the head is needed); with ``--remote``, the job
  also ``dvc push``-es the cached outputs (prepared data, models, patches) to that DVC
  remote and this command ``dvc pull``-s them here.

The job's cluster token: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` of this shell,
or, for a ``python -m pipeline.local_cluster`` cluster, the token it registered for
its dashboard port. Ctrl-C or SIGTERM stops the job.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.local_cluster import JOB_EXCLUDES, use_registered_token

__all__ = ["RESULTS", "SubmitError", "main", "pack", "unpack"]

RESULTS = ("dvc.lock", "metrics", "plots")
"""What comes back from the job's copy of the project (relative to its root)."""

BEGIN, END = "----- pipeline.submit results (base64 tar.gz) -----", "----- end of pipeline.submit results -----"
"""The lines around the packed results at the end of the job's log."""

POLL_S = 2.0
"""Seconds between two reads of the job's status and log."""


class SubmitError(RuntimeError):
    """The job cannot be submitted, failed, or its results cannot be read back (one line)."""


def pack(root: Path = Path("."), out: Any = None) -> None:
    """Print :data:`RESULTS` of ``root`` (those that exist) as a base64 tar.gz between
    :data:`BEGIN` and :data:`END` (what the job runs last: ``python -m pipeline.submit --pack``).

    Args:
        root: the project's root.
        out: where to write (default ``sys.stdout``).
    """
    out = out or sys.stdout
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in RESULTS:
            if (root / name).exists():
                tar.add(root / name, arcname=name)
    text = base64.b64encode(buffer.getvalue()).decode()
    lines = [text[i:i + 76] for i in range(0, len(text), 76)]
    out.write("\n".join([BEGIN, *lines, END]) + "\n")
    out.flush()


def unpack(log: str, root: Path) -> list[str]:
    """Extract the results packed in ``log`` (by :func:`pack`) into ``root``, replacing
    ``dvc.lock``, ``metrics/`` and ``plots/`` there.

    Args:
        log: the job's whole log.
        root: the project's root here.

    Returns:
        The names of the files written (relative to ``root``).

    Raises:
        SubmitError: the log holds no packed results (the job died before it packed them)
            or they are damaged, or a member lies outside :data:`RESULTS` or is not a
            plain file or folder.
    """
    lines = log.splitlines()
    try:
        last_end = len(lines) - 1 - lines[::-1].index(END)
        start = max(i for i, line in enumerate(lines[:last_end]) if line == BEGIN)
    except ValueError:
        raise SubmitError("the job's log ends without its results (it stopped before packing them); read the log "
                          "above, fix the cause and submit again") from None
    try:
        data = base64.b64decode("".join(lines[start + 1:last_end]), validate=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if not parts or parts[0] not in RESULTS or ".." in parts or Path(m.name).is_absolute() or \
                        not (m.isfile() or m.isdir()):
                    raise SubmitError(f"the job's results hold {m.name!r}, which is not a file of {', '.join(RESULTS)}; "
                                      "nothing was written")
            for name in RESULTS:  # what the job has replaces what is here
                target = root / name
                if target.is_dir() and any(Path(m.name).parts[0] == name for m in members):
                    import shutil

                    shutil.rmtree(target)
            tar.extractall(root, filter="data")
    except (ValueError, tarfile.TarError, EOFError, OSError) as exc:
        raise SubmitError(f"the job's results could not be read ({exc}); submit again") from None
    return sorted(m.name for m in members if m.isfile())


def _use_registered_token(address: str) -> None:
    """For a dashboard on this machine started by ``pipeline.local_cluster``, use the token
    it registered, unless this shell has one."""
    url = urlparse(address if "://" in address else f"http://{address}")
    if url.hostname in ("127.0.0.1", "localhost") and url.port is not None:
        use_registered_token(url.port)


def _client(address: str) -> Any:
    """A ``JobSubmissionClient`` of ``address``, imported after the token is settled.

    Raises:
        SubmitError: nothing answers at ``address`` or it refuses the token.
    """
    _use_registered_token(address)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, AuthenticationError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SubmitError(f"--address {address}: no Ray dashboard answers there ({reason}); give the head's "
                          "dashboard URL (http://<head>:8265) and, if the cluster uses token authentication, "
                          "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN") from None


def entrypoint(command: str, remote: str | None) -> str:
    """The job's shell command: ``command``, then (if it succeeded and ``remote`` is given)
    ``dvc push -r <remote>``, then :func:`pack`; its status is the first failure's.

    Args:
        command: what to run in the job's copy of the project (``dvc repro``).
        remote: a DVC remote the cached outputs are pushed to, or None.

    Returns:
        A ``bash -c`` command line.
    """
    script = f"{command}; rc=$?"
    if remote:
        script += f"; if [ $rc -eq 0 ]; then dvc push -r {shlex.quote(remote)} || rc=$?; fi"
    script += "; python -m pipeline.submit --pack; exit $rc"
    return f"bash -c {shlex.quote(script)}"


def runtime_env(working_dir: Path) -> dict[str, Any]:
    """The job's runtime env: the project, without :data:`JOB_EXCLUDES`, and the variables the
    job needs (``MLFLOW_TRACKING_URI`` of this shell when set).

    Args:
        working_dir: the project's root.

    Returns:
        The runtime env dict of ``submit_job``.
    """
    env_vars = {"DVC_NO_ANALYTICS": "1", "PYTHONPATH": "."}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    return {"working_dir": str(working_dir), "excludes": list(JOB_EXCLUDES), "env_vars": env_vars}


def submit(address: str, command: str, remote: str | None, root: Path, out: Any = None) -> str:
    """Submit ``command`` as a job, stream its log to ``out`` until it ends, bring its
    results back into ``root``.

    Args:
        address: the head's dashboard URL.
        command: the job's command (``dvc repro``).
        remote: DVC remote for the cached outputs (pushed by the job, pulled here), or None.
        root: the project's root here (uploaded as the job's working dir).
        out: where the log goes (default ``sys.stdout``).

    Returns:
        The job's submission id.

    Raises:
        SubmitError: ``root`` is no DVC project in git, the dashboard cannot be reached, the
            job failed or was stopped (its results are still brought back when it packed
            them), or ``dvc pull`` failed.
    """
    out = out or sys.stdout
    if not (root / "dvc.yaml").is_file() or not (root / ".git").exists():
        raise SubmitError(f"{root.resolve()}: no dvc.yaml and .git here; run from the project's root")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://", "databricks")):
        print(f"warning: MLFLOW_TRACKING_URI={uri or '(unset)'} is not a server: the job logs to a store in its "
              "copy of the project on the head, which vanishes with the session", file=sys.stderr)
    client = _client(address)
    # the upload: .git and the git-ignored DVC outputs too (read by Ray's packaging when it uploads)
    upload = {"RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": "", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}
    saved = {k: os.environ.get(k) for k in upload}
    os.environ.update(upload)
    deadline = time.monotonic() + 120
    try:
        while True:  # the head's job agent takes a few seconds to come up after `ray start`
            try:
                job = client.submit_job(entrypoint=entrypoint(command, remote), runtime_env=runtime_env(root))
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError with the server's answer
                if "No available agent" in str(exc) and time.monotonic() < deadline:
                    time.sleep(3)
                    continue
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise SubmitError(f"the job was not accepted ({reason})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(f"submitted job {job} to {address}", file=sys.stderr, flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    shown, in_pack = 0, False
    try:
        while True:
            status = str(client.get_job_status(job))
            done = status in ("SUCCEEDED", "FAILED", "STOPPED")
            log = client.get_job_logs(job)
            end = len(log) if done else log.rfind("\n", shown) + 1  # whole lines only, until the end
            if end > shown:
                lines = log[shown:end].split("\n")  # not splitlines: progress bars' \r stay inside a line
                shown = end
                for line in lines if lines[-1] else lines[:-1]:
                    marker = line.rstrip("\r")
                    in_pack = in_pack or marker == BEGIN
                    if not in_pack:
                        out.write(line + "\n")
                    in_pack = in_pack and marker != END
                out.flush()
            if done:
                break
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        client.stop_job(job)
        raise SubmitError(f"stopped job {job} (Ctrl-C or SIGTERM); its results stay on the head") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        written = unpack(client.get_job_logs(job), root)
    except SubmitError:
        if status == "SUCCEEDED":
            raise
        raise SubmitError(f"job {job} {status.lower()} before it packed its results: read its log above") from None
    print(f"job {job} {status}: brought back {len(written)} files of {', '.join(RESULTS)}", file=sys.stderr)
    if status != "SUCCEEDED":
        raise SubmitError(f"job {job} {status.lower()}: read its log above; dvc.lock, metrics/ and plots/ here are "
                          "its copy's as the job left them")
    if remote:
        pull = subprocess.run([sys.executable, "-m", "dvc", "pull", "-r", remote], cwd=root)
        if pull.returncode != 0:
            raise SubmitError(f"dvc pull -r {remote} failed (status {pull.returncode}); rerun it here")
    return job


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.submit --address URL [--remote NAME] [-- COMMAND ...]`` (see the
    module's docstring); ``--pack`` is what the job runs last. Exits 2 with
    ``error: submit: <message>`` when the job cannot be submitted or did not succeed.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="the head's dashboard URL, e.g. http://<head>:8265")
    parser.add_argument("--remote", help="DVC remote: the job pushes the cached outputs there, this command pulls them")
    parser.add_argument("--pack", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the job's command (default: dvc repro)")
    args = parser.parse_args(argv)
    if args.pack:
        pack()
        return
    if not args.address:
        parser.error("--address is required")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        submit(args.address, shlex.join(command) if command else "dvc repro", args.remote, Path("."))
    except SubmitError as exc:
        print(f"error: submit: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
