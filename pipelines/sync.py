"""Deliver what pipeline runs could not send yet, and end the runs whose process died.

A pipeline run logs through its outbox (:mod:`tracking.outbox`) in
``<checkpoint_dir>/pipeline/<run id>/``. When a flow ends while the tracking server is away, the
rest (metrics, artifacts, the model's registration, the run's end) waits there, and this module
delivers it: every pipeline run does so when it starts (:func:`catch_up`), and so does

    python -m pipelines.sync [--checkpoint_dir checkpoints]

A run left ``RUNNING`` by a process that no longer exists (killed, the machine rebooted) is ended
``FAILED`` by the next start, after its outbox is delivered, with a ``failure_reason`` that gives
the command continuing it (``python -m pipelines.training --resume <run id>``).
"""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Mapping

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import tracking
from pipelines import registry
from tracking.outbox import OUTBOX_FILE
from vae.cli import run_cli
from vae.config import get_default_config

__all__ = ["HANDLERS", "catch_up", "checkpoint_root", "default_checkpoint_dir", "deliver_all", "end_dead_runs", "resume_command", "run_folder"]

PIPELINE_DIR = "pipeline"  # <checkpoint_dir>/pipeline/<run id>/: one folder per MLflow run


def run_folder(checkpoint_dir: str | Path, run_id: str) -> Path:
    """The checkpoint folder of pipeline run ``run_id`` (its outbox, and ``<experiment>/last.pth``)."""
    return Path(checkpoint_dir) / PIPELINE_DIR / run_id


def checkpoint_root(folder: str | Path) -> Path:
    """The ``checkpoint_dir`` a run folder (:func:`run_folder`) lies under."""
    return Path(folder).parents[1]


def default_checkpoint_dir() -> Path:
    """The folder ``--resume`` looks in when none is named (every preset's ``checkpoint_dir``)."""
    return Path(get_default_config()["checkpoint_dir"])


def resuming_flow(run_kind: str | None) -> str:
    """The module that continues a pipeline run of ``run_kind``: ``pipelines.retraining`` for a
    retraining's challenger (it decides the promotion after), else ``pipelines.training``."""
    return "pipelines.retraining" if run_kind == "retraining" else "pipelines.training"


def resume_command(run_id: str, checkpoint_dir: str | Path | None = None, run_kind: str | None = None) -> str:
    """The command that continues pipeline run ``run_id`` (through :func:`resuming_flow`); it names
    ``--checkpoint_dir`` when the run's checkpoints are not under the default folder."""
    command = f"python -m {resuming_flow(run_kind)} --resume {run_id}"
    if checkpoint_dir is not None and Path(checkpoint_dir) != default_checkpoint_dir():
        command += f" --checkpoint_dir {shlex.quote(str(checkpoint_dir))}"
    return command


def register_record(client: MlflowClient, record: Mapping[str, Any]) -> None:
    """Deliver an outbox's ``register`` record: log and register the model, unless a version of
    this run exists already (registered just before a crash kept the outbox from saying so)."""
    if client.search_model_versions(f"run_id='{record['run_id']}'"):
        return
    registry.log_and_register(client, record["run_id"], record["model_path"], record["config"], tags=record["tags"])


HANDLERS = {"register": register_record}


def deliver_all(client: MlflowClient, checkpoint_dir: str | Path) -> dict[str, int]:
    """Post what every run folder under ``checkpoint_dir`` still holds; returns {run id: records
    posted} of those that had any. Raises what the store raised (the rest stays for next time)."""
    posted = {}
    for path in sorted((Path(checkpoint_dir) / PIPELINE_DIR).glob(f"*/{OUTBOX_FILE}")):
        outbox = tracking.Outbox(path.parent, path.parent.name)
        if outbox.pending() and _in_store(client, outbox.run_id):
            posted[outbox.run_id] = tracking.deliver_pending(client, outbox, HANDLERS)
    return posted


def _in_store(client: MlflowClient, run_id: str) -> bool:
    """Whether this store holds the run: an outbox of a run tracked elsewhere (the user switched
    ``MLFLOW_TRACKING_URI``) waits for its own store rather than being refused by this one."""
    try:
        client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def end_dead_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """End ``FAILED`` the pipeline runs still ``RUNNING`` whose process (on this host) is gone, after
    delivering their outboxes; the reason says so and how to continue. Returns their ids."""
    if not experiment_ids:
        return []
    ended = []
    for run in client.search_runs(experiment_ids, filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{tracking.TAG_PROCESS_HOST}` = '{socket.gethostname()}'")):
        if not tracking.process_died(run.data.tags):
            continue
        folder = run.data.tags.get(tracking.TAG_CHECKPOINT_DIR)
        if folder and (Path(folder) / OUTBOX_FILE).is_file():
            tracking.deliver_pending(client, tracking.Outbox(folder, run.info.run_id), HANDLERS)
        if client.get_run(run.info.run_id).info.status != "RUNNING":
            continue  # its outbox ended it (the flow had finished; only the server was away)
        pid, kind = run.data.tags[tracking.TAG_PROCESS_PID], run.data.tags.get(tracking.TAG_RUN_KIND)
        client.set_tag(run.info.run_id, tracking.TAG_FAILURE_REASON,
                       f"its process (pid {pid}) died without ending it; continue it with: "
                       f"{resume_command(run.info.run_id, checkpoint_root(folder) if folder else None, kind)}")
        client.set_terminated(run.info.run_id, status="FAILED")
        ended.append(run.info.run_id)
    return ended


def catch_up(client: MlflowClient, checkpoint_dir: str | Path, experiment_name: str) -> str | None:
    """What a pipeline run does first: :func:`deliver_all`, then :func:`end_dead_runs` in its
    experiment. Returns a line saying what it did, or None when there was nothing to do."""
    posted = deliver_all(client, checkpoint_dir)
    exp = client.get_experiment_by_name(experiment_name)
    ended = end_dead_runs(client, [exp.experiment_id] if exp is not None else [])
    parts = [f"delivered {sum(posted.values())} pending update(s) of {len(posted)} run(s)"] if posted else []
    parts += [f"ended FAILED {len(ended)} run(s) whose process died: {', '.join(ended)}"] if ended else []
    return "; ".join(parts) or None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.sync", description=(
        "Deliver the updates pipeline runs kept while the tracking server was away."))
    p.add_argument("--checkpoint_dir", default=None, help="the pipelines' checkpoint folder (default: the presets')")
    p.add_argument("--experiment_name", default=None,
                   help="also end the runs of this experiment whose process died (default: the presets')")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    defaults = get_default_config()
    client = tracking.get_client()  # an unreachable server: one line
    line = catch_up(client, args.checkpoint_dir or defaults["checkpoint_dir"],
                    args.experiment_name or defaults["experiment_name"])
    print(line or "nothing to deliver")
    return 0


def cli(argv=None) -> None:
    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    cli()
