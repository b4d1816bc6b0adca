"""The ``vae-training`` flow: prepare data -> train -> evaluate -> figures -> register.

Parameters are config overrides over a preset (``vae.config.PRESETS``): every config key is a
parameter of its own (``num_epochs``, ``latent_dim``, ``beta``, ...; None: the preset's value),
generated from the fields of :mod:`vae.config` as the CLI's flags are; ``overrides`` takes any
of them as one mapping. A bad key or value fails the flow at once with every problem named.
Evaluation options (``iw_k``, ...) are the flow's own. Everything lands in one MLflow run of the config's ``experiment_name``
(see :mod:`tracking`), and the model becomes a ``vae-mnist`` version aliased
``challenger``.

Command line (the ``vae-pipeline`` script): ``python -m pipelines.training --preset small
--num_epochs 2`` (every config key is a flag, as in ``vae-train``); ``--resume RUN_ID`` continues
a failed run from its ``last.pth`` into the same MLflow run and registers its model.

The run logs through a local outbox (:mod:`tracking.outbox`): training never waits on the tracking
server; a flow that ends while the server is away says so in one line, and ``python -m
pipelines.sync`` (or the next run) delivers the rest. A run whose process died is ended ``FAILED``,
with the reason, by the next start (:mod:`pipelines.sync`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import typing
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run

import tracking
from pipelines import console, sync, tasks
from vae.callbacks import on_signals
from vae.cli import dataclass_parameters, expand_kwargs, run_cli
from vae.config import PRESETS, Config, ConfigError, add_config_arguments, config_from_args, validate_config
from vae.data import read_raw_files
from vae.errors import Interrupted
from vae.likelihood import likelihood_protocol

Preset = Literal[tuple(sorted(PRESETS))]
DEFAULT_IW_K = 1000
TRACKING_WAIT_S = 20.0  # how long a flow's end waits for its outbox to reach a server that is away
# Every config key, as an optional flow parameter (None: the preset's value).
CONFIG_PARAMETERS = [p for section in typing.get_type_hints(Config).values()
                     for p in dataclass_parameters(section, optional=True)]
CONFIG_KEYS = frozenset(p.name for p in CONFIG_PARAMETERS)


def build_config(preset: str = "small", overrides: dict[str, Any] | None = None, **named: Any) -> dict[str, Any]:
    """A preset with ``overrides`` and the non-None ``named`` values applied, validated.

    Raises:
        ConfigError: unknown preset, unknown keys or bad values (all named at once).
    """
    if preset not in PRESETS:
        raise ConfigError([f"preset: must be one of {', '.join(sorted(PRESETS))}, got {preset!r}"])
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError([f"overrides: must be a mapping of config keys to values, got {overrides!r}"])
    raw = {**PRESETS[preset](), **(overrides or {}), **{k: v for k, v in named.items() if v is not None}}
    return validate_config(raw).to_dict()


def check_eval_options(iw_k: int, eval_max_images: int, eval_max_train_images: int = 0) -> None:
    """Raises ConfigError naming every bad evaluation option."""
    def whole(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low
    problems = [] if whole(iw_k, 1) else [f"iw_k: must be an integer >= 1, got {iw_k!r}"]
    problems += [f"{name}: must be an integer >= 0 (0 = all), got {value!r}" for name, value in
                 (("eval_max_images", eval_max_images), ("eval_max_train_images", eval_max_train_images))
                 if not whole(value, 0)]
    if problems:
        raise ConfigError(problems)


def check_inputs(config: dict[str, Any]) -> None:
    """What the command lines check before any flow run starts, so that a user's mistake is one
    ``error:`` line (:func:`vae.cli.run_cli`) rather than a failed run: the data files (present,
    valid IDX, matching SHA256SUMS) of a validated config; then Prefect's console shows no
    traceback for a user error that only the flow finds (:mod:`pipelines.console`).

    Raises:
        DataError: the files are missing (naming where to put them) or invalid.
    """
    read_raw_files(config["data_dir"], config["dataset"])
    console.hide_user_error_tracebacks()


def stopped_after_registering(sig: signal.Signals, run_id: str, run_kind: str, queued_in: str | None) -> str:
    """The line for a signal that came while the model was registered: it waited for the end.
    ``queued_in``: the checkpoint folder whose outbox holds the registration, if it was queued."""
    how = f" (queued: `{tasks.sync_command(queued_in)}` delivers it)" if queued_in else ""
    left = "; no promotion was decided: the champion is unchanged" if run_kind == "retraining" else ""
    return (f"{sig.name} arrived while the model was registered, so the registration finished first{how}; "
            f"MLflow run {run_id} is complete{left}")


def run_training(config: dict[str, Any], *, iw_k: int, eval_max_images: int, eval_max_train_images: int,
                 eval_probe: bool, eval_fid: bool, write_figures: bool, register: bool,
                 run_kind: str, resume_run_id: str | None = None,
                 tracking_wait_s: float = TRACKING_WAIT_S) -> dict[str, Any]:
    """The steps, in order, for a validated config; shared by the training and retraining flows.

    ``resume_run_id``: continue that run (its ``last.pth``, into the same MLflow run) instead of
    starting one. ``tracking_wait_s``: how long the end of the flow waits for the run's outbox to
    reach a tracking server that is away (then the flow ends and says so in one line).
    """
    check_eval_options(iw_k, eval_max_images, eval_max_train_images)
    data_ref = tasks.prepare_data(config["data_dir"], config["dataset"])
    tasks.catch_up(config["checkpoint_dir"], config["experiment_name"])
    ckpt = config["checkpoint_dir"]
    run = (tasks.reopen_run(resume_run_id, run_kind, ckpt) if resume_run_id else
           tasks.start_run(config, data_ref, run_kind, flow_run.get_id()))
    run_id = run["run_id"]
    resume = sync.resume_command(run_id, ckpt, run_kind)
    # One run folder per MLflow run: the trainer refuses to overwrite another run's checkpoints.
    train_config = {**config, "checkpoint_dir": str(sync.run_folder(ckpt, run_id))}
    stops: list[signal.Signals] = []
    try:
        tasks.tag_run(run_id, ckpt, {tracking.TAG_CHECKPOINT_DIR: train_config["checkpoint_dir"]})
        result = tasks.train(train_config, data_ref, run_id, resume)
        best = result["best_model_path"]
        with tasks.stop_on_signals("scoring the trained model",
                                   f"nothing was registered; score and register it with: {resume}"):
            metrics = tasks.evaluate(best, config, data_ref, run_id, k=iw_k, max_test_images=eval_max_images,
                                     max_train_images=eval_max_train_images, probe=eval_probe, fid=eval_fid)
            figures = tasks.figures(best, config, data_ref, run_id, result["history"]) if write_figures else {}
            tasks.summary(run, config, metrics, figures, likelihood_protocol(
                config["reconstruction_loss_type"], config["binarize"], iw_k, eval_max_images))
        score = {tasks.score_key(iw_k): metrics[tasks.score_key(iw_k)]}
        with on_signals(stops.append):  # a registration is not cut in half: a signal waits for its end
            version = tasks.register(best, config, run_id, score, run_kind, tracking_wait_s) if register else None
    except BaseException as e:
        if isinstance(e, Interrupted):  # on request: ended KILLED, nothing scored (or not all) or registered
            print(f"MLflow run {run_id}: {e}")
            tasks.finish_run(run_id, ckpt, "KILLED", str(e), tracking_wait_s)
            raise
        print(f"MLflow run {run_id} failed; continue it from its last checkpoint with: {resume}")
        tasks.finish_run(run_id, ckpt, "FAILED", f"{type(e).__name__}: {e} (continue it with: {resume})",
                         tracking_wait_s)
        raise
    pending = tasks.finish_run(run_id, ckpt, "FINISHED", None, tracking_wait_s)
    if stops:
        raise Interrupted(stopped_after_registering(stops[0], run_id, run_kind, ckpt if version is None else None))
    return {**run, "model_version": version, "metrics": metrics, "figures": figures, "score_key": tasks.score_key(iw_k),
            "best_model_path": best, "data_digest": data_ref["digest"], "config": config,
            "final_metrics": result["final_metrics"], "tracking_pending": pending}


@flow(name="vae-training", log_prints=True)
@expand_kwargs(*CONFIG_PARAMETERS)
def vae_training(preset: Preset = "small", overrides: dict[str, Any] | None = None, iw_k: int = DEFAULT_IW_K,
                 eval_max_images: int = 0, eval_max_train_images: int = 0, eval_probe: bool = True,
                 eval_fid: bool = True, figures: bool = True, register_model: bool = True, run_kind: str = "training",
                 resume_run_id: str | None = None, tracking_wait_s: float = TRACKING_WAIT_S,
                 **config: Any) -> dict[str, Any]:
    """Train, evaluate, log and register one VAE.

    Args:
        preset: the starting config (``small``: 3 epochs on a 10k-image subset).
        overrides: config keys as one mapping, e.g. ``{"hidden_dims": [16, 32], "seed": 1}``.
        iw_k: importance samples of the test IW bound ``test/iw_nll_k{iw_k}`` (the registry's score).
        eval_max_images: evaluate on the first N test images only (0 = all 10,000).
        eval_max_train_images: fit the linear probe on the first N training images only (0 = all).
        eval_probe, eval_fid: compute the linear probe and the classifier FID.
        figures: write the figures (``figures/*.png`` in the run).
        register_model: log and register the model (``challenger``).
        resume_run_id: continue this failed (or killed) run from its ``last.pth`` into the same
            MLflow run, with its stored config (only ``num_epochs``, ``device``, ... may change;
            ``checkpoint_dir`` must be the one it ran under); ``preset`` is then ignored.
        tracking_wait_s: how long the flow's end waits for a tracking server that is away before
            it ends anyway, saying so; ``python -m pipelines.sync`` (or the next run) delivers the rest.
        config: every config key (``num_epochs``, ``latent_dim``, ...; None: the preset's value),
            applied over ``overrides``.
    Returns:
        run id, experiment id, model version, test metrics, figure paths, config.
    """
    if resume_run_id:
        given = {**(overrides or {}), **{k: v for k, v in config.items() if v is not None}}
        cfg = tasks.resumed_config(resume_run_id, given)
    else:
        cfg = build_config(preset, overrides, **config)
    return run_training(cfg, iw_k=iw_k, eval_max_images=eval_max_images,
                        eval_max_train_images=eval_max_train_images, eval_probe=eval_probe, eval_fid=eval_fid,
                        write_figures=figures, register=register_model, run_kind=run_kind,
                        resume_run_id=resume_run_id, tracking_wait_s=tracking_wait_s)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation flags of the pipelines' command lines (the flows' parameters of those names)."""
    parser.add_argument("--iw_k", type=int, default=DEFAULT_IW_K, help="importance samples of the test IW bound")
    parser.add_argument("--eval_max_images", type=int, default=0, help="evaluate on the first N test images (0 = all)")
    parser.add_argument("--eval_max_train_images", type=int, default=0,
                        help="fit the linear probe on the first N training images (0 = all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-pipeline", description="Run the vae-training flow once.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="starting configuration")
    add_eval_arguments(parser)
    parser.add_argument("--no_register", action="store_true", help="do not register the model")
    parser.add_argument("--resume", metavar="RUN_ID", default=None,
                        help="continue this failed pipeline run from its last.pth, into the same MLflow run")
    parser.add_argument("--tracking_wait_s", type=float, default=TRACKING_WAIT_S,
                        help="how long the end waits for a tracking server that is away (then `python -m "
                             "pipelines.sync` delivers the rest)")
    return add_config_arguments(parser)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_eval_options(args.iw_k, args.eval_max_images, args.eval_max_train_images)
    if args.resume:  # the run's stored config, with the flags a resumed run may change
        given = {k: v for k, v in vars(args).items() if k in CONFIG_KEYS and v is not None}
        config = tasks.resumed_config(args.resume, given)
    else:
        config = config_from_args(args, PRESETS[args.preset]()).to_dict()
    check_inputs(config)
    tracking.get_client()  # an unreachable tracking server: one line before any flow run starts
    out = vae_training(preset=args.preset, overrides=config, iw_k=args.iw_k, eval_max_images=args.eval_max_images,
                       eval_max_train_images=args.eval_max_train_images, register_model=not args.no_register,
                       resume_run_id=args.resume, tracking_wait_s=args.tracking_wait_s)
    print(console.dumps({k: out[k] for k in ("run_id", "experiment_id", "model_version", "metrics")}))
    if out["tracking_pending"]:
        print(f"warning: {out['tracking_pending']}", file=sys.stderr)
    return 0


def cli(argv=None) -> None:
    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    cli()
